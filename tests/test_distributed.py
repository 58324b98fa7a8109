"""Curvature on 2 gloo ranks (each its own shard) equals the single-process curvature over the
union; MC labels come from per-rank streams."""
import os
import sys
import warnings

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(__file__))
CASES = [("tri", "empirical", "shard"), ("diag", "empirical", "shard"), ("wkfac", "mc", "same")]


def _worker(rank, world, init_file, out_dir):
    from problems import batches, tiny_llama

    from lalora_kernels import estimate_curvature
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        data = batches(n=4, seed=5)
        for variant, fisher, split in CASES:
            mine = data[rank::world] if split == "shard" else data
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                curv = estimate_curvature(tiny_llama(), mine, variant=variant, fisher=fisher, progress=False,
                                          generator=torch.Generator().manual_seed(3))
            curv.save(os.path.join(out_dir, f"{variant}-{fisher}-rank{rank}.safetensors"))
    finally:
        dist.destroy_process_group()


def _single(variant, fisher):
    from problems import batches, tiny_llama

    from lalora_kernels import estimate_curvature
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return estimate_curvature(tiny_llama(), batches(n=4, seed=5), variant=variant, fisher=fisher,
                                  progress=False, generator=torch.Generator().manual_seed(3))


def test_two_ranks(tmp_path):
    from lalora_kernels import LoRACurvature
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    load = lambda v, f, r: LoRACurvature.load(str(tmp_path / f"{v}-{f}-rank{r}.safetensors"))  # noqa: E731
    for variant, fisher, split in CASES:
        single = _single(variant, fisher)
        ranks = [load(variant, fisher, r) for r in range(2)]
        for k in single.tensors:                      # every rank ends with the same curvature
            assert torch.equal(ranks[0].tensors[k], ranks[1].tensors[k])
        if split == "shard":                          # shards over 2 ranks == one process on all
            assert ranks[0].num_tokens == single.num_tokens
            for k, t in single.tensors.items():
                torch.testing.assert_close(ranks[0].tensors[k], t, rtol=1e-12, atol=1e-14)
                if k.startswith(("Sx/", "Sg/")):          # exactly symmetric (packed: its diagonal tiles)
                    S = ranks[0].dense(k)
                    assert S.dim() == 2 and torch.equal(S, S.T)
        else:
            # Both ranks saw the same data with the same user generator. Rank 0's stream equals the
            # single process's; had rank 1 drawn the same labels, the reduced mean would equal the
            # single-process curvature. It must not: the ranks' draws are independent.
            assert ranks[0].num_tokens == 2 * single.num_tokens
            sg = [k for k in single.tensors if k.startswith("Sg/")]
            diff = max(float((ranks[0].tensors[k] - single.tensors[k]).abs().max()) for k in sg)
            assert diff > 1e-6
            for k in single.tensors:                  # Sx does not depend on labels
                if k.startswith("Sx/"):
                    torch.testing.assert_close(ranks[0].tensors[k], single.tensors[k])


def test_rank_generator_is_identity_in_one_process():
    import lalora_kernels.distributed as D
    g = torch.Generator().manual_seed(3)
    assert D.rank_generator(g, "cpu") is g
    assert D.world() == (0, 1)


def _lora_params(model):
    return [p for n, p in model.named_parameters() if "lora_" in n]


def _moved_model():
    """The test model in eval mode (no dropout) with LoRA weights moved off the anchor, the same
    on every rank and in the single process."""
    from problems import tiny_llama
    model = tiny_llama()
    model.eval()
    torch.manual_seed(11)
    with torch.no_grad():
        for p in _lora_params(model):
            p.add_(0.05 * torch.randn_like(p))
    return model


def _train(model, reg, batches, steps=3):
    opt = torch.optim.SGD(_lora_params(model), lr=0.05)
    for b in batches[:steps]:
        loss = model(**b).loss + reg(model.module if hasattr(model, "module") else model)
        loss.backward()
        opt.step()
        opt.zero_grad()


def _penalty_worker(rank, world, init_file, out_dir):
    import json

    from problems import batches, tiny_llama
    from torch.nn.parallel import DistributedDataParallel as DDP

    from lalora_kernels import LaLoRARegularizer, estimate_curvature
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        data = batches(n=3, bsz=4, seq=6, seed=7, pad=False)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            curv = estimate_curvature(tiny_llama(), data[rank::world], variant="tri", progress=False)
        model = _moved_model()
        rep = LaLoRARegularizer(curv, lam=2.0, prior_precision=0.1)
        sh = LaLoRARegularizer(curv, lam=2.0, prior_precision=0.1, shard_factors=True)
        params = _lora_params(model)
        v_rep, v_sh = rep(model), sh(model)
        g_rep = torch.autograd.grad(v_rep, params)
        g_sh = [g if g is not None else torch.zeros_like(p)
                for g, p in zip(torch.autograd.grad(v_sh, params, allow_unused=True), params)]
        for g in g_sh:                                        # what DDP's averaging does
            dist.all_reduce(g)
            g /= world
        out = {"value_err": abs(sh.full_value(v_sh) - float(v_rep)) / float(v_rep),
               "grad_err": max(float((a - b).abs().max()) for a, b in zip(g_sh, g_rep)),
               "bytes_rep": rep.penalty.memory_bytes(), "bytes_sh": sh.penalty.memory_bytes()}
        local = [{k: v[rank * 2:(rank + 1) * 2] for k, v in b.items()} for b in data]   # 2 rows each
        for mode, reg in (("replicated", rep), ("sharded", sh)):
            m = _moved_model()
            reg._bound.clear()
            _train(DDP(m), reg, local)
            out[mode] = [p.detach().reshape(-1).tolist() for p in _lora_params(m)]
        with open(os.path.join(out_dir, f"penalty-rank{rank}.json"), "w") as f:
            json.dump(out, f)
    finally:
        dist.destroy_process_group()


