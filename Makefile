# Two entry points, each sets everything up in .venv first:
#   make demo   -- the main job on the embedded default (tiny Llama + LoRA, curvature, LaLoRA training)
#   make test   -- the test suite
# torch is pinned to the CPU build used here. GPU users: install your CUDA torch into .venv first
# and run with TORCH= (empty) so that it is kept, e.g. `make test TORCH=`.
PY ?= python3
VENV := .venv
TORCH ?= torch==2.13.0
# every other package at the versions the suite last passed with (constraints.txt); CONSTRAINTS=
# (empty) lets pip resolve the newest ones instead, and is the default with your own torch (TORCH=),
# whose triton the pins must not replace
CONSTRAINTS ?= $(if $(TORCH),constraints.txt)
PIPC := $(if $(CONSTRAINTS),-c $(CONSTRAINTS))
BIN := $(VENV)/bin

.PHONY: setup demo test bench peers experiment
setup: $(VENV)/.installed

# --no-build-isolation: setup.py builds the C++ CPU kernels (lalora_kernels._C, from csrc/) against
# the torch installed here; an isolated build would not see torch and would skip them.
$(VENV)/.installed: pyproject.toml setup.py $(wildcard csrc/*.cpp csrc/*.h) $(CONSTRAINTS)
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	[ -z "$(TORCH)" ] || $(BIN)/python -m pip install -q $(PIPC) "$(TORCH)"
	$(BIN)/python -m pip install -q $(PIPC) "setuptools>=68" wheel ninja
	$(BIN)/python -m pip install -q $(PIPC) --no-build-isolation -e ".[dev,plot]"
	$(BIN)/python -c "import lalora_kernels as L; b = L.backends(); assert b['cpp']['available'] or '$(LALORA_BUILD_CPP)' == '0', b; print('backends:', b['cpu'], b['default_storage'])"
	touch $@

demo: setup
	$(BIN)/lalora demo

# LaLoRA against the anti-forgetting methods peft users can pick, on Python's documentation (~65 min)
experiment: setup
	$(BIN)/lalora experiment --out lalora_experiment_out

# The suite runs on the default backends (C++ and packed factors on CPU), then the tests that
# exercise the ops, penalty and capture again on the pure-PyTorch reference (dense factors), then
# the kernel tests on the other CPU code paths this machine can take, so that no result depends on
# the CPU CI happens to run on: our C++ kernels, ATen and MKL each capped at AVX2, then at their
# generic paths. (Inductor miscompiles under a capped ATEN_CPU_CAPABILITY; the -m filter leaves
# its two tests to the first pass.)
KERNEL_TESTS := tests/test_op_*.py tests/test_cpu_kernels.py tests/test_packed_format.py tests/test_capture.py
test: setup peers
	$(BIN)/python -m pytest -q
	LALORA_BACKEND=torch $(BIN)/python -m pytest -q tests/test_penalty.py tests/test_capture.py \
	  tests/test_compile.py tests/test_api.py tests/test_distributed.py
	LALORA_CPU_CAPABILITY=avx2 ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2 \
	  $(BIN)/python -m pytest -q -m "not inductor" $(KERNEL_TESTS)
	LALORA_CPU_CAPABILITY=default ATEN_CPU_CAPABILITY=default MKL_ENABLE_INSTRUCTIONS=SSE4_2 \
	  $(BIN)/python -m pytest -q -m "not inductor" $(KERNEL_TESTS)

bench: setup
	$(BIN)/python -m pytest -q benchmarks/ --benchmark-only --benchmark-autosave
	$(BIN)/lalora bench --repeats 5 --out benchmarks/results/lalora_bench
	$(BIN)/python benchmarks/bench_penalty_cpu.py
	$(BIN)/python benchmarks/bench_capture_cpu.py
	$(BIN)/python benchmarks/bench_distributed_cpu.py
	$(BIN)/python benchmarks/bench_packed_cpu.py

# curvlinops (the peer `lalora bench` compares against and the tests cross-check) without letting
# it replace the pinned torch: its backpack dependency would pull torchvision and a newer torch.
peers: $(VENV)/.peers

$(VENV)/.peers: $(VENV)/.installed $(CONSTRAINTS)
	$(BIN)/python -m pip install -q $(PIPC) --no-deps curvlinops-for-pytorch backpack-for-pytorch einconv \
	  linear_operator opt-einsum unfoldNd einops scipy
	touch $@
