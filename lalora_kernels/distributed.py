"""Curvature estimation across torch.distributed ranks.

Each rank accumulates factor *sums* over its own data shard; ``all_reduce_sums`` adds them once at
the end. Symmetric sums travel as their upper triangle only, packed into buckets of about
``BUCKET_BYTES`` so that a model's hundreds of factors cost a handful of collectives, and come back
exactly symmetric (mirrored; a reduction may sum the two halves of a packed diagonal tile in
different orders over three or more ranks).
"""
from __future__ import annotations

import hashlib
from typing import Optional

import torch
import torch.distributed as dist

from .reference.packed_format import mirror_diagonal_tiles_

BUCKET_BYTES = 64 << 20
SYMMETRIC = ("Sx/", "Sg/", "Caa/", "Cbb/")


def world() -> tuple[int, int]:
    """(rank, world size); (0, 1) outside an initialised process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def rank_generator(generator: Optional[torch.Generator], device) -> Optional[torch.Generator]:
    """A generator whose seed differs per rank, so ranks draw independent MC labels."""
    rank, size = world()
    if size == 1:
        return generator
    base = generator.initial_seed() if generator is not None else torch.initial_seed()
    return torch.Generator(device=device).manual_seed((base + 7919 * rank) % (2**63))


def _pack(t: torch.Tensor, key: str) -> torch.Tensor:
    if key.startswith(SYMMETRIC) and t.dim() == 2:     # dense symmetric: its upper triangle
        i, j = torch.triu_indices(t.shape[0], t.shape[1], device=t.device)
        return t[i, j]
    return t.reshape(-1)                               # tile-packed factors are half already


def _unpack(t: torch.Tensor, key: str, flat: torch.Tensor) -> None:
    if key.startswith(SYMMETRIC) and t.dim() == 2:
        i, j = torch.triu_indices(t.shape[0], t.shape[1], device=t.device)
        t[i, j] = flat
        t[j, i] = flat
    else:
        t.copy_(flat.view_as(t))


def fingerprint(sums: dict[str, torch.Tensor], anchors: list[torch.Tensor], **fields) -> dict:
    """What every rank must share before its sums can be added: the accumulators' keys, shapes and
    dtype, a digest of the anchors (the LoRA weights the curvature is about), and ``fields``."""
    digest = hashlib.sha256()
    for t in anchors:
        digest.update(t.detach().contiguous().view(torch.uint8).cpu().numpy().tobytes())
    return {**fields, "factors": sorted((k, tuple(t.shape), str(t.dtype)) for k, t in sums.items()),
            "anchors": f"{len(anchors)} tensors, sha256 {digest.hexdigest()[:16]}"}


def agree(error: Optional[BaseException], mine: Optional[dict]) -> None:
    """Before the first reduction, one small all-gather: every rank learns whether every other one
    got this far and holds the same ``fingerprint``. On a failure or a mismatch every rank raises (the
    failing rank its own error), so that none is left waiting in a reduction the others never reach.
    Outside torch.distributed it only re-raises ``error``."""
    rank, size = world()
    if size > 1:
        everyone: list = [None] * size
        dist.all_gather_object(everyone, {"error": None if error is None else f"{type(error).__name__}: {error}",
                                          "fingerprint": mine})
        failed = {r: e["error"] for r, e in enumerate(everyone) if e["error"] is not None}
        if failed and error is None:
            raise RuntimeError(f"estimate_curvature failed on rank(s) {sorted(failed)} ({failed}); every rank stops "
                               "instead of waiting for it in the factor reduction")
        if not failed:
            ref = everyone[0]["fingerprint"]
            for r, e in enumerate(everyone[1:], 1):
                diff = sorted(k for k in ref if ref[k] != e["fingerprint"].get(k))
                if diff:
                    raise RuntimeError(f"ranks 0 and {r} estimate different curvatures: {', '.join(diff)} differ "
                                       f"(rank 0: {[ref[k] for k in diff]}, rank {r}: "
                                       f"{[e['fingerprint'][k] for k in diff]}); every rank must hold the same model, "
                                       "LoRA weights (the anchors), dtype and estimate_curvature arguments")
    if error is not None:
        raise error


def same_batch_count(count: int) -> None:
    """Under FSDP every rank takes part in every forward and backward (the sharded weights are
    gathered collectively): every rank must bring the same number of proxy batches, or all raise."""
    rank, size = world()
    if size == 1:
        return
    counts: list = [None] * size
    dist.all_gather_object(counts, count)
    if len(set(counts)) > 1:
        raise ValueError(f"under FSDP every rank runs every proxy pass together, but the ranks hold {counts} batches: "
                         "give each rank the same number of batches (max_batches=..., or split the data evenly)")


def all_reduce_sums(sums: dict[str, torch.Tensor], tokens: dict[str, int], packed: Optional[dict[str, int]] = None,
                    tile: int = 0) -> dict[str, int]:
    """Sum every rank's accumulators in place and return the total token count per stream.
    ``packed`` maps the keys of tile-packed factors (tile ``tile``) to their n."""
    rank, size = world()
    if size == 1:
        return tokens
    keys = sorted(sums)
    bucket: list[str] = []
    size_bytes = 0
    for k in keys + [None]:
        if k is not None:
            bucket.append(k)
            size_bytes += _pack(sums[k], k).numel() * sums[k].element_size()
        if bucket and (k is None or size_bytes >= BUCKET_BYTES):
            flat = torch.cat([_pack(sums[b], b) for b in bucket])
            dist.all_reduce(flat)
            off = 0
            for b in bucket:
                n = _pack(sums[b], b).numel()
                _unpack(sums[b], b, flat[off:off + n])
                off += n
            bucket, size_bytes = [], 0
    for key, n in (packed or {}).items():
        mirror_diagonal_tiles_(sums[key], n, tile)
    streams = sorted(tokens)
    count = torch.tensor([tokens[s] for s in streams], dtype=torch.int64)
    if dist.get_backend() == "nccl":
        count = count.cuda()
    dist.all_reduce(count)
    return dict(zip(streams, (int(c) for c in count.tolist())))


def shard_adapters(adapters: dict, variant: str, size: int) -> list[list[str]]:
    """Split adapters over ``size`` ranks, balanced by factor bytes. Adapters sharing an ``Sx``
    stay together (the factor is then read once, on one rank). Deterministic."""
    units: dict[str, list[str]] = {}
    for name, a in adapters.items():
        units.setdefault(a.sx_key if a.has_sx else name, []).append(name)

    def nbytes(names):
        a0 = adapters[names[0]]
        total = a0.in_features ** 2 if a0.has_sx and variant != "diag" else 0
        for n in names:
            a = adapters[n]
            total += a.out_features ** 2 if a.has_sg and variant != "diag" else 0
            total += 2 * a.rank * (a.in_features + a.out_features)
        return total
    load = [0] * size
    shares: list[list[str]] = [[] for _ in range(size)]
    for key in sorted(units, key=lambda k: (-nbytes(units[k]), k)):
        r = min(range(size), key=lambda j: (load[j], j))
        shares[r] += units[key]
        load[r] += nbytes(units[key])
    order = {n: k for k, n in enumerate(adapters)}
    return [sorted(s, key=order.__getitem__) for s in shares]
