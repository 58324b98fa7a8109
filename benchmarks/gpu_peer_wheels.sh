#!/usr/bin/env bash
# Fetch, into .whl/ (ignored by git), the pure-Python wheels that gpu_e2e.sh installs on the GPU
# machine, which has no package index: curvlinops and the dependencies its image lacks.
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx "/.whl/" .git/info/exclude 2>/dev/null || echo "/.whl/" >> .git/info/exclude
python3 -m pip download -q --no-deps --only-binary=:all: -d .whl curvlinops-for-pytorch==3.0.1 \
  backpack-for-pytorch==1.7.1 einconv==0.1.0 unfoldNd==0.2.3
ls -la .whl
