#!/usr/bin/env bash
# One call on the GPU machine: build libsals with CUDA (+ C tests), install the Python package, run the
# C tests, the CUDA-vs-CPU C test under compute-sanitizer, the GPU pytest suite and (with
# BENCH=1) the attention benchmark. Logs and JSON go to $OUT (default ./gpu-out).
#   STEPS="build ctest sanitize pytest bench e2e profile" bash benchmarks/gpu_session.sh
# pytest: the GPU suites (and, with NEWEST_TRANSFORMERS=wheel, the HF CUDA tests on that
# transformers); e2e: `python -m sals bench e2e` with E2E_ARGS, JSON and plot to $OUT
# profile: Nsight Compute on the kernels of one decode step for each PROFILE_CASES entry
# ("shape:context:batch:setting:kernel", see benchmarks/profile_step.py; kernel is a regex on the
# kernel name, default every kernel of the step); writes the details page, the per-instruction
# source view (stall samples) and a one-line summary per kernel of each case.
# WHEEL=path: install that prebuilt wheel (built elsewhere with SALS_CUDA=ON) instead of building;
# BUILD_DIR=path: a CMake build tree with the tests, made on a machine where this checkout has the
# same path (ctest reads absolute paths), used by ctest and sanitize.
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
BUILD_DIR=${BUILD_DIR:-build-gpu}
if [ -n "${WHEEL:-}" ]; then
  log "install $WHEEL"
  python3 -m pip install -q --no-deps --force-reinstall "$WHEEL" > "$OUT/build.log" 2>&1 ||
    { tail -20 "$OUT/build.log"; exit 1; }
elif has build; then
  log build
  cmake -S . -B build-gpu -G Ninja -DSALS_CUDA=ON -DSALS_BUILD_TESTS=ON \
    -DSALS_CUDA_ARCHS="${SALS_CUDA_ARCHS:-80-real;90a-real;90-virtual}" > "$OUT/build.log" 2>&1 &&
    cmake --build build-gpu -j16 >> "$OUT/build.log" 2>&1 || { tail -40 "$OUT/build.log"; exit 1; }
  SALS_CUDA=ON SKBUILD_BUILD_DIR=$PWD/build-gpu python3 -m pip install -q --no-build-isolation \
    --no-deps . >> "$OUT/build.log" 2>&1 || { tail -40 "$OUT/build.log"; exit 1; }
  tail -2 "$OUT/build.log"
fi
cd /tmp  # import the installed package, not the source tree
python3 -c "import sals; print('sals', sals.__version__, 'cuda_available', sals.cuda_available())"
cd - > /dev/null
if has ctest; then
  log ctest
  ctest --test-dir "$BUILD_DIR" --output-on-failure --timeout ${CTEST_TIMEOUT:-300} 2>&1 | tee "$OUT/ctest.log" | tail -40
fi
if has sanitize; then
  log memcheck
  timeout ${SAN_TIMEOUT:-120} compute-sanitizer --tool memcheck --error-exitcode 9 "$BUILD_DIR/cuda/test_cuda_vs_cpu" \
    > "$OUT/memcheck.log" 2>&1; echo "memcheck rc=$?"; tail -5 "$OUT/memcheck.log"
  log racecheck
  timeout ${SAN_TIMEOUT:-120} compute-sanitizer --tool racecheck --error-exitcode 9 "$BUILD_DIR/cuda/test_cuda_vs_cpu" \
    > "$OUT/racecheck.log" 2>&1; echo "racecheck rc=$?"; tail -5 "$OUT/racecheck.log"
