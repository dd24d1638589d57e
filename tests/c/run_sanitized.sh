#!/usr/bin/env bash
# Runs the C tests under AddressSanitizer + UBSan (a separate build), then under valgrind.
#   tests/c/run_sanitized.sh [build-dir-prefix]   (default: build-sanitize, build-valgrind)
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
prefix=${1:-$root/build}
gen=(); command -v ninja >/dev/null && gen=(-G Ninja)

cmake -S "$root" -B "$prefix-sanitize" "${gen[@]}" -DSALS_CUDA=OFF -DSALS_BUILD_TESTS=ON \
  -DSALS_SANITIZE=ON -DCMAKE_BUILD_TYPE=Debug
cmake --build "$prefix-sanitize"
# allocator_may_return_null: test_errors asks for a cache larger than any address space and
# expects the library's out-of-memory error, not ASan's report of the allocation.
ASAN_OPTIONS=detect_leaks=1:abort_on_error=1:allocator_may_return_null=1 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
  ctest --test-dir "$prefix-sanitize" --output-on-failure

if command -v valgrind >/dev/null; then
  # valgrind runs one thread at a time; its default lock can hand the CPU back to the same
  # thread for ever, so the two-thread test never overlaps its calls: --fair-sched=yes
  cmake -S "$root" -B "$prefix-valgrind" "${gen[@]}" -DSALS_CUDA=OFF -DSALS_BUILD_TESTS=ON \
    -DCMAKE_BUILD_TYPE=RelWithDebInfo
  cmake --build "$prefix-valgrind"
  ctest --test-dir "$prefix-valgrind" --output-on-failure \
    --overwrite MemoryCheckCommand="$(command -v valgrind)" \
    --overwrite MemoryCheckCommandOptions="--error-exitcode=1 --leak-check=full --errors-for-leak-kinds=definite,possible --fair-sched=yes" \
    -T memcheck
else
  echo "valgrind not found: skipped" >&2
fi
