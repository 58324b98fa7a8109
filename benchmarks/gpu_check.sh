#!/usr/bin/env bash
# The GPU check in one go (< 7 minutes): correctness of the Triton backend on the GPU,
# torch.compile tracing into the kernels, then the kernel benchmarks against ceilings measured in
# the same run. Everything is written under $OUT (default benchmarks/results/gpu); a short table
# is printed last. Runs from the repository root with the machine's own python3/torch/triton.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
OUT="${OUT:-benchmarks/results/gpu}"
mkdir -p "$OUT"
source benchmarks/gpu_env.sh

status=0
# stage limits add up to 380 s; no -x, so that one failure does not hide the other results
timeout -k 5 150 python3 -m pytest -q -p no:cacheprovider tests/test_op_*.py \
  tests/test_penalty.py tests/test_reference_math.py 2>&1 | tee "$OUT/correctness.txt" || status=1
timeout -k 5 60 python3 benchmarks/gpu_compile_check.py 2>&1 | tee "$OUT/compile.txt" || status=1
timeout -k 5 170 python3 benchmarks/bench_kernels.py --models 1b,3b,8b --layers 8b=8 --out "$OUT" \
  2>&1 | tee "$OUT/bench.txt" || status=1

echo "== summary (correctness: $( [ $status = 0 ] && echo ok || echo FAILED ))"
tail -n 4 "$OUT/correctness.txt" | grep -E "passed|failed" || true
cat "$OUT/compile.txt" | tail -n 1
sed -n '/^ceilings:/,$p' "$OUT/bench.txt"
exit $status
