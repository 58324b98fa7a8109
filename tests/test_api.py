"""Save/load, identity checks and every documented bad-input error."""
import warnings

import pytest
import torch
from problems import batches, tiny_llama

from lalora_kernels import LaLoRARegularizer, LoRACurvature, estimate_curvature, fused_laplace_penalty


def _curv(variant="tri", **kw):
    model = tiny_llama(**kw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return model, estimate_curvature(model, batches(n=1), variant=variant, progress=False)


@pytest.mark.parametrize("variant", ["kfac", "tri", "wkfac", "diag"])
def test_save_load_round_trip_is_exact(tmp_path, variant):
    model, curv = _curv(variant, nonzero_b=variant != "kfac")
    path = tmp_path / "curv.safetensors"
    curv.save(str(path))
    back = LoRACurvature.load(str(path))
    assert back.tensors.keys() == curv.tensors.keys()
    for k, t in curv.tensors.items():
        assert torch.equal(back.tensors[k], t) and back.tensors[k].dtype == t.dtype
    for attr in ("variant", "fisher", "mc_samples", "num_tokens", "adapter_name", "model_type",
                 "adapters", "norm_constant", "version", "layout"):
        assert getattr(back, attr) == getattr(curv, attr), attr
    assert back.memory_bytes() == curv.memory_bytes()
    r1, r2 = LaLoRARegularizer(curv, 1.0), LaLoRARegularizer(back, 1.0)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.add_(0.1 * torch.randn_like(p))
    assert torch.equal(r1(model), r2(model))


def test_unknown_variant_and_fisher():
    model = tiny_llama()
    with pytest.raises(ValueError, match="variant='full' is unknown"):
        estimate_curvature(model, batches(n=1), variant="full")
    with pytest.raises(ValueError, match="fisher='true' is unknown"):
        estimate_curvature(model, batches(n=1), fisher="true")
    with pytest.raises(ValueError, match="mc_samples=0"):
        estimate_curvature(model, batches(n=1), fisher="mc", mc_samples=0)


def test_model_without_lora():
    from transformers import LlamaConfig, LlamaForCausalLM
    plain = LlamaForCausalLM(LlamaConfig(vocab_size=11, hidden_size=8, intermediate_size=8,
                                         num_hidden_layers=1, num_attention_heads=2))
    with pytest.raises(ValueError, match="no peft LoRA layers.*get_peft_model"):
        estimate_curvature(plain, batches(n=1, vocab=11))


def test_empty_batches_no_labels_and_fully_masked():
    model = tiny_llama()
    with pytest.raises(ValueError, match="batches is empty"):
        estimate_curvature(model, [], progress=False)
    b = batches(n=1)[0]
    with pytest.raises(ValueError, match="needs labels.*fisher='mc'"):
        estimate_curvature(model, [{"input_ids": b["input_ids"]}], progress=False)
    with pytest.raises(ValueError, match="must hold 'input_ids'"):
        estimate_curvature(model, [{"ids": b["input_ids"]}], progress=False)
    dead = dict(b, attention_mask=torch.zeros_like(b["attention_mask"]))
    with pytest.raises(ValueError, match="every encoder token of every batch is masked out"):
        estimate_curvature(model, [dead], progress=False)
    # mc without labels is allowed: every valid next token carries a sampled label
    curv = estimate_curvature(model, [{"input_ids": b["input_ids"]}], fisher="mc", progress=False)
    assert curv.fisher == "mc"


def test_curvature_must_match_model():
    _, curv = _curv("kfac")
    other = tiny_llama(targets=["q_proj", "v_proj"])
    with pytest.raises(ValueError, match="does not match the model's LoRA layers"):
        LaLoRARegularizer(curv, 1.0)(other)
    wider = tiny_llama(r=8)
    with pytest.raises(ValueError, match=r"\(in, out, r, scaling\).*re-estimate"):
        LaLoRARegularizer(curv, 1.0)(wider)


def test_non_finite_factors_rejected(tmp_path):
    _, curv = _curv("kfac")
    key = next(k for k in curv.tensors if k.startswith("Sg/"))
    curv.tensors[key].view(-1)[0] = float("nan")       # dense or tile-packed: the (0, 0) entry
    with pytest.raises(ValueError, match="non-finite"):
        curv.check_finite()
    with pytest.raises(ValueError, match="non-finite"):
        LoRACurvature.from_tensors([torch.ones(1, 2)], [torch.ones(3, 1)], variant="wkfac", scaling=[1.0],
                                   Sx=[torch.full((2, 2), float("inf"))], sx_index=[0], Sg=[torch.eye(3)])


def test_device_and_dtype_mismatch():
    model, curv = _curv("kfac")
    reg = LaLoRARegularizer(curv, 1.0)
    meta = [torch.empty(4, 24, device="meta")] * len(curv.adapters)
    with pytest.raises(ValueError, match=r"on meta.*\.to\('meta'\)"):
        reg.penalty(meta, meta)
    with pytest.raises(ValueError, match="float32 or all float64"):
        fused_laplace_penalty([torch.ones(1, 2)], [torch.ones(3, 1)], [torch.ones(1, 2)], [torch.ones(3, 1)],
                              variant="wkfac", scaling=[1.0], lam=1.0, Sx=[torch.eye(2, dtype=torch.float16)],
                              sx_index=[0], Sg=[torch.eye(3)])


def test_bad_regularizer_arguments():
    _, curv = _curv("kfac")
    with pytest.raises(ValueError, match="lam=-1"):
        LaLoRARegularizer(curv, -1)
    with pytest.raises(ValueError, match="prior_precision=nan"):
        LaLoRARegularizer(curv, 1.0, prior_precision=float("nan"))
    with pytest.raises(ValueError, match="normalize='trace'"):
        LaLoRARegularizer(curv, 1.0, normalize="trace")


def test_kfac_blocks_errors():
    _, curv = _curv("diag")
    with pytest.raises(ValueError, match="'diag' curvature stores no Kronecker factors"):
        curv.kfac_blocks(next(iter(curv.adapters)))
    _, curv = _curv("kfac")
    with pytest.raises(KeyError, match="not in this curvature"):
        curv.kfac_blocks("nope")


def test_load_rejects_foreign_file(tmp_path):
    from safetensors.torch import save_file
    path = str(tmp_path / "x.safetensors")
    save_file({"w": torch.ones(2)}, path)
    with pytest.raises(ValueError, match="not a LoRACurvature file"):
        LoRACurvature.load(path)
