"""estimate_curvature on tiny peft Llamas against an independent brute-force per-token K-FAC."""
import warnings

import pytest
import torch
from bruteforce import brute_force_kfac
from conftest import DEV, available_backends, rel_err
from problems import ALL_PROJ, batches, tiny_llama

from lalora_kernels import DegenerateCurvatureWarning, LaLoRARegularizer, LoRACurvature, estimate_curvature
from lalora_kernels.lora_layers import find_lora_layers
from lalora_kernels.reference.closed_form import penalty_closed_form

TOL64 = 1e-6


def _quiet(*a, **k):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DegenerateCurvatureWarning)
        return estimate_curvature(*a, progress=False, **k)


def _close(ours, ref, what):
    if ref.abs().max() == 0:
        assert ours is None or ours.abs().max() == 0, what
        return
    assert ours is not None, f"{what}: factor missing"
    assert rel_err(ours, ref) <= TOL64, f"{what}: rel err {rel_err(ours, ref):.2e}"


@pytest.mark.parametrize("nonzero_b", [True, False])
@pytest.mark.parametrize("rslora", [False, True])
def test_kfac_blocks_equal_brute_force(nonzero_b, rslora):
    model = tiny_llama(nonzero_b=nonzero_b, rslora=rslora)
    data = batches()
    ref, T = brute_force_kfac(model, data)
    for variant in ("tri", "wkfac"):
        curv = _quiet(model, data, variant=variant)
        assert curv.num_tokens == T
        for name, r in ref.items():
            blk = curv.kfac_blocks(name)
            _close(blk["lora_A"]["grad_cov"], r["A_grad"], f"{variant} {name} G_A")
            _close(blk["lora_B"]["input_cov"], r["B_in"], f"{variant} {name} A_B")
            _close(blk["lora_B"]["grad_cov"], r["B_grad"], f"{variant} {name} G_B")
            if nonzero_b or variant == "wkfac":
                _close(blk["lora_A"]["input_cov"], r["A_in"], f"{variant} {name} A_A")
            if nonzero_b:
                _close(blk["cross"]["grad_cross"], r["X_grad"], f"{variant} {name} cross G")
                _close(blk["cross"]["input_cross"], r["X_in"], f"{variant} {name} cross A")
            else:
                assert r["A_grad"].abs().max() == 0   # B* = 0: the A block is truly zero
            if nonzero_b and variant == "tri":     # the stored Ka = A* Sx, Kb = Sg B* (kfac_blocks rebuilds them)
                A0, B0 = curv.get("A0", name), curv.get("B0", name)
                _close(curv.get("Ka", name), A0 @ curv.sx(name), f"{name} Ka")
                _close(curv.get("Kb", name), curv.dense(f"Sg/{name}") @ B0, f"{name} Kb")


@pytest.mark.parametrize("nonzero_b", [True, False])
def test_diag_equals_brute_force(nonzero_b):
    model = tiny_llama(nonzero_b=nonzero_b)
    data = batches()
    ref, _ = brute_force_kfac(model, data)
    curv = _quiet(model, data, variant="diag")
    for name, r in ref.items():
        _close(curv.get("FA", name), r["FA"], f"{name} FA")
        _close(curv.get("FB", name), r["FB"], f"{name} FB")


def test_padding_never_enters_a_factor():
    model = tiny_llama()
    padded = batches(n=1, bsz=4, seq=8)[0]
    singles = []
    for b in range(4):
        L = int(padded["attention_mask"][b].sum())
        singles.append((padded["input_ids"][b:b + 1, :L], padded["labels"][b:b + 1, :L]))
    a = _quiet(model, [padded], variant="wkfac")
    b = _quiet(model, singles, variant="wkfac")
    assert a.num_tokens == b.num_tokens == int(padded["attention_mask"].sum())
    assert a.tensors.keys() == b.tensors.keys()
    for k in a.tensors:
        torch.testing.assert_close(a.tensors[k], b.tensors[k], rtol=1e-10, atol=1e-13)


