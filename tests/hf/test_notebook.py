"""examples/sals_quickstart.ipynb runs headlessly from top to bottom (nbclient), with the
session's SmolLM2 calibration (the smollm2_calibration fixture sets SALS_CACHE_DIR)."""

from __future__ import annotations

import os

import pytest

pytestmark = pytest.mark.slow

NOTEBOOK = os.path.join(os.path.dirname(__file__), "..", "..", "examples",
                        "sals_quickstart.ipynb")


def test_quickstart_notebook_executes(smollm2_calibration, tmp_path):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("matplotlib")
    pytest.importorskip("ipykernel")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    # the kernel's default inline backend renders figures as PNG outputs, no display needed
    nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}}).execute()
    nbformat.write(nb, str(tmp_path / "executed.ipynb"))
    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs]
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert "blue-harbor-4172" in text
    assert "x smaller" in text and "at 128 candidates" in text
    assert sum("image/png" in o.get("data", {}) for o in outputs) == 2
