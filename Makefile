# Two entry points, each sets everything up in .venv first:
#   make demo   -- the main job on the embedded default (tiny Llama + LoRA, curvature, LaLoRA training)
#   make test   -- the test suite
# torch is pinned to the CPU build used here. GPU users: install your CUDA torch into .venv first
# and run with TORCH= (empty) so that it is kept, e.g. `make test TORCH=`.
PY ?= python3
VENV := .venv
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin

.PHONY: setup demo test bench peers
setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml setup.py
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	[ -z "$(TORCH)" ] || $(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[dev,plot]"
	touch $@

demo: setup
	$(BIN)/lalora demo

test: setup peers
	$(BIN)/python -m pytest -q

bench: setup
	$(BIN)/lalora bench --out benchmarks/results/lalora_bench
	$(BIN)/python benchmarks/bench_penalty_cpu.py
	$(BIN)/python benchmarks/bench_capture_cpu.py
	$(BIN)/python benchmarks/bench_distributed_cpu.py

# curvlinops (the peer `lalora bench` compares against and the tests cross-check) without letting
# it replace the pinned torch: its backpack dependency would pull torchvision and a newer torch.
peers: $(VENV)/.peers

$(VENV)/.peers: $(VENV)/.installed
	$(BIN)/python -m pip install -q --no-deps curvlinops-for-pytorch backpack-for-pytorch einconv \
	  linear_operator opt-einsum unfoldNd einops scipy
	touch $@
