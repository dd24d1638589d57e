"""Build sals: libsals with CMake, then the abi3 extension sals._C linked against it.

    pip install --no-build-isolation .          # wheel install (offline works)
    python setup.py build_ext --inplace         # developer flow: python/sals/{_C*.so,lib/}

CMake runs with -DSALS_CUDA=AUTO (CUDA kernels when nvcc is found; CPU-only otherwise) and
Release; set SALS_CUDA=OFF (or ON) in the environment to force it, SALS_CUDA_ARCHS to narrow the
GPU architectures (e.g. 90a-real), CMAKE_ARGS to add options, SALS_BUILD_DIR to reuse a build
directory. libsals.so and the public headers are installed inside the package (sals/lib/,
sals/include/, sals/lib/pkgconfig/sals.pc) and sals._C finds the library through the rpath
$ORIGIN/lib.

The C library alone builds in seconds. The CUDA kernels take minutes (about 7 on two cores: five
.cu files, each for sm_80, sm_90a and compute_90 PTX), and AUTO builds them wherever nvcc is
found, with or without a GPU (the wheel may be meant for another machine): the build says so
before it starts. pip shows the build's output only with `pip install -v`.
"""

from __future__ import annotations

import glob
import os
import re
import shlex
import shutil
import subprocess
import sys
import time

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = os.path.dirname(os.path.abspath(__file__))
HEADER = os.path.join(ROOT, "csrc", "include", "sals", "sals.h")


def _version() -> str:
    with open(HEADER, encoding="utf-8") as f:
        m = re.search(r'#define SALS_VERSION_STRING "([^"]+)"', f.read())
    if m is None:
        raise RuntimeError(f"SALS_VERSION_STRING not found in {HEADER}")
    return m.group(1)


def _soname(path: str) -> str | None:
    """The DT_SONAME of a shared library (via readelf), or None."""
    readelf = shutil.which("readelf")
    if readelf is None:
        return None
    out = subprocess.run([readelf, "-d", path], capture_output=True, text=True).stdout
    m = re.search(r"\(SONAME\)\s+Library soname: \[([^\]]+)\]", out)
    return m.group(1) if m else None


PC_TEMPLATE = """prefix=${{pcfiledir}}/../..
libdir=${{pcfiledir}}/..
includedir=${{prefix}}/include

Name: sals
Description: Sparse Attention in Latent Space (SALS) KV cache compression
Version: {version}
Libs: -L${{libdir}} -Wl,-rpath,${{libdir}} -lsals
Cflags: -I${{includedir}}
"""


# find_package(sals CONFIG PATHS <sals.get_library() dir>/cmake) -> imported target sals::sals
CMAKE_CONFIG = """# sals {version}, installed inside the Python package
get_filename_component(_sals_lib "${{CMAKE_CURRENT_LIST_DIR}}/../.." ABSOLUTE)
get_filename_component(_sals_root "${{_sals_lib}}/.." ABSOLUTE)
set(sals_VERSION {version})
if(NOT TARGET sals::sals)
  add_library(sals::sals SHARED IMPORTED)
  set_target_properties(sals::sals PROPERTIES
    IMPORTED_LOCATION "${{_sals_lib}}/{soname}"
    INTERFACE_INCLUDE_DIRECTORIES "${{_sals_root}}/include")
endif()
"""


def _say(message: str) -> None:
    """A progress line of the build (pip shows it with -v)."""
    print(f"sals build: {message}", file=sys.stderr, flush=True)


def _cache_value(build_dir: str, name: str) -> str | None:
    """A variable of build_dir's CMakeCache.txt, or None."""
    try:
        with open(os.path.join(build_dir, "CMakeCache.txt"), encoding="utf-8") as f:
            for line in f:
                if line.startswith(name + ":"):
                    return line.split("=", 1)[1].strip()
    except OSError:
        pass
    return None


def _gpu_visible() -> bool:
    """Whether this machine shows an NVIDIA GPU (only for what the build says)."""
    return bool(glob.glob("/proc/driver/nvidia/gpus/*") or glob.glob("/dev/nvidia[0-9]*"))


