# The two commands of the README: `make demo` (the main job on the embedded default) and `make test`.
# Both create .venv with the pinned set of versions (constraints.txt) when it is missing or out of date.
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_WORKERS ?= 2

.PHONY: demo test test-heavy test-gpu benchmark bench-gpu clean-venv

$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e '.[dev,slurm,export]'
	touch $@

demo: $(VENV)/.installed
	$(PY) tools/compare.py

test: $(VENV)/.installed
	$(PY) -m pytest -n $(PYTEST_WORKERS) -q

# Multi-process end-to-end runs of the papers' commands (torchrun, 2 CPU processes); slower.
test-heavy: $(VENV)/.installed
	$(PY) -m pytest -m heavy -q

# Every method against its baseline in one process (GPU: fp16/bf16, batch 1/64/256, eager and compiled; CPU: a
# reduced grid); writes benchmarks/bench.md and benchmarks/bench.csv.
bench-gpu: $(VENV)/.installed
	$(PY) tools/benchmark.py --all --compile --out benchmarks

# CUDA checks (forward on the GPU equals the CPU's, autocast finite, A-ViT's host syncs); skipped without a GPU.
test-gpu: $(VENV)/.installed
	$(PY) -m pytest -q -m gpu tests/test_gpu.py

clean-venv:
	rm -rf $(VENV)