def test_sharded_penalty_and_ddp_training(tmp_path):
    import json

    from problems import batches, tiny_llama

    from lalora_kernels import LaLoRARegularizer, estimate_curvature
    mp.spawn(_penalty_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    res = [json.loads((tmp_path / f"penalty-rank{r}.json").read_text()) for r in range(2)]
    for r in res:
        assert r["value_err"] < 1e-12 and r["grad_err"] < 1e-12
        assert r["bytes_sh"] < 0.75 * r["bytes_rep"]          # each rank holds about half
    # single process on the union of the data: the same trajectory
    data = batches(n=3, bsz=4, seq=6, seed=7, pad=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        curv = estimate_curvature(tiny_llama(), data, variant="tri", progress=False)
    m = _moved_model()
    _train(m, LaLoRARegularizer(curv, lam=2.0, prior_precision=0.1), data)
    ref = [p.detach().reshape(-1) for p in _lora_params(m)]
    for mode in ("replicated", "sharded"):
        for r in res:
            for got, want in zip(r[mode], ref):
                torch.testing.assert_close(torch.tensor(got, dtype=torch.float64), want, rtol=1e-9, atol=1e-11)


def test_torchrun_example(tmp_path):
    import subprocess
    root = os.path.dirname(os.path.dirname(__file__))
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          os.path.join(root, "examples", "lalora_ddp.py"), "--steps", "4", "--shard-factors"],
                         capture_output=True, text=True, timeout=600, env=env, cwd=root)
    assert out.returncode == 0, out.stderr[-3000:]
    import re
    held = [int(h) for h in re.findall(r"factor bytes held (\d+)", out.stdout)]   # ranks' lines may interleave
    assert len(held) == 2 and all(h > 0 for h in held)
    assert "penalty" in out.stdout


def _agreement_worker(rank, world, init_file, out_dir):
    """Ranks that cannot be reduced together (model dtype, anchors, variant) and a rank with no data:
    every rank raises, none waits; then 3 uneven shards reduce to the single-process curvature."""
    import json

    from problems import batches, tiny_llama

    from lalora_kernels import estimate_curvature
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    data = batches(n=4, seed=5)
    scenarios = {
        "dtype": dict(model=tiny_llama(torch.float32 if rank == 0 else torch.float64), data=data[:1]),
        "anchors": dict(model=tiny_llama(seed=rank), data=data[:1]),
        "variant": dict(model=tiny_llama(), data=data[:1], variant="tri" if rank == 0 else "kfac"),
        "empty": dict(model=tiny_llama(), data=[] if rank == 1 else data[:1]),
    }
    out = {}
    try:
        for name, s in scenarios.items():
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    estimate_curvature(s["model"], s["data"], variant=s.get("variant", "kfac"), progress=False)
                out[name] = "no error"
            except (RuntimeError, ValueError) as exc:
                out[name] = f"{type(exc).__name__}: {exc}"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            curv = estimate_curvature(tiny_llama(), data[rank::world], variant="tri", progress=False, storage="packed")
        curv.save(os.path.join(out_dir, f"agree-rank{rank}.safetensors"))
        with open(os.path.join(out_dir, f"agree-rank{rank}.json"), "w") as f:
            json.dump(out, f)
    finally:
        dist.destroy_process_group()


def test_ranks_agree_before_reducing_or_all_raise(tmp_path):
    import json
    import time

    from lalora_kernels import LoRACurvature
    world = 3
    ctx = mp.spawn(_agreement_worker, args=(world, str(tmp_path / "init"), str(tmp_path)), nprocs=world, join=False)
    deadline = time.time() + 300
    while not ctx.join(timeout=5):
        if time.time() > deadline:
            for p in ctx.processes:
                p.kill()
            raise AssertionError("a rank was left waiting")
    got = [json.loads((tmp_path / f"agree-rank{r}.json").read_text()) for r in range(world)]
    for r in range(world):
        assert "dtype differ" in got[r]["dtype"] or "dtype, factors differ" in got[r]["dtype"], got[r]["dtype"]
        assert "anchors differ" in got[r]["anchors"], got[r]["anchors"]
        assert "variant differ" in got[r]["variant"] or "factors, variant differ" in got[r]["variant"], got[r]
    assert got[1]["empty"].startswith("ValueError: batches is empty")
    for r in (0, 2):
        assert "failed on rank(s) [1]" in got[r]["empty"], got[r]["empty"]
    single = _single("tri", "empirical")
    ranks = [LoRACurvature.load(str(tmp_path / f"agree-rank{r}.safetensors")) for r in range(world)]
    for k in single.tensors:
        torch.testing.assert_close(ranks[0].dense(k), single.dense(k), rtol=1e-12, atol=1e-14)
        assert all(torch.equal(ranks[0].tensors[k], c.tensors[k]) for c in ranks[1:])
        if k.startswith(("Sx/", "Sg/")):     # a 3-rank reduction, mirrored: exactly symmetric
            S = ranks[0].dense(k)
            assert torch.equal(S, S.T)
