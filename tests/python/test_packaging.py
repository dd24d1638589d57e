"""The installed package as its users see it: metadata from the header's version, and the C
library inside it usable from C through its pkg-config file and its CMake package, wherever the
package was installed (both files find their prefix from their own location)."""

import importlib.metadata
import os
import pathlib
import shutil
import subprocess

import pytest

import sals

EXAMPLE = pathlib.Path(__file__).resolve().parents[2] / "examples" / "c" / "decode.c"
LIBDIR = os.path.dirname(sals.get_library())


def _run(args, **kwargs):
    out = subprocess.run(args, capture_output=True, text=True, timeout=300, **kwargs)
    assert out.returncode == 0, f"{args}:\n{out.stdout}\n{out.stderr}"
    return out.stdout


def test_metadata_matches_the_header():
    meta = importlib.metadata.metadata("sals")
    assert meta["Version"] == sals.__version__
    assert meta["License-Expression"] == "Apache-2.0"


@pytest.mark.skipif(not (shutil.which("pkg-config") and shutil.which("cc")),
                    reason="needs pkg-config and a C compiler")
def test_pkg_config_builds_and_runs_the_c_example(tmp_path):
    env = dict(os.environ, PKG_CONFIG_PATH=os.path.join(LIBDIR, "pkgconfig"))
    assert _run(["pkg-config", "--modversion", "sals"], env=env).strip() == sals.__version__
    flags = _run(["pkg-config", "--cflags", "--libs", "sals"], env=env).split()
    exe = tmp_path / "decode"
    _run(["cc", "-std=c99", "-O2", str(EXAMPLE), *flags, "-lm", "-o", str(exe)])
    # no LD_LIBRARY_PATH: the rpath of the pkg-config file finds the library
    _run([str(exe)], env={k: v for k, v in os.environ.items() if k != "LD_LIBRARY_PATH"})


@pytest.mark.skipif(not (shutil.which("cmake") and shutil.which("cc")),
                    reason="needs CMake and a C compiler")
def test_cmake_find_package_builds_and_runs_the_c_example(tmp_path):
    (tmp_path / "CMakeLists.txt").write_text(f"""
cmake_minimum_required(VERSION 3.18)
project(client LANGUAGES C)
find_package(sals {sals.__version__} CONFIG REQUIRED PATHS "{LIBDIR}/cmake" NO_DEFAULT_PATH)
add_executable(decode "{EXAMPLE}")
target_link_libraries(decode PRIVATE sals::sals m)
""")
    build = tmp_path / "build"
    _run(["cmake", "-S", str(tmp_path), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release"])
    _run(["cmake", "--build", str(build)])
    _run([str(build / "decode")])
