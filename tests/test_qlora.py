"""QLoRA: LoRA on a 4-bit (NF4) or 8-bit (LLM.int8) base through bitsandbytes' CPU backend, loaded the
way users load it (from_pretrained with a BitsAndBytesConfig, prepare_model_for_kbit_training, peft's
bnb LoRA layers). The curvature is checked against the from-scratch oracle on the quantised model
itself, and curvature and penalty against the same LoRA on the dequantised model (a plain fp32 Llama
whose weights are the quantised ones decoded)."""
import copy
import warnings

import bitsandbytes as bnb
import pytest
import torch
from bruteforce import base_factors
from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
from problems import batches
from test_compatibility import _causal_loss
from transformers import BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM

from lalora_kernels import LaLoRARegularizer, estimate_curvature


TARGETS = ["q_proj", "v_proj", "o_proj", "gate_proj", "down_proj"]


def _quiet(fn, *a, **k):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*a, **k)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("base")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=37, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)
    _quiet(LlamaForCausalLM(cfg).save_pretrained, path)
    return path


def _decoded(layer) -> torch.Tensor:
    """The weight a bitsandbytes layer multiplies by, decoded to fp32."""
    w = layer.weight
    if isinstance(layer, bnb.nn.Linear4bit):
        return bnb.functional.dequantize_4bit(w.data, w.quant_state).float()
    return bnb.functional.int8_vectorwise_dequant(w.data, w.SCB).float()


def _models(folder, bits):
    quant = (BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
             if bits == 4 else BitsAndBytesConfig(load_in_8bit=True))
    q = _quiet(LlamaForCausalLM.from_pretrained, folder, quantization_config=quant, device_map="cpu",
               dtype=torch.float32)
    kind = bnb.nn.Linear4bit if bits == 4 else bnb.nn.Linear8bitLt
    assert isinstance(q.model.layers[0].self_attn.q_proj, kind)
    for m in q.modules():
        if isinstance(m, bnb.nn.Linear4bit):
            # in eval mode, on CPUs with AVX512-BF16, bitsandbytes repacks a 4-bit weight for a bf16
            # inference kernel whenever an input needs no gradient: the curvature would then come from
            # bf16 products on some CI machines and fp32 ones on others
            m.support_avx512bf16_for_cpu = False
    d = _quiet(LlamaForCausalLM.from_pretrained, folder, dtype=torch.float32)
    with torch.no_grad():
        for name, m in q.named_modules():
            if isinstance(m, kind):
                d.get_submodule(name).weight.copy_(_decoded(m))
    q = prepare_model_for_kbit_training(q, use_gradient_checkpointing=False)
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, lora_dropout=0.0)
    q, d = _quiet(get_peft_model, q, cfg), _quiet(get_peft_model, d, copy.deepcopy(cfg))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():                         # a non-zero B: both blocks of each factor are live
        for (n, p), (n2, p2) in zip(q.named_parameters(), d.named_parameters()):
            if "lora_" in n:
                assert n == n2
                if "lora_B" in n:
                    p.normal_(0, 0.2, generator=g)
                p2.copy_(p)
    return q.eval(), d.eval()


@pytest.mark.parametrize("bits", [4, 8])
def test_qlora_curvature_matches_the_oracle_on_the_quantised_model(folder, bits):
    q, _ = _models(folder, bits)
    data = batches(n=2, bsz=3, seq=7)
    curv = _quiet(estimate_curvature, q, data, variant="wkfac", progress=False, storage="dense")
    ref = _quiet(base_factors, q, data, _causal_loss, lambda n: "encoder")
    assert set(curv.adapters) == set(ref) and len(ref) == 2 * len(TARGETS)
    for name, f in ref.items():
        for got, want in ((curv.sx(name), f["Sx"]), (curv.dense(f"Sg/{name}"), f["Sg"])):
            assert float((got.double() - want).abs().max()) <= 1e-5 * float(want.abs().max()), name


# How far the quantised model's own arithmetic is from the dequantised model's. 4-bit: bitsandbytes
# decodes the weight and multiplies in fp32 (its bf16 CPU inference kernel is switched off in _models),
# so only summation order can differ (here: nothing, bit for bit). 8-bit: LLM.int8 rounds each input
# row to int8 through fp16, about 1/127 per activation, which reaches the factors and the penalty at
# the percent level (1.3e-2 measured). A capture that read the wrong tensors would be off by O(1).
TOL = {4: 1e-6, 8: 5e-2}


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("variant", ["kfac", "wkfac"])
def test_qlora_curvature_and_penalty_follow_the_dequantised_model(folder, bits, variant):
    q, d = _models(folder, bits)
    data = batches(n=2, bsz=3, seq=7)
    cq = _quiet(estimate_curvature, q, data, variant=variant, progress=False)
    cd = _quiet(estimate_curvature, d, data, variant=variant, progress=False)
    for key in cd.tensors:
        got, want = cq.dense(key).double(), cd.dense(key).double()
        err = float((got - want).norm() / want.norm())
        assert err <= TOL[bits], (key, err)
    with torch.no_grad():                         # move the adapters off the anchor, the same way in both
        g = torch.Generator().manual_seed(4)
        for (n, p), (_, p2) in zip(q.named_parameters(), d.named_parameters()):
            if "lora_" in n:
                p.add_(0.05 * torch.randn(p.shape, generator=g))
                p2.copy_(p)
    lora = lambda m: [p for n, p in m.named_parameters() if "lora_" in n]   # noqa: E731
    values, grads = [], []
    for model, curv in ((q, cq), (d, cd), (d, cq)):
        v = LaLoRARegularizer(curv, lam=3.0, prior_precision=0.1)(model)
        values.append(float(v))
        grads.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(v, lora(model))]))
    # the penalty reads only the LoRA weights: on the quantised model it is the dense one's, exactly
    assert values[0] == pytest.approx(values[2], rel=1e-6)
    torch.testing.assert_close(grads[0], grads[2], rtol=1e-5, atol=1e-7)
    assert values[0] == pytest.approx(values[1], rel=TOL[bits])
    assert float((grads[0] - grads[1]).norm() / grads[1].norm()) <= TOL[bits]
