"""Misuse of the API: each case gives a clear error that names the argument and the fix, never a silently wrong result."""
import json
import warnings

import numpy as np
import pytest
import torch
from problems import batches, tiny_llama
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import BatchEncoding

from lalora_kernels import LaLoRARegularizer, LaplacePenalty, LoRACurvature, estimate_curvature
from lalora_kernels.lora_layers import find_lora_layers


def _curv(variant="kfac", model=None, **kw):
    model = tiny_llama(**kw) if model is None else model
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return model, estimate_curvature(model, batches(n=1), variant=variant, progress=False)


def _perturb(model, adapter=None, scale=0.1):
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n and (adapter is None or f".{adapter}." in n):
                p.add_(scale * torch.randn_like(p))


def test_regularizer_follows_the_active_adapter_and_merges():
    model, curv = _curv()
    reg = LaLoRARegularizer(curv, 1.0)
    _perturb(model)
    v_default = reg(model)
    model.add_adapter("other", model.peft_config["default"])
    model.set_adapter("other")                   # same shapes: it must not be penalised against default's anchors
    _perturb(model, "other", 0.5)
    with pytest.raises(ValueError, match="active adapter is 'other'"):
        reg(model)
    model.set_adapter("default")
    assert torch.equal(reg(model), v_default)
    model.merge_adapter()
    with pytest.raises(ValueError, match="merged"):
        reg(model)


