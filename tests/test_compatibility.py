"""The compatibility table of the README, a test per row: each architecture and each peft option,
curvature against the from-scratch oracle (bruteforce.base_factors) on a tiny config-built model."""
import warnings

import pytest
import torch
import torch.nn.functional as F
from bruteforce import base_factors
from peft import LoraConfig, get_peft_model
from transformers import AutoConfig, AutoModelForCausalLM

from lalora_kernels import estimate_curvature

V = 37
SMALL = dict(vocab_size=V, hidden_size=16, intermediate_size=24, num_hidden_layers=1, num_attention_heads=2)
ARCHITECTURES = {
    "llama": dict(SMALL, num_key_value_heads=1),
    "mistral": dict(SMALL, num_key_value_heads=1),
    "qwen2": dict(SMALL, num_key_value_heads=1),
    "gemma": dict(SMALL, num_key_value_heads=1, head_dim=8),
    "gemma2": dict(SMALL, num_key_value_heads=1, head_dim=8),
    "phi3": dict(SMALL, num_key_value_heads=2, pad_token_id=0),
    "gpt_neox": dict(SMALL),
    "opt": dict(vocab_size=V, hidden_size=16, ffn_dim=24, num_hidden_layers=1, num_attention_heads=2,
                word_embed_proj_dim=16),
    "falcon": dict(vocab_size=V, hidden_size=16, num_hidden_layers=1, num_attention_heads=2),
    "bloom": dict(vocab_size=V, hidden_size=16, n_layer=1, n_head=2),
    "gpt2": dict(vocab_size=V, n_embd=16, n_layer=1, n_head=2),
}


def _data(left_pad=False, seed=1):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(2):
        ids = torch.randint(1, V, (3, 7), generator=g)
        lengths = torch.randint(3, 8, (3,), generator=g)
        pos = torch.arange(7)[None]
        mask = (pos >= 7 - lengths[:, None]) if left_pad else (pos < lengths[:, None])
        out.append({"input_ids": ids, "attention_mask": mask.long(), "labels": ids.masked_fill(~mask, -100)})
    return out


def _causal_loss(m, b):
    logits = m(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[:, :-1]
    return (F.cross_entropy(logits.double().flatten(0, 1), b["labels"][:, 1:].flatten(), ignore_index=-100,
                            reduction="sum"), {"encoder": b["attention_mask"]})


def _check(model, data, dtype=torch.float64, rtol=1e-10):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        curv = estimate_curvature(model, data, variant="wkfac", progress=False, storage="dense")
    ref = base_factors(model, data, _causal_loss, lambda n: "encoder")
    assert set(curv.adapters) == set(ref) and ref
    for name, f in ref.items():
        for got, want in ((curv.sx(name), f["Sx"]), (curv.dense(f"Sg/{name}"), f["Sg"])):
            scale = float(want.abs().max())
            assert float((got.double() - want).abs().max()) <= rtol * scale, name


def _model(model_type, dtype=torch.float64, **lora):
    torch.manual_seed(0)
    cfg = AutoConfig.for_model(model_type, **ARCHITECTURES.get(model_type, ARCHITECTURES["llama"]))
    for k in ("hidden_dropout", "attention_dropout", "resid_pdrop", "embd_pdrop", "attn_pdrop", "dropout"):
        if hasattr(cfg, k):
            setattr(cfg, k, 0.0)
    base = AutoModelForCausalLM.from_config(cfg)
    lora = {"r": 2, "lora_alpha": 4, "target_modules": "all-linear", **lora}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")            # pissa/olora initialise in fp32, then the model is cast
        model = get_peft_model(base, LoraConfig(**lora)).to(dtype)
    if lora.get("init_lora_weights", True) is True:
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.3)
    return model


@pytest.mark.parametrize("model_type", list(ARCHITECTURES))
def test_architecture(model_type):
    _check(_model(model_type), _data())


PEFT_OPTIONS = {
    "pissa init": dict(init_lora_weights="pissa"),
    "olora init": dict(init_lora_weights="olora"),
    "gaussian init": dict(init_lora_weights="gaussian"),
    "rslora": dict(use_rslora=True),
    "lora_dropout": dict(lora_dropout=0.3),
    "rank and alpha patterns": dict(rank_pattern={"q_proj": 4}, alpha_pattern={"v_proj": 7}),
    "target lm_head": dict(target_modules=["q_proj", "lm_head"]),
}


@pytest.mark.parametrize("option", list(PEFT_OPTIONS))
def test_peft_option(option):
    _check(_model("llama", **PEFT_OPTIONS[option]), _data())


def test_left_padding():
    _check(_model("llama"), _data(left_pad=True))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_models(dtype):
    """bf16/fp16 models: factors in fp32 from half-precision activations, against the oracle on the
    same model (its products in float64 from the same half-precision activations)."""
    model = _model("llama", dtype=dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        curv = estimate_curvature(model, _data(), variant="wkfac", progress=False, storage="dense")
    assert curv.factor_dtype == torch.float32
    ref = base_factors(model, _data(), _causal_loss, lambda n: "encoder")
    for name, f in ref.items():
        scale = float(f["Sx"].abs().max())
        assert float((curv.sx(name).double() - f["Sx"]).abs().max()) <= 1e-5 * scale, name