fi
if has pytest; then
  log pytest
  (cd /tmp && timeout ${PYTEST_TIMEOUT:-400} python3 -m pytest -q -p no:cacheprovider "$OLDPWD/tests/gpu/test_cuda.py" \
    "$OLDPWD/tests/python/test_torch_cuda.py" "$OLDPWD/tests/python/test_torch_ops.py" \
    "$OLDPWD/tests/python/test_range.py" "$OLDPWD/tests/hf/test_hf_cuda.py" \
    "$OLDPWD/tests/hf/test_graph_decoder.py" 2>&1 | tee "$OUT/pytest.log" | tail -30)
  if [ -n "${NEWEST_TRANSFORMERS:-}" ]; then  # a wheel carried in; installed beside the old one
    log "pytest hf on $(basename "$NEWEST_TRANSFORMERS")"
    python3 -m pip install -q --no-deps --target /tmp/tf-newest "$NEWEST_TRANSFORMERS" &&
      (cd /tmp && PYTHONPATH=/tmp/tf-newest timeout 300 python3 -m pytest -q -p no:cacheprovider \
        "$OLDPWD/tests/hf/test_hf_cuda.py" 2>&1 | tee "$OUT/pytest_newest.log" | tail -15)
  fi
fi
if has bench; then
  log bench
  (cd /tmp && timeout ${BENCH_TIMEOUT:-540} python3 -m sals bench attention --out "$OUT/bench.json" \
    ${BENCH_ARGS:-} 2>&1 | tee "$OUT/bench.log")
fi
if has e2e; then
  log e2e
  (cd /tmp && timeout ${E2E_TIMEOUT:-540} python3 -m sals bench e2e --out "$OUT/e2e.json" \
    --plot "$OUT/e2e.png" ${E2E_ARGS:-} 2>&1 | tee "$OUT/e2e.log")
fi
if has profile; then
  for case in ${PROFILE_CASES:-llama2-7b:4096:16:sals-12.5}; do
    IFS=: read -r shape ctx batch setting kernel <<< "$case"
    kernel=${kernel:-.}
    name=prof_${shape}_${ctx}_${batch}_${setting}
    log "profile $case"
    (cd /tmp && timeout 300 ncu --clock-control none --profile-from-start off -k "regex:$kernel" --set full \
      --import-source yes -f -o "/tmp/$name" python3 "$OLDPWD/benchmarks/profile_step.py" \
      "$shape" "$ctx" "$batch" "$setting" > "$OUT/$name.log" 2>&1; tail -3 "$OUT/$name.log")
    ncu -i "/tmp/$name.ncu-rep" --page details > "$OUT/$name.txt" 2>&1
    ncu -i "/tmp/$name.ncu-rep" --page source --csv --print-source sass > "$OUT/${name}_sass.csv" 2>&1
    ncu -i "/tmp/$name.ncu-rep" --page raw --csv --metrics \
      gpu__time_duration.sum,launch__grid_size,launch__block_size,launch__registers_per_thread,sm__warps_active.avg.pct_of_peak_sustained_active,sm__throughput.avg.pct_of_peak_sustained_elapsed,dram__throughput.avg.pct_of_peak_sustained_elapsed,smsp__average_warp_latency_per_inst_issued.ratio \
      > "$OUT/${name}_summary.csv" 2>&1
    python3 - "$OUT/${name}_summary.csv" <<'PY'
import csv, sys
rows = list(csv.reader(open(sys.argv[1])))
head = rows[0]
want = ["Kernel Name", "gpu__time_duration.sum", "launch__grid_size", "launch__block_size",
        "launch__registers_per_thread", "sm__warps_active.avg.pct_of_peak_sustained_active",
        "sm__throughput.avg.pct_of_peak_sustained_elapsed",
        "dram__throughput.avg.pct_of_peak_sustained_elapsed"]
cols = [head.index(w) for w in want if w in head]
for r in rows[2:]:
    print("  ".join(r[c][:48] for c in cols))
PY
  done
fi
log done
# the device tool returns at most 8 files: pack the logs into one archive
(cd "$OUT" && tar czf logs.tgz --exclude logs.tgz --exclude '*.json' --exclude '*.png' * &&
  find . -type f ! -name logs.tgz ! -name '*.json' ! -name '*.png' -delete)
