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
    from models import batches, tiny_llama

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
    from models import batches, tiny_llama

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
                if k.startswith(("Sx/", "Sg/")):
                    assert torch.equal(ranks[0].tensors[k], ranks[0].tensors[k].T)
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
