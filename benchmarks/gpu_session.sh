#!/usr/bin/env bash
# One call on the GPU machine: build libsals with CUDA (+ C tests), install the Python package, run the
# C tests, the CUDA-vs-CPU C test under compute-sanitizer, the GPU pytest suite and (with
# BENCH=1) the attention benchmark. Logs and JSON go to $OUT (default ./gpu-out).
#   STEPS="build ctest sanitize pytest bench" bash benchmarks/gpu_session.sh
set -u
OUT=${OUT:-$PWD/gpu-out}
mkdir -p "$OUT"
STEPS=${STEPS:-"build ctest sanitize pytest"}
export PYTHONUNBUFFERED=1
has() { [[ " $STEPS " == *" $1 "* ]]; }
log() { echo "== $* ($(date +%T))"; }
{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  nvcc --version | tail -1
  python3 -c "import torch; print('torch', torch.__version__, torch.version.cuda)"
} 2>&1 | tee "$OUT/env.txt"
if has build; then
  log build
  cmake -S . -B build-gpu -G Ninja -DSALS_CUDA=ON -DSALS_BUILD_TESTS=ON \
    -DSALS_CUDA_ARCHS="${SALS_CUDA_ARCHS:-80;90}" > "$OUT/build.log" 2>&1 &&
    cmake --build build-gpu -j16 >> "$OUT/build.log" 2>&1 || { tail -40 "$OUT/build.log"; exit 1; }
  SALS_CUDA=ON SALS_BUILD_DIR=$PWD/build-gpu python3 -m pip install -q --no-build-isolation \
    --no-deps . >> "$OUT/build.log" 2>&1 || { tail -40 "$OUT/build.log"; exit 1; }
  tail -2 "$OUT/build.log"
fi
cd /tmp  # import the installed package, not the source tree
python3 -c "import sals; print('sals', sals.__version__, 'cuda_available', sals.cuda_available())"
cd - > /dev/null
if has ctest; then
  log ctest
  ctest --test-dir build-gpu --output-on-failure --timeout 300 2>&1 | tee "$OUT/ctest.log" | tail -40
fi
if has sanitize; then
  log memcheck
  timeout ${SAN_TIMEOUT:-120} compute-sanitizer --tool memcheck --error-exitcode 9 build-gpu/cuda/test_cuda_vs_cpu \
    > "$OUT/memcheck.log" 2>&1; echo "memcheck rc=$?"; tail -5 "$OUT/memcheck.log"
  log racecheck
  timeout ${SAN_TIMEOUT:-120} compute-sanitizer --tool racecheck --error-exitcode 9 build-gpu/cuda/test_cuda_vs_cpu \
    > "$OUT/racecheck.log" 2>&1; echo "racecheck rc=$?"; tail -5 "$OUT/racecheck.log"
fi
if has pytest; then
  log pytest
  (cd /tmp && timeout 400 python3 -m pytest -q -p no:cacheprovider "$OLDPWD/tests/gpu/test_cuda.py" \
    2>&1 | tee "$OUT/pytest.log" | tail -30)
fi
if has bench; then
  log bench
  (cd /tmp && timeout ${BENCH_TIMEOUT:-540} python3 -m sals bench attention --out "$OUT/bench.json" \
    ${BENCH_ARGS:-} 2>&1 | tee "$OUT/bench.log")
fi
log done
