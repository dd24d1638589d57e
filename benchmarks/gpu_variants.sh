#!/usr/bin/env bash
# One device call comparing builds of libsals in the same session: installs a prebuilt CUDA
# wheel (the baseline, "base"), then for each variant swaps in that variant's library, built
# elsewhere (`cmake --build BUILD --target sals test_cuda_vs_cpu`, the library xz-compressed to
# fit the device's transfer limit). Variant v lives in .gpu/v/: libsals.so.2.xz (or
# libsals.so.2) and test_cuda_vs_cpu, the CUDA-vs-CPU test linked against it.
#   WHEEL=.whl/base/sals-*.whl STEPS="cvc bench san" CVC="v1" VARIANTS="base v1" SANV="v1" \
#     bash benchmarks/gpu_variants.sh
# cvc: the CUDA-vs-CPU test of each CVC variant; bench: `python -m sals bench attention` (the
# BENCH_ARGS settings) once per VARIANTS entry, JSON to $OUT/bench_v.json; san: compute-sanitizer
# (TOOLS, default memcheck and racecheck) over the test of each SANV variant.
set -u
OUT=${OUT:-$PWD/gpu-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
STEPS=${STEPS:-"cvc bench"}
has() { [[ " $STEPS " == *" $1 "* ]]; }
log() { echo "== $* ($(date +%T))"; }
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
python3 -m pip install -q --no-deps --force-reinstall ${WHEEL:-.whl/base/*.whl} > /tmp/pip.log 2>&1 ||
  { tail /tmp/pip.log; exit 1; }
SP=$(cd /tmp && python3 -c "import sals, os; print(os.path.dirname(sals.__file__))")
LIBS=$(ls "$SP"/lib/libsals.so*) # the wheel holds copies, not links: each is replaced
cp "$SP/lib/libsals.so.2" /tmp/libsals.base
for v in ${CVC:-} ${VARIANTS:-} ${SANV:-}; do
  [ "$v" = base ] || [ -f ".gpu/$v/libsals.so.2" ] || xz -dc ".gpu/$v/libsals.so.2.xz" > ".gpu/$v/libsals.so.2"
done
use() {
  local src=/tmp/libsals.base
  [ "$1" = base ] || src=".gpu/$1/libsals.so.2"
  for f in $LIBS; do cp "$src" "$f"; done
}
if has cvc; then
  for v in ${CVC:-}; do
    log "cvc $v"
    LD_LIBRARY_PATH=$PWD/.gpu/$v timeout 300 ".gpu/$v/test_cuda_vs_cpu" > "$OUT/cvc_$v.log" 2>&1
    echo "rc=$?"
    grep -E "FAIL|passed|failed" "$OUT/cvc_$v.log" | tail -8
  done
fi
if has bench; then
  for v in ${VARIANTS:-base}; do
    use "$v"
    log "bench $v"
    (cd /tmp && timeout ${BENCH_TIMEOUT:-300} python3 -m sals bench attention \
      ${BENCH_ARGS:---contexts 4096,32768 --batches 1,16 --settings sals-12.5} \
      --out "$OUT/bench_$v.json" 2>&1 | grep -v "launches per step")
  done
fi
if has san; then
  for v in ${SANV:-}; do
    for tool in ${TOOLS:-memcheck racecheck}; do
      log "$tool $v"
      LD_LIBRARY_PATH=$PWD/.gpu/$v timeout ${SAN_TIMEOUT:-330} compute-sanitizer --tool "$tool" \
        --error-exitcode 9 ".gpu/$v/test_cuda_vs_cpu" > "$OUT/${tool}_$v.log" 2>&1
      echo "rc=$?"
      tail -3 "$OUT/${tool}_$v.log"
    done
  done
fi
log done
