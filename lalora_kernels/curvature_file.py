"""Curvature files: one safetensors file per ``LoRACurvature`` (factors, anchors, and the metadata as
JSON under the key ``lalora``), written atomically and read back with every field and tensor checked.

The metadata schema is versioned (``format``); a file from a newer format, with unknown fields or
tensors, of several factor dtypes, with non-finite or negative-diagonal factors, or whose stored
normalisation does not match its factors is refused, and every error names the file.
"""
from __future__ import annotations

import json
import math
import os
import stat
import tempfile
from dataclasses import asdict, fields
from typing import Optional

import torch

FORMAT = 1          # the metadata schema this version writes and reads
META_KEY = "lalora"
META_FIELDS = {"format": int, "variant": str, "fisher": str, "mc_samples": int, "num_tokens": int,
               "adapter_name": str, "model_type": str, "norm_constant": float, "version": str, "layout": str,
               "tile": int, "adapters": dict}
OPTIONAL_FIELDS = {"format"}         # absent in files written before the schema was versioned


class CurvatureFileError(ValueError):
    """A curvature file is unreadable, malformed or inconsistent; the message names the file."""


def save(curv, path) -> None:
    """Write ``curv`` to ``path`` atomically: to a temporary file in the same folder, then renamed
    over the old one, so that a crash leaves the old file or the complete new one. An existing
    file keeps its permissions; a symbolic link is kept and its target replaced."""
    from safetensors.torch import save_file
    path = os.path.realpath(os.fspath(path))
    meta = {"format": FORMAT, "variant": curv.variant, "fisher": curv.fisher, "mc_samples": curv.mc_samples,
            "num_tokens": curv.num_tokens, "adapter_name": curv.adapter_name, "model_type": curv.model_type,
            "norm_constant": curv.norm_constant, "version": curv.version, "layout": curv.layout,
            "tile": curv.tile, "adapters": {k: asdict(v) for k, v in curv.adapters.items()}}
    mode = stat.S_IMODE(os.stat(path).st_mode) if os.path.exists(path) else None
    fd, tmp = tempfile.mkstemp(prefix=".lalora-", suffix=".tmp", dir=os.path.dirname(path) or ".")
    os.close(fd)
    try:
        save_file({k: t.detach().contiguous().cpu() for k, t in curv.tensors.items()}, tmp,
                  metadata={META_KEY: json.dumps(meta)})
        if mode is None:            # a new file: the permissions a plain open() would give it
            umask = os.umask(0)
            os.umask(umask)
            mode = 0o666 & ~umask
        os.chmod(tmp, mode)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def read_meta(path: str, f) -> dict:
    """The metadata of an open file, each field of the schema's type."""
    raw = (f.metadata() or {}).get(META_KEY)
    if raw is None:
        raise CurvatureFileError(f"{path}: not a LoRACurvature file (no '{META_KEY}' metadata); write it with "
                                 "LoRACurvature.save")
    try:
        meta = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise CurvatureFileError(f"{path}: its '{META_KEY}' metadata is not valid JSON ({exc})") from exc
    if not isinstance(meta, dict):
        raise CurvatureFileError(f"{path}: its '{META_KEY}' metadata is a {type(meta).__name__}, not an object")
    fmt = meta.get("format", FORMAT)
    if not isinstance(fmt, int) or fmt > FORMAT:
        raise CurvatureFileError(f"{path}: written in format {fmt!r} by lalora_kernels {meta.get('version', '?')}; "
                                 f"this version reads format {FORMAT}: upgrade lalora_kernels")
    unknown = sorted(set(meta) - set(META_FIELDS))
    if unknown:
        raise CurvatureFileError(f"{path}: unknown metadata fields {unknown} (written by lalora_kernels "
                                 f"{meta.get('version', '?')}?); upgrade lalora_kernels")
    for name, kind in META_FIELDS.items():
        if name not in meta:
            if name in OPTIONAL_FIELDS:
                continue
            raise CurvatureFileError(f"{path}: the metadata lacks the field {name!r}; re-save the curvature")
        value = meta[name]
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) if kind is float else \
            isinstance(value, kind) and not (kind is int and isinstance(value, bool))
        if not ok:
            raise CurvatureFileError(f"{path}: metadata field {name!r} is {value!r}; it must be a {kind.__name__}")
    c = meta["norm_constant"]
    if not (math.isfinite(c) and (c == 0 or c >= torch.finfo(torch.float64).tiny)):
        raise CurvatureFileError(f"{path}: norm_constant={c!r} must be 0 or a finite, normal positive number")
    return meta


def read_adapters(path: str, raw: dict) -> dict:
    from .curvature import AdapterInfo
    names = {f.name: f.type for f in fields(AdapterInfo)}
    out = {}
    for name, info in raw.items():
        if not isinstance(info, dict) or set(info) != set(names):
            raise CurvatureFileError(f"{path}: adapter {name!r} must have exactly the fields {sorted(names)}")
        try:
            out[name] = AdapterInfo(**info)
            out[name].validate()
        except (TypeError, ValueError) as exc:
            raise CurvatureFileError(f"{path}: adapter {name!r}: {exc}") from exc
    return out


def load(cls, path, device="cpu", adapters=None, layout: Optional[str] = None, tile: Optional[int] = None):
    """Read a file written by ``save`` (see ``LoRACurvature.load``)."""
    from safetensors import SafetensorError, safe_open

    from .curvature import adapter_tensor_keys
    path = os.fspath(path)
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"load(device={str(device)!r}) but CUDA is not available here; load on 'cpu'")
    try:
        # safetensors takes 'cpu' but not 'cpu:0' (what accelerate's FSDP sets as the Trainer's device)
        with safe_open(path, framework="pt", device="cpu" if device.type == "cpu" else str(device)) as f:
            meta = read_meta(path, f)
            infos = read_adapters(path, meta.pop("adapters"))
            meta.pop("format", None)
            present = set(f.keys())
            allowed = set(adapter_tensor_keys(infos, infos))
            junk = sorted(present - allowed)
            if junk:
                raise CurvatureFileError(f"{path}: tensors {junk[:4]} belong to no adapter of the file; the file "
                                         "was edited or is not a LoRACurvature file")
            unknown = [n for n in (adapters or ()) if n not in infos]
            if unknown:
                raise CurvatureFileError(f"{path}: adapters {unknown[:3]} are not in the file, which holds "
                                         f"{len(infos)} adapters (e.g. {sorted(infos)[:3]})")
            if adapters is not None:
                infos = {n: infos[n] for n in adapters}
            keys = [k for k in adapter_tensor_keys(infos, infos) if k in present]
            tensors = {k: f.get_tensor(k) for k in keys}
    except (SafetensorError, OSError) as exc:
        raise CurvatureFileError(f"{path}: cannot be read as safetensors ({exc})") from exc
    try:
        curv = cls(adapters=infos, tensors=tensors, **meta)
        curv.validate(stored_norm=meta["norm_constant"] if adapters is None else None)
    except ValueError as exc:
        raise CurvatureFileError(f"{path}: {exc}") from exc
    return curv if layout is None else curv.to_layout(layout, tile if tile is not None else curv.tile)
