"""Problems the tests share: random SPD factors, class tables with their factors, the penalty
problem of mixed shapes, and config-built models with batches. Builders only; the independent
oracles are ``dense`` (materialised Kronecker forms) and ``bruteforce`` (per-token K-FAC)."""
from dataclasses import dataclass

import torch

from lalora_kernels import LaplacePenalty, LoRACurvature, fused_laplace_penalty
from lalora_kernels.apps.tiny import ALL_PROJ, llama_lora, random_batches
from lalora_kernels.gram_meta import GramMeta
from lalora_kernels.reference.closed_form import finalize, penalty_closed_form
from lalora_kernels.reference.grouped_gram import class_views
from lalora_kernels.reference.packed_format import pack


def spd(n, dtype=torch.float64, tokens=None):
    """A random covariance, exactly symmetric by construction (``a + b == b + a`` in floating
    point), not by trusting the GEMM to sum ``[i, j]`` and ``[j, i]`` in the same order."""
    X = torch.randn(tokens or 2 * n + 3, n, dtype=dtype)
    S = X.T @ X / X.shape[0]
    return 0.5 * (S + S.T)


# ---- grouped products ---------------------------------------------------------------------------
@dataclass
class Gram:
    """A class table ``shapes`` [(n, R, m)] with random rows D and SPD factors, dense and packed."""
    shapes: list
    D: torch.Tensor                 # flat rows
    dense: torch.Tensor             # flat arena of dense factors
    classes: list                   # the dense table
    tile: int = 0
    packed: torch.Tensor = None     # flat arena of the same factors tile-packed
    packed_classes: list = None

    def arena(self, tile):
        return (self.dense, self.classes) if tile == 0 else (self.packed, self.packed_classes)


def gram_problem(shapes, tile=32, dtype=torch.float64) -> Gram:
    meta = GramMeta.build(shapes)
    S = [torch.stack([spd(n, dtype) for _ in range(m)]) for n, R, m in shapes if m]
    dense = torch.cat([s.reshape(-1) for s in S]) if S else torch.zeros(0, dtype=dtype)
    D = torch.randn(meta.d_size, dtype=dtype)
    packed = torch.cat([pack(s, tile) for c in class_views(dense, meta.classes, "S") for s in c]) if S \
        else torch.zeros(0, dtype=dtype)
    return Gram(shapes, D, dense, meta.classes, tile, packed, GramMeta.build(shapes, tile).classes)


def gram_oracle(D, dense, classes, W=None, dtype=torch.float64):
    """(G, Q) of every class from dense products in ``dtype`` (float64: the oracle; lower: PyTorch's
    own result, the tolerance baseline); with weights W like G instead the value 1/2 <W, G> and its
    gradient in D (autograd)."""
    D = D.detach().to(dtype).requires_grad_()
    Gs, Qs = [], []
    for Dc, Sc in zip(class_views(D, classes, "D"), class_views(dense.to(dtype), classes, "S")):
        Q = Dc @ Sc
        Qs.append(Q.reshape(-1))
        Gs.append((Q @ Dc.transpose(1, 2)).reshape(-1))
    G = torch.cat(Gs) if Gs else D.new_zeros(0)
    Q = torch.cat(Qs) if Qs else D.new_zeros(0)
    if W is None:
        return G.detach(), Q.detach()
    v = 0.5 * (W.to(dtype) * G).sum()
    return v.detach(), torch.autograd.grad(v, D)[0] if D.numel() else D.new_zeros(0)


