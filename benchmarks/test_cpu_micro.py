"""CPU micro-benchmarks in pytest-benchmark: the penalty step, the curvature capture, the packed
factor update and the grouped product, each on the reference (dense factors) and the C++ kernels
(tile-packed factors), so that a regression between commits shows up in ``--benchmark-compare``.

    pytest benchmarks/ --benchmark-only --benchmark-autosave        # saves .benchmarks/*.json
    pytest benchmarks/ --benchmark-only --benchmark-compare         # against the last saved run

The ratio tables in docs/benchmarks.md come from the scripts beside this file, which time the
paths in alternation.
"""
import warnings

import pytest
import torch

from lalora_kernels import LaLoRARegularizer, estimate_curvature
from lalora_kernels.apps.tiny import llama_lora, random_batches
from lalora_kernels.gram_meta import GramMeta
from lalora_kernels.reference.packed_format import TILE, pack, packed_numel

BACKENDS = [("torch", "dense"), ("auto", "packed")]      # the reference, and the CPU default (C++)
VARIANTS = ["diag", "kfac", "tri", "wkfac"]


@pytest.fixture(params=BACKENDS, ids=[b for _, b in BACKENDS])
def storage(request, monkeypatch):
    backend, layout = request.param
    monkeypatch.setenv("LALORA_BACKEND", backend)
    return layout


def _model(layers=4, hidden=256):
    torch.manual_seed(0)
    return llama_lora(hidden=hidden, inter=2 * hidden + hidden // 2, layers=layers, heads=8, kv_heads=4,
                      vocab=256, r=8, nonzero_b=0.02)


@pytest.mark.parametrize("variant", VARIANTS)
def test_penalty_step(benchmark, storage, variant):
    model = _model()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        curv = estimate_curvature(model, random_batches(1, 2, 32, 256), variant=variant, progress=False,
                                  storage=storage)
    reg = LaLoRARegularizer(curv, lam=1.0)
    benchmark(lambda: reg(model).backward())


@pytest.mark.parametrize("variant", VARIANTS)
def test_capture(benchmark, storage, variant):
    model = _model(layers=2, hidden=128)
    data = random_batches(2, 4, 64, 256)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        benchmark(lambda: estimate_curvature(model, data, variant=variant, progress=False, storage=storage))


@pytest.mark.parametrize("n", [1024])
def test_factor_update(benchmark, storage, n):
    X = torch.randn(2048, n)
    if storage == "packed":
        P = torch.zeros(packed_numel(n, TILE))
        benchmark(lambda: torch.ops.lalora.packed_cov_update_(P, X, None, 1.0, TILE))
    else:
        S = torch.zeros(n, n)
        benchmark(lambda: torch.ops.lalora.cov_update_(S, X, None, 1.0))


@pytest.mark.parametrize("R", [8, 64])
def test_grouped_product(benchmark, storage, R):
    n, m = 1024, 8
    S = torch.randn(n, n)
    S = (S + S.T) / n
    tile = TILE if storage == "packed" else 0
    arena = torch.cat([pack(S, TILE) if tile else S.reshape(-1)] * m)
    classes = GramMeta.build([(n, R, m)], tile).classes
    D = torch.randn(m * R * n)
    benchmark(lambda: torch.ops.lalora.grouped_gram(D, arena, classes, tile))
