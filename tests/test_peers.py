"""SPEC section 6: our per-token factors equal curvlinops' KFACLinearOperator (empirical Fisher,
expand, summed cross-entropy) on the same lora_A / lora_B parameters, divided by T."""
import warnings

import curvlinops  # installed by `make peers`, part of `make test`
import pytest
import torch

from lalora_kernels import estimate_curvature
from lalora_kernels.apps.bench import FlatLogits
from lalora_kernels.apps.tiny import llama_lora, random_batches


def _gpt2():
    from peft import LoraConfig, get_peft_model
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=11, n_embd=16, n_layer=1, n_head=2, n_positions=16, resid_pdrop=0.0, embd_pdrop=0.0,
                     attn_pdrop=0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")          # peft sets fan_in_fan_out=True for Conv1D and says so
        model = get_peft_model(GPT2LMHeadModel(cfg).double(), LoraConfig(r=2, lora_alpha=4,
                                                                          target_modules=["c_attn", "c_fc"]))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.3)
    return model.eval()


MODELS = {
    "llama, B* != 0": lambda: llama_lora(hidden=16, inter=24, layers=1, vocab=11, r=2, nonzero_b=0.3,
                                         targets=("q_proj", "v_proj", "down_proj"), dtype=torch.float64).eval(),
    "llama, B* = 0": lambda: llama_lora(hidden=16, inter=24, layers=1, vocab=11, r=2, nonzero_b=0.0,
                                        targets=("q_proj", "v_proj", "down_proj"), dtype=torch.float64).eval(),
    "gpt2 (Conv1D)": _gpt2,
}


@pytest.mark.parametrize("which", list(MODELS))
def test_factors_equal_curvlinops_kfac_over_T(which):
    model = MODELS[which]()
    data = random_batches(2, 2, 5, 11, pad=False)
    params = [p for n, p in model.named_parameters() if "lora_" in n]
    op = curvlinops.KFACLinearOperator(
        FlatLogits(model), torch.nn.CrossEntropyLoss(reduction="sum"), params,
        [(b["input_ids"], b["labels"][:, 1:].flatten()) for b in data],
        fisher_type="empirical", kfac_approx="expand", check_deterministic=False)
    op.compute_kronecker_factors()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        curv = estimate_curvature(model, data, variant="wkfac", progress=False)
    for name in curv.adapters:
        blocks = curv.kfac_blocks(name)
        for part in ("lora_A", "lora_B"):
            key = next(k for k in op._input_covariances if k.endswith(f"{name}.{part}.default"))
            theirs = torch.kron(op._gradient_covariances[key], op._input_covariances[key]) / curv.num_tokens
            ours = torch.kron(blocks[part]["grad_cov"], blocks[part]["input_cov"])
            scale = theirs.abs().max().clamp_min(1e-300)
            assert float((ours - theirs).abs().max() / scale) < 1e-6, (name, part)
