"""pyproject.toml as the installed setuptools reads it: no deprecation warning (the licence was
a TOML table, which setuptools 77 deprecates for an SPDX string and will refuse in 2027)."""

import os
import warnings

import pytest

PYPROJECT = os.path.join(os.path.dirname(__file__), "..", "..", "pyproject.toml")


def test_pyproject_reads_without_warnings():
    pytest.importorskip("setuptools")
    from setuptools.config.pyprojecttoml import apply_configuration
    from setuptools.dist import Distribution

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        dist = apply_configuration(Distribution(), PYPROJECT)
    assert dist.metadata.license_expression == "Apache-2.0"
