#!/usr/bin/env bash
# Everything this folder needs from a GPU session, in one run from the repository root:
#   1. the CUDA correctness tests (tests/test_gpu.py: CUDA vs CPU in fp32, autocast finite, A-ViT host syncs);
#   2. the benchmark grid of `make bench-gpu`, written to benchmarks/bench.md and benchmarks/bench.csv.
# Extra arguments go to the grid (e.g. --methods tome diffrate, --compile-batch-sizes 64 256).
set -euo pipefail
PY=${PY:-.venv/bin/python}
"$PY" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name())"
"$PY" -m pytest -p no:cacheprovider -q -m gpu tests/test_gpu.py
"$PY" tools/benchmark.py --all --compile --out benchmarks "$@"