def quad_weights(shapes, dtype=torch.float64, seed=0):
    """Random epilogue weights C for grouped_gram_quad (not symmetric, so that the gradient's
    W + W^T is checked)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(sum(R * R * m for n, R, m in shapes), generator=gen, dtype=dtype)


# ---- the penalty ----------------------------------------------------------------------------------
# (o, i, r, sx_index): adapters 0-2 share input 0 (q/k/v-like with GQA shapes), 3 has its own,
# 4-5 share input 2 with another rank, 6 is an odd one-off; adapter 2 has B* = 0.
LAYOUT = [(9, 7, 3, 0), (5, 7, 3, 0), (5, 7, 3, 0), (7, 9, 3, 1), (11, 7, 2, 2), (11, 7, 2, 2),
          (1, 13, 1, 3)]
SX_DIMS = [7, 9, 7, 13]
SX_INDEX = [j for *_, j in LAYOUT]


def penalty_problem(dtype=torch.float64, zero_b=(2,)):
    Sx = [spd(n) for n in SX_DIMS]
    A0 = [torch.randn(r, i, dtype=torch.float64) for o, i, r, _ in LAYOUT]
    B0 = [torch.zeros(o, r, dtype=torch.float64) if k in zero_b else torch.randn(o, r, dtype=torch.float64)
          for k, (o, i, r, _) in enumerate(LAYOUT)]
    Sg = [spd(o) for o, *_ in LAYOUT]
    FA = [torch.rand(r, i, dtype=torch.float64) for o, i, r, _ in LAYOUT]
    FB = [torch.rand(o, r, dtype=torch.float64) for o, i, r, _ in LAYOUT]
    A = [(a + 0.2 * torch.randn_like(a)).to(dtype).requires_grad_() for a in A0]
    B = [(b + 0.2 * torch.randn_like(b)).to(dtype).requires_grad_() for b in B0]
    scaling = [0.5 + k / 4 for k in range(len(LAYOUT))]
    return dict(A=A, B=B, A0=A0, B0=B0, Sx=Sx, Sg=Sg, FA=FA, FB=FB, scaling=scaling)


def closed_sum(variant, p, lam, delta, dtype=torch.float64):
    """Value and per-adapter gradients from the per-adapter closed form, computed in ``dtype``
    (float64: the oracle; float32: PyTorch's own result, the tolerance baseline)."""
    if dtype != torch.float64:
        cast = {k: [t.detach().to(dtype) for t in v] if isinstance(v, list) and torch.is_tensor(v[0]) else v
                for k, v in p.items()}
        return closed_sum(variant, cast, lam, delta)
    total, gA, gB = 0.0, [], []
    for k, (o, i, r, j) in enumerate(LAYOUT):
        A, B = p["A"][k].detach().to(p["A0"][k].dtype), p["B"][k].detach().to(p["A0"][k].dtype)
        skip_a = variant in ("kfac", "tri") and not p["B0"][k].any()
        Sx = None if skip_a else p["Sx"][j]
        fin = finalize(p["A0"][k], p["B0"][k], Sx, p["Sg"][k])
        if skip_a:
            fin["Caa"] = p["A0"][k] @ p["Sx"][j] @ p["A0"][k].T
        v, a, b = penalty_closed_form(variant, A, B, p["A0"][k], p["B0"][k], scaling=p["scaling"][k],
                                      lam=lam, delta=delta, Sx=Sx, Sg=p["Sg"][k],
                                      FA=None if skip_a or variant != "diag" else p["FA"][k],
                                      FB=p["FB"][k], **fin)
        total, gA, gB = total + v, gA + [a], gB + [b]
    return total, gA, gB


def closed_sum_on_model(curv, refs, variant, lam, delta=0.0, dtype=None):
    """The same oracle on a model: value and per-adapter (gA, gB) at its live LoRA weights ``refs``,
    from the factors ``curv`` holds, computed in ``dtype`` (None: the factors' own)."""
    c = (lambda t: t) if dtype is None else (lambda t: None if t is None else t.to(dtype))
    total, grads = 0.0, []
    for r in refs:
        n, a = r.name, curv.adapters[r.name]
        kw = {k: c(curv.get(k, n)) for k in ("Caa", "Cbb", "Ka", "Kb", "FA", "FB")}
        v, gA, gB = penalty_closed_form(variant, c(r.A.detach()), c(r.B.detach()), c(curv.get("A0", n)),
                                        c(curv.get("B0", n)), scaling=a.scaling, lam=lam, delta=delta,
                                        Sx=c(curv.sx(n)), Sg=c(curv.dense(f"Sg/{n}")), **kw)
        total, grads = total + v, grads + [(gA, gB)]
    return total, grads


def fused(variant, p, lam, delta, **kw):
    """``fused_laplace_penalty`` on the problem (the A blocks SPEC section 5 proves zero left out)."""
    skip = [variant in ("kfac", "tri") and not b.any() for b in p["B0"]]
    caa = [p["A0"][k] @ p["Sx"][j] @ p["A0"][k].T for k, (*_, j) in enumerate(LAYOUT)]
    return fused_laplace_penalty(
        p["A"], p["B"], p["A0"], p["B0"], variant=variant, scaling=p["scaling"], lam=lam,
        prior_precision=delta, Sx=p["Sx"], sx_index=[None if s else j for s, (*_, j) in zip(skip, LAYOUT)],
        Sg=p["Sg"], Caa=caa if variant in ("kfac", "tri") else None,
        FA=[None if s else f for s, f in zip(skip, p["FA"])] if variant == "diag" else None,
        FB=p["FB"] if variant == "diag" else None, **kw)


def curvature_of(p, variant, device="cpu"):
    """The problem's curvature as a LoRACurvature (diag: FA/FB; else Sx/Sg)."""
    if variant == "diag":
        return LoRACurvature.from_tensors([a.to(device) for a in p["A0"]], [b.to(device) for b in p["B0"]],
                                          variant=variant, scaling=p["scaling"], FA=[f.to(device) for f in p["FA"]],
                                          FB=[f.to(device) for f in p["FB"]])
    return LoRACurvature.from_tensors([a.to(device) for a in p["A0"]], [b.to(device) for b in p["B0"]],
                                      variant=variant, scaling=p["scaling"], Sx=[s.to(device) for s in p["Sx"]],
                                      sx_index=SX_INDEX, Sg=[s.to(device) for s in p["Sg"]])


def bf16_case(variant, layout, tile=16, device="cpu"):
    """The penalty (value, grads) on bf16 factors and, in float64, on the same rounded factors;
    plus the float64 value on the unrounded ones. Returns (penalty, value, grads, ref, ref_grads, exact)."""
    p = penalty_problem(zero_b=() if variant == "wkfac" else (2,))
    curves = [curvature_of(p, variant) for _ in range(3)]
    exact = curves[2].to(device)
    c16 = curves[0].to(device, dtype=torch.bfloat16)
    c64 = curves[1].to(device, dtype=torch.bfloat16).to(dtype=torch.float64)   # the rounded values, exactly
    if layout == "packed" and variant != "diag":
        for c in (c16, c64, exact):
            c.to_layout("packed", tile)
    outs = []
    for curv, dtype in ((c16, torch.float32), (c64, torch.float64), (exact, torch.float64)):
        A = [a.detach().to(device, dtype).requires_grad_() for a in p["A"]]
        B = [b.detach().to(device, dtype).requires_grad_() for b in p["B"]]
        pen = LaplacePenalty(curv, lam=1.3, prior_precision=0.2)
        v = pen(A, B)
        outs.append((pen, v, torch.autograd.grad(v, A + B)))
    return outs[0][0], outs[0][1], outs[0][2], outs[1][1], outs[1][2], outs[2][1]


# ---- models ---------------------------------------------------------------------------------------
def tiny_llama(dtype=torch.float64, *, hidden=24, inter=40, layers=2, heads=4, kv_heads=2, vocab=37,
               r=4, targets=ALL_PROJ, nonzero_b=True, rslora=False, seed=0):
    return llama_lora(hidden=hidden, inter=inter, layers=layers, heads=heads, kv_heads=kv_heads,
                      vocab=vocab, r=r, alpha=8, targets=targets, dtype=dtype,
                      nonzero_b=0.3 if nonzero_b else 0.0, rslora=rslora, dropout=0.1, seed=seed)


def batches(n=2, bsz=3, seq=7, vocab=37, seed=1, pad=True):
    return random_batches(n, bsz, seq, vocab, pad=pad, seed=seed)


def tiny_hf_folder(path):
    """A saved tiny Llama with a character-level tokenizer: what a user points --model at."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
    chars = list("abcdefghijklmnopqrstuvwxyz .,")
    vocab = {c: k for k, c in enumerate(["<unk>", "<pad>", "</s>"] + chars)}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", pad_token="<pad>", eos_token="</s>")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    LlamaForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