def test_batch_encoding_batches_are_accepted():
    model = tiny_llama()
    b = batches(n=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        want = estimate_curvature(model, b, variant="kfac", progress=False)
        got = estimate_curvature(model, [BatchEncoding(x) for x in b], variant="kfac", progress=False)
    for k, t in want.tensors.items():
        assert torch.equal(got.tensors[k], t), k


def test_estimate_under_no_grad_inference_mode_and_disabled_adapters():
    model = tiny_llama()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        want = estimate_curvature(model, batches(n=1), progress=False)
        with torch.no_grad():
            got = estimate_curvature(model, batches(n=1), progress=False)
        for k, t in want.tensors.items():
            assert torch.equal(got.tensors[k], t), k
        with torch.inference_mode(), pytest.raises(RuntimeError, match="inference_mode"):
            estimate_curvature(model, batches(n=1), progress=False)
        with model.disable_adapter(), pytest.raises(ValueError, match="disabled"):
            estimate_curvature(model, batches(n=1), progress=False)


@pytest.mark.parametrize("variant", ["diag", "kfac", "tri", "wkfac"])
def test_wrong_weight_shapes_are_rejected(variant):
    model, curv = _curv(variant, nonzero_b=True)
    pen = LaplacePenalty(curv, 1.0)
    refs = {r.name: r for r in find_lora_layers(model)}
    A = [refs[n].A.detach().clone() for n in pen.names]
    B = [refs[n].B.detach().clone() for n in pen.names]
    pen(A, B)
    for bad_A, bad_B in ((A[:1][0][:1], B[0]), (A[0], B[0][:, :1]), (A[0].reshape(-1), B[0])):
        with pytest.raises(ValueError, match="curvature.adapters order"):
            pen([bad_A] + A[1:], [bad_B] + B[1:])


def test_from_tensors_checks_every_shape():
    g = torch.Generator().manual_seed(0)
    A0, B0 = torch.randn(3, 6, generator=g), torch.randn(5, 3, generator=g)
    X, Y = torch.randn(20, 6, generator=g), torch.randn(20, 5, generator=g)
    kw = dict(variant="kfac", scaling=[2.0], Sx=[X.T @ X], sx_index=[0], Sg=[Y.T @ Y])
    LoRACurvature.from_tensors([A0], [B0], **kw)
    with pytest.raises(ValueError, match=r"'Caa/adapter0' has shape \(1, 1\)"):
        LoRACurvature.from_tensors([A0], [B0], Caa=[torch.eye(1)], **kw)
    with pytest.raises(ValueError, match="same r"):
        LoRACurvature.from_tensors([A0], [B0[:, :2]], **kw)
    with pytest.raises(ValueError, match=r"'FA/adapter0' has shape \(1, 6\)"):
        LoRACurvature.from_tensors([A0], [B0], variant="diag", scaling=[2.0], FA=[A0[:1] ** 2], FB=[B0 ** 2])


def test_penalty_keeps_its_dtype():
    model, curv = _curv()
    reg = LaLoRARegularizer(curv, 1.0)
    _perturb(model)
    want = reg(model)
    assert reg.penalty.anchor_A.dtype == torch.float64          # the test model is fp64
    for move in (lambda m: m.to(torch.bfloat16), lambda m: m.half(), lambda m: m.float(),
                 lambda m: m.to("cpu", torch.float16)):
        with pytest.raises(ValueError, match=r"curvature.to\(dtype="):
            move(reg)
    assert torch.equal(reg.to("cpu")(model), want)


@pytest.mark.parametrize("variant", ["diag", "kfac", "tri", "wkfac"])
def test_double_backward_is_refused(variant):
    model, curv = _curv(variant, nonzero_b=True)
    reg = LaLoRARegularizer(curv, 1.0)
    _perturb(model)
    A = [r.A for r in find_lora_layers(model)]
    torch.autograd.grad(reg(model), A)                       # first order: fine
    with pytest.raises(RuntimeError, match="first derivatives only"):
        torch.autograd.grad(reg(model), A, create_graph=True)


def test_lam_accepts_numpy_and_0d_tensors():
    model, curv = _curv()
    _perturb(model)
    want = LaLoRARegularizer(curv, 0.5, prior_precision=0.25)(model)
    for lam, delta in ((np.float32(0.5), np.float64(0.25)), (torch.tensor(0.5), torch.tensor(0.25))):
        assert torch.equal(LaLoRARegularizer(curv, lam, prior_precision=delta)(model), want)
    for bad in (True, torch.tensor([0.5, 1.0]), "0.5", np.float32("nan")):
        with pytest.raises(ValueError, match="lam="):
            LaLoRARegularizer(curv, bad)


def test_load_names_unknown_adapters_fields_and_missing_tensors(tmp_path):
    _, curv = _curv("tri", nonzero_b=True)
    path = str(tmp_path / "c.safetensors")
    curv.save(path)
    with pytest.raises(ValueError, match="are not in"):
        LoRACurvature.load(path, adapters=["nope"])
    with safe_open(path, framework="pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    fields = json.loads(meta["lalora"])
    future = str(tmp_path / "future.safetensors")
    save_file(tensors, future, metadata={"lalora": json.dumps({**fields, "new_field": 1})})
    with pytest.raises(ValueError, match="new_field"):
        LoRACurvature.load(future)
    for kind in ("Caa", "Sg", "Ka"):
        key = next(k for k in tensors if k.startswith(kind + "/"))
        partial = str(tmp_path / f"no_{kind}.safetensors")
        save_file({k: t for k, t in tensors.items() if k != key}, partial, metadata=meta)
        with pytest.raises(ValueError, match=f"(needs|reads) {kind}/"):
            LoRACurvature.load(partial)


def test_compiled_model_has_the_same_layer_names():
    model = tiny_llama()
    plain = [r.name for r in find_lora_layers(model)]
    assert [r.name for r in find_lora_layers(torch.compile(model))] == plain


def test_empty_backend_variable_means_auto(monkeypatch):
    from lalora_kernels import ops
    monkeypatch.setenv("LALORA_BACKEND", "")
    assert ops.backend() == "auto"


@pytest.mark.parametrize("variant", ["diag", "kfac", "tri"])
def test_from_tensors_skips_the_factors_of_zero_blocks(variant):
    """Passing Sx (or an all-zero FA, as it is when B* = 0) for an adapter with B* = 0 changes
    nothing: the block is exactly zero, so its factor is not kept, counted in mean_diag, nor read
    (SPEC section 5)."""
    from problems import LAYOUT, penalty_problem as _problem
    p = _problem(torch.float64)                      # adapter 2 has B* = 0
    caa = [a @ p["Sx"][j] @ a.T for a, (*_, j) in zip(p["A0"], LAYOUT)]
    every = [j for *_, j in LAYOUT]
    needed = [None if k == 2 and variant != "diag" else j for k, j in enumerate(every)]
    kw = dict(variant=variant, scaling=p["scaling"], Sx=p["Sx"], Sg=p["Sg"], Caa=caa if variant != "diag" else None,
              FB=p["FB"] if variant == "diag" else None)
    fa_needed = [None if k == 2 else f for k, f in enumerate(p["FA"])]
    lean = LoRACurvature.from_tensors(p["A0"], p["B0"], sx_index=needed,
                                      FA=fa_needed if variant == "diag" else None, **kw)
    fa_zero = [torch.zeros_like(f) if k == 2 else f for k, f in enumerate(p["FA"])]
    given = LoRACurvature.from_tensors(p["A0"], p["B0"], sx_index=every,
                                       FA=fa_zero if variant == "diag" else None, **kw)
    assert given.tensors.keys() == lean.tensors.keys()
    assert given.norm_constant == lean.norm_constant and given.memory_bytes() == lean.memory_bytes()
    values = [LaplacePenalty(c, 1.0)(p["A"], p["B"]) for c in (lean, given)]
    torch.testing.assert_close(values[0], values[1], rtol=1e-12, atol=0)


def test_asymmetric_factors_from_tensors():
    """A caller's factor that is symmetric only to rounding (a GEMM's X.T @ X) is mirrored from its
    upper triangle, so dense and packed storage agree exactly; a clearly asymmetric one is refused."""
    from problems import SX_INDEX, penalty_problem
    p = penalty_problem(zero_b=())
    X = torch.randn(50, 7, dtype=torch.float64)
    rounding = X.T @ X / 50
    rounding[0, 1] += 1e-7                           # a BLAS's rounding in one triangle, exaggerated
    Sx = [rounding] + p["Sx"][1:]
    kw = dict(variant="wkfac", scaling=p["scaling"], Sx=Sx, sx_index=SX_INDEX, Sg=p["Sg"])
    dense = LoRACurvature.from_tensors(p["A0"], p["B0"], **kw)
    packed = LoRACurvature.from_tensors(p["A0"], p["B0"], **kw).to_layout("packed", 8)
    assert torch.equal(dense.dense("Sx/input0"), packed.dense("Sx/input0"))
    vd = LaplacePenalty(dense, lam=1.0)(p["A"], p["B"])
    vp = LaplacePenalty(packed, lam=1.0)(p["A"], p["B"])
    torch.testing.assert_close(vd, vp, rtol=1e-12, atol=0)
    bad = [torch.randn(7, 7, dtype=torch.float64)] + p["Sx"][1:]
    with pytest.raises(ValueError, match=r"Sx\[0\] is not symmetric"):
        LoRACurvature.from_tensors(p["A0"], p["B0"], **dict(kw, Sx=bad))


@pytest.mark.parametrize("batch,match", [
    ({"input_ids": torch.tensor([[1, 2, 99]]), "labels": torch.tensor([[1, 2, 99]])}, "embedding has 37 rows"),
    ({"input_ids": torch.ones(2, 5, dtype=torch.long), "attention_mask": torch.ones(2, 4, dtype=torch.long),
      "labels": torch.ones(2, 5, dtype=torch.long)}, r"attention_mask has shape \(2, 4\)"),
    ({"input_ids": torch.ones(2, 0, dtype=torch.long), "labels": torch.ones(2, 0, dtype=torch.long)},
     "at least one sequence of at least one token"),
    ({"input_ids": torch.ones(0, 5, dtype=torch.long), "labels": torch.ones(0, 5, dtype=torch.long)},
     "at least one sequence"),
])
def test_capture_refuses_malformed_batches(batch, match):
    with pytest.raises(ValueError, match=match):
        estimate_curvature(tiny_llama(), [batch], progress=False)


def test_capture_refuses_an_overflowing_tile():
    with pytest.raises(ValueError, match="tile=4294967296 must be a power of two from 1 to 64"):
        estimate_curvature(tiny_llama(), batches(1), progress=False, storage="packed", tile=2**32)