def _true_fisher(model, batch, terms):
    """sum over positions t and classes c of p(c | t) terms(module, x, g_tc), divided by the token
    count: a factor under the model's own predictive distribution. ``terms`` returns a dict of
    tensors per LoRA layer from its input x and the output gradient g of one (t, c) (both 2-D)."""
    from peft.tuners.lora import LoraLayer
    mods = {n: m for n, m in model.named_modules() if isinstance(m, LoraLayer)}
    model.eval()
    ins, outs = {}, {}

    def keep(n):
        def hook(mod, args, out):
            ins[n], outs[n] = args[0], out
        return hook
    hs = [m.register_forward_hook(keep(n)) for n, m in mods.items()]
    logits = model(input_ids=batch["input_ids"]).logits[:, :-1]
    for h in hs:
        h.remove()
    probs = logits.softmax(-1).detach()
    names = list(mods)
    acc: dict = {n: {} for n in names}
    B, L, V = probs.shape
    for b in range(B):
        for t in range(L):
            for c in range(V):
                dl = torch.zeros_like(logits)
                dl[b, t] = probs[b, t]
                dl[b, t, c] -= 1
                gs = torch.autograd.grad(logits, [outs[n] for n in names], dl, retain_graph=True)
                for n, g in zip(names, gs):
                    x = ins[n].reshape(-1, ins[n].shape[-1]).detach()
                    for k, v in terms(mods[n], x, g.reshape(-1, g.shape[-1]).detach()).items():
                        acc[n][k] = acc[n].get(k, 0) + probs[b, t, c] * v
    T = batch["input_ids"].numel()
    return {n: {k: v / T for k, v in d.items()} for n, d in acc.items()}


def _exact_fisher_sg(model, batch):
    return {n: d["Sg"] for n, d in _true_fisher(model, batch, lambda m, x, g: {"Sg": g.T @ g}).items()}


def test_mc_differs_from_empirical_and_converges_to_exact_fisher():
    vocab = 5
    model = tiny_llama(vocab=vocab, layers=1, hidden=16, inter=24, targets=["q_proj", "down_proj"])
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (2, 5), generator=g)
    batch = {"input_ids": ids, "labels": ids.clone()}
    exact = _exact_fisher_sg(model, batch)
    emp = _quiet(model, [batch], variant="wkfac")
    errs = {}
    for S in (1, 16, 256):
        mc = _quiet(model, [batch], variant="wkfac", fisher="mc", mc_samples=S,
                    generator=torch.Generator().manual_seed(1))
        errs[S] = max(rel_err(mc.dense(f"Sg/{n}"), exact[n]) for n in exact)
        # Sx does not depend on labels
        for k, t in mc.tensors.items():
            if k.startswith("Sx/"):
                torch.testing.assert_close(t, emp.tensors[k])
    emp_err = max(rel_err(emp.dense(f"Sg/{n}"), exact[n]) for n in exact)
    assert emp_err > 0.05, "empirical and true Fisher should differ on random labels"
    assert errs[256] < errs[16] < errs[1]
    assert errs[256] < 0.12, errs


def _exact_fisher_diag(model, batch):
    """diag's FA, FB under the model's own predictive distribution."""
    def terms(m, x, g):
        A0, B0, s = m.lora_A["default"].weight.detach(), m.lora_B["default"].weight.detach(), m.scaling["default"]
        return {"FA": s**2 * (g @ B0).square().T @ x.square(), "FB": s**2 * g.square().T @ (x @ A0.T).square()}
    exact = _true_fisher(model, batch, terms)
    return {n: d["FA"] for n, d in exact.items()}, {n: d["FB"] for n, d in exact.items()}


def test_mc_weights_every_factor_once_per_token():
    """With S draws per position, every label-dependent factor is weighted 1/S (tri's Cbb is
    exactly B*^T Sg B* of the same draws; diag's FA, FB converge to the true Fisher's), and the
    label-free Caa is accumulated once, not per draw."""
    vocab = 5
    model = tiny_llama(vocab=vocab, layers=1, hidden=16, inter=24, targets=["q_proj", "down_proj"])
    ids = torch.randint(0, vocab, (2, 5), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "labels": ids.clone()}
    emp = _quiet(model, [batch], variant="tri")
    mc = _quiet(model, [batch], variant="tri", fisher="mc", mc_samples=4, generator=torch.Generator().manual_seed(1))
    for n in emp.adapters:
        B0 = mc.get("B0", n)
        torch.testing.assert_close(mc.get("Cbb", n), B0.T @ mc.dense(f"Sg/{n}") @ B0, rtol=1e-10, atol=0)
        torch.testing.assert_close(mc.get("Caa", n), emp.get("Caa", n), rtol=1e-12, atol=0)
    fa, fb = _exact_fisher_diag(model, batch)
    errs = {}
    for S in (4, 256):
        d = _quiet(model, [batch], variant="diag", fisher="mc", mc_samples=S,
                   generator=torch.Generator().manual_seed(1))
        errs[S] = max(max(rel_err(d.get("FA", n), fa[n]), rel_err(d.get("FB", n), fb[n])) for n in fa)
    assert errs[256] < errs[4] and errs[256] < 0.15, errs


