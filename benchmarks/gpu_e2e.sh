#!/usr/bin/env bash
# The end-to-end GPU benchmark in one go (< 8 minutes on an H200): benchmarks/gpu_e2e.py at the
# Llama-3.2-1B, 3.2-3B and 3.1-8B shapes, everything written under $OUT (default
# benchmarks/results/gpu_e2e). Runs from the repository root with the machine's own python3 and
# torch. curvlinops and its pure-Python dependencies that the GPU machine lacks travel as wheels in
# .whl/ (benchmarks/gpu_peer_wheels.sh fetches them on a machine with a package index).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
OUT="${OUT:-benchmarks/results/gpu_e2e}"
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/peers .whl/*.whl \
    && export PYTHONPATH="$PYTHONPATH:/tmp/peers"
fi
source benchmarks/gpu_env.sh
timeout -k 10 470 python3 benchmarks/gpu_e2e.py --sizes 1b,3b,8b --budget 330 --out "$OUT" 2>&1 | tee "$OUT/run.txt"