class CMakeThenExtension(build_ext):
    """Builds libsals with CMake, installs it into the package, then builds sals._C."""

    def run(self):
        pkg_dir = os.path.join(ROOT, "python", "sals") if self.inplace else \
            os.path.join(os.path.abspath(self.build_lib), "sals")
        lib_dir = os.path.join(pkg_dir, "lib")
        self._build_libsals(lib_dir, pkg_dir)
        for ext in self.extensions:
            ext.library_dirs.append(lib_dir)
        super().run()

    def _build_libsals(self, lib_dir: str, pkg_dir: str) -> None:
        build_dir = os.environ.get("SALS_BUILD_DIR") or os.path.join(
            os.path.abspath(self.build_temp), "cmake")
        cuda = os.environ.get("SALS_CUDA", "AUTO").upper()
        if cuda not in ("AUTO", "ON", "OFF"):
            raise RuntimeError(f"SALS_CUDA must be AUTO, ON or OFF, got {cuda!r}")
        cmake = shutil.which("cmake")
        if cmake is None:
            raise RuntimeError("building sals needs CMake (pip install cmake; apt install cmake)")
        args = [cmake, "-S", ROOT, "-B", build_dir, "-DCMAKE_BUILD_TYPE=Release",
                f"-DSALS_CUDA={cuda}"]
        if shutil.which("ninja") and not os.path.exists(os.path.join(build_dir, "CMakeCache.txt")):
            args += ["-G", "Ninja"]
        if os.environ.get("SALS_CUDA_ARCHS"):
            args.append(f"-DSALS_CUDA_ARCHS={os.environ['SALS_CUDA_ARCHS']}")
        args += shlex.split(os.environ.get("CMAKE_ARGS", ""))
        jobs = os.environ.get("CMAKE_BUILD_PARALLEL_LEVEL") or str(os.cpu_count() or 1)
        start = time.perf_counter()
        _say(f"configuring libsals with CMake in {build_dir} (SALS_CUDA={cuda})")
        subprocess.check_call(args)
        with_cuda = _cache_value(build_dir, "SALS_WITH_CUDA") == "ON"
        if with_cuda:
            archs = _cache_value(build_dir, "SALS_CUDA_ARCHS") or "?"
            where = ("" if _gpu_visible() else
                     " No GPU is visible on this machine: they are compiled for use elsewhere.")
            _say(f"compiling the C library and the CUDA kernels (cuda/*.cu for {archs}) with "
                 f"{jobs} jobs: this takes minutes (about 7 on two cores), with a line per "
                 f"finished file.{where} SALS_CUDA=OFF builds the CPU backend only, in seconds.")
        else:
            _say(f"compiling the C library, CPU backend only, with {jobs} jobs (CUDA kernels: "
                 f"{'SALS_CUDA=OFF' if cuda == 'OFF' else 'no nvcc found'})")
        subprocess.check_call([cmake, "--build", build_dir, "--target", "sals", "--parallel", jobs])
        _say(f"libsals built in {time.perf_counter() - start:.0f} s "
             f"(CUDA backend {'ON' if with_cuda else 'OFF'})")

        links = glob.glob(os.path.join(build_dir, "**", "libsals.so"), recursive=True)
        if not links:
            raise RuntimeError(f"CMake built no libsals.so under {build_dir}")
        real = os.path.realpath(links[0])
        os.makedirs(lib_dir, exist_ok=True)
        for old in glob.glob(os.path.join(lib_dir, "libsals.so*")):
            os.remove(old)
        soname = _soname(real) or "libsals.so"
        shutil.copy2(real, os.path.join(lib_dir, soname))
        if soname != "libsals.so":
            # The link-time and dlopen name. A real copy, not a link: wheels cannot hold links,
            # and ctypes users open libsals.so by name.
            shutil.copy2(real, os.path.join(lib_dir, "libsals.so"))

        include_dir = os.path.join(pkg_dir, "include", "sals")
        os.makedirs(include_dir, exist_ok=True)
        for header in glob.glob(os.path.join(ROOT, "csrc", "include", "sals", "*.h")):
            shutil.copy2(header, include_dir)
        pc_dir = os.path.join(lib_dir, "pkgconfig")
        os.makedirs(pc_dir, exist_ok=True)
        with open(os.path.join(pc_dir, "sals.pc"), "w", encoding="utf-8") as f:
            f.write(PC_TEMPLATE.format(version=_version()))
        cmake_dir = os.path.join(lib_dir, "cmake", "sals")
        os.makedirs(cmake_dir, exist_ok=True)
        with open(os.path.join(cmake_dir, "salsConfig.cmake"), "w", encoding="utf-8") as f:
            f.write(CMAKE_CONFIG.format(version=_version(), soname=soname))


ext = Extension(
    "sals._C",
    sources=["python/sals/_C.c"],
    include_dirs=[os.path.join("csrc", "include")],
    depends=glob.glob(os.path.join("csrc", "include", "sals", "*.h")),
    libraries=["sals"],
    runtime_library_dirs=["$ORIGIN/lib"],
    extra_compile_args=["-std=c99", "-Wall", "-Werror=implicit-function-declaration"],
    py_limited_api=True,
)

setup(
    version=_version(),
    ext_modules=[ext],
    cmdclass={"build_ext": CMakeThenExtension},
    options={"bdist_wheel": {"py_limited_api": "cp310"}},
    zip_safe=False,
)