def test_shared_inputs_deduplicated_and_degenerate_factors_skipped():
    layers = 2
    model = tiny_llama(layers=layers, nonzero_b=False)
    data = batches(n=1)
    with pytest.warns(DegenerateCurvatureWarning, match="variant='kfac'.*wkfac.*pissa"):
        kfac = estimate_curvature(model, data, variant="kfac", progress=False)
    wk = estimate_curvature(model, data, variant="wkfac", progress=False)
    # q/k/v share one Sx, gate/up share one: 4 Sx per layer, one Sg per adapter
    assert wk.num_factors()["Sx"] == 4 * layers
    assert wk.num_factors()["Sg"] == len(ALL_PROJ) * layers
    # B* = 0: no Sx at all under kfac, and it shows in memory
    assert "Sx" not in kfac.num_factors() and "Cbb" not in kfac.num_factors()
    assert kfac.num_factors()["Sg"] == len(ALL_PROJ) * layers
    nbytes = lambda c, kinds: sum(t.numel() * t.element_size() for k, t in c.tensors.items()  # noqa
                                  if k.split("/")[0] in kinds)
    assert kfac.memory_bytes() == nbytes(kfac, ("Sg", "Caa")) < wk.memory_bytes()
    assert wk.memory_bytes() == nbytes(wk, ("Sx", "Sg"))
    diag = _quiet(model, data, variant="diag")
    assert "FA" not in diag.num_factors() and diag.num_factors()["FB"] == len(ALL_PROJ) * layers


@pytest.mark.parametrize("variant", ["kfac", "tri", "diag"])
def test_zero_a_anchor_skips_the_b_block(variant):
    """A* = 0 in one layer (B* != 0): its B block is exactly zero, so Sg, Caa and FB are not kept
    for it (Sx and Cbb, resp. FA, are), and the penalty still equals the closed form."""
    model = tiny_llama(nonzero_b=True)
    name = next(r.name for r in find_lora_layers(model) if r.name.endswith("o_proj"))
    with torch.no_grad():
        next(r for r in find_lora_layers(model) if r.name == name).A.zero_()
    curv = _quiet(model, batches(n=1), variant=variant)
    info = curv.adapters[name]
    kept = {k.split("/")[0] for k in curv.tensors if k.endswith("/" + name)}
    if variant == "diag":
        assert "FA" in kept and "FB" not in kept
    else:
        assert not info.has_sg and info.has_sx and {"Cbb"} <= kept and not kept & {"Sg", "Caa", "Ka", "Kb"}
    reg = LaLoRARegularizer(curv, 1.0, normalize=None)
    refs = {r.name: r for r in find_lora_layers(model)}
    with torch.no_grad():
        for r in refs.values():
            r.A.add_(0.1 * torch.randn_like(r.A))
            r.B.add_(0.1 * torch.randn_like(r.B))
    value = reg(model)
    ref = 0.0
    for n, a in curv.adapters.items():
        sg = curv.dense(f"Sg/{n}") if a.has_sg else None
        v, _, _ = penalty_closed_form(variant, refs[n].A.detach(), refs[n].B.detach(), curv.get("A0", n),
                                      curv.get("B0", n), scaling=a.scaling, lam=1.0, Sx=curv.sx(n), Sg=sg,
                                      FA=curv.get("FA", n), FB=curv.get("FB", n), Caa=curv.get("Caa", n),
                                      Cbb=curv.get("Cbb", n), Ka=curv.get("Ka", n), Kb=curv.get("Kb", n))
        ref = ref + v
    torch.testing.assert_close(value, torch.as_tensor(ref, dtype=value.dtype), rtol=1e-9, atol=1e-12)


def test_model_state_is_restored_also_on_error():
    model = tiny_llama()
    model.train()
    model.base_model.model.model.layers[0].mlp.eval()
    modes = {n: m.training for n, m in model.named_modules()}
    p = next(p for n, p in model.named_parameters() if "lora_A" in n)
    p.grad = torch.ones_like(p)
    p.requires_grad_(False)
    hooks = sum(len(m._forward_hooks) for m in model.modules())

    def failing():
        yield batches(n=1)[0]
        raise RuntimeError("data loader broke")

    with pytest.raises(RuntimeError, match="data loader broke"):
        _quiet(model, failing(), variant="kfac")
    for fn in (lambda: None, lambda: _quiet(model, batches(n=1), variant="tri")):
        fn()
        assert {n: m.training for n, m in model.named_modules()} == modes
        assert torch.equal(p.grad, torch.ones_like(p)) and not p.requires_grad
        assert sum(len(m._forward_hooks) for m in model.modules()) == hooks


@pytest.mark.parametrize("reentrant", [True, False])
def test_gradient_checkpointing_gives_same_curvature(reentrant):
    data = batches()
    ref = _quiet(tiny_llama(), data, variant="tri")
    model = tiny_llama()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    model.enable_input_require_grads()
    calls = []
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    h = layer.register_forward_hook(lambda *a: calls.append(1))
    curv = _quiet(model, data, variant="tri")
    h.remove()
    assert len(calls) == 2 * len(data), "checkpointing should recompute each layer once per batch"
    for k in ref.tensors:
        torch.testing.assert_close(curv.tensors[k], ref.tensors[k], rtol=1e-10, atol=1e-13)


def test_bf16_model_keeps_fp32_factors():
    data = batches()
    model = tiny_llama(torch.float64)
    ref = _quiet(model, data, variant="wkfac")
    curv = _quiet(model.to(torch.bfloat16), data, variant="wkfac")
    assert curv.factor_dtype == torch.float32
    for k, t in curv.tensors.items():
        if k.startswith(("Sx/", "Sg/")):
            assert rel_err(t, ref.tensors[k]) < 0.1, k


def test_tuple_batches_and_max_batches():
    data = batches(n=3, pad=False)
    tuples = [(b["input_ids"], b["labels"]) for b in data]
    a = _quiet(tiny_llama(), data[:2], variant="kfac")
    b = _quiet(tiny_llama(), iter(tuples), variant="kfac", max_batches=2)
    assert a.num_tokens == b.num_tokens
    for k in a.tensors:
        torch.testing.assert_close(a.tensors[k], b.tensors[k])


# ---- storage and backends ------------------------------------------------------------------------
@pytest.mark.parametrize("variant", ["kfac", "tri", "wkfac"])
@pytest.mark.parametrize("cpu_backend", [b for b in available_backends() if b != "triton"])   # float64 model
def test_estimate_packed_equals_dense_and_files_record_layout(cpu_backend, variant, tmp_path, monkeypatch):
    monkeypatch.setenv("LALORA_BACKEND", cpu_backend)
    model = tiny_llama(dtype=torch.float64)
    data = batches(2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dense = estimate_curvature(model, data, variant=variant, progress=False, storage="dense")
        packed = estimate_curvature(model, data, variant=variant, progress=False, storage="packed", tile=16)
    assert (dense.layout, packed.layout, packed.tile) == ("dense", "packed", 16)
    assert set(dense.tensors) == set(packed.tensors)
    for k, t in dense.tensors.items():
        torch.testing.assert_close(packed.dense(k), t, rtol=1e-10, atol=1e-13)
    assert packed.norm_constant == pytest.approx(dense.norm_constant, rel=1e-10)
    # packed file -> packed; dense file -> packed -> dense, exactly
    packed.save(tmp_path / "p.safetensors")
    dense.save(tmp_path / "d.safetensors")
    back = LoRACurvature.load(tmp_path / "p.safetensors")
    assert (back.layout, back.tile) == ("packed", 16)
    assert all(torch.equal(back.tensors[k], t) for k, t in packed.tensors.items())
    conv = LoRACurvature.load(tmp_path / "d.safetensors", layout="packed", tile=8)
    assert conv.layout == "packed" and conv.memory_bytes() < dense.memory_bytes()
    again = conv.to_layout("dense")
    assert all(torch.equal(again.tensors[k], t) for k, t in dense.tensors.items())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_capture_on_every_backend_matches_the_reference(backend, dtype):
    data = batches()
    out = {}
    for name in ("torch", backend):
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("LALORA_BACKEND", name)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                out[name] = {v: estimate_curvature(tiny_llama(dtype).to(DEV), data, variant=v, progress=False)
                             for v in ("tri", "diag")}
    for v, curv in out[backend].items():
        assert curv.layout == ("dense" if backend == "torch" else "packed")   # packed where it runs natively
        for k, t in out["torch"][v].tensors.items():
            torch.testing.assert_close(curv.dense(k), t, rtol=1e-5, atol=1e-6)


def test_default_storage_follows_backend(monkeypatch):
    model = tiny_llama()
    monkeypatch.setenv("LALORA_BACKEND", "torch")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert estimate_curvature(model, batches(1), progress=False).layout == "dense"
        monkeypatch.setenv("LALORA_BACKEND", "auto")
        assert estimate_curvature(model, batches(1), progress=False).layout == "packed"
