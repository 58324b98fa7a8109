"""``LoRACurvature``: the Laplace curvature of a set of LoRA adapters, its anchors and metadata.

Tensors are kept in one flat dict under SPEC names (``Sx/<leader>``, ``Sg/<module>``, ``Caa/..``,
``Cbb/..``, ``Ka/..``, ``Kb/..``, ``FA/..``, ``FB/..``, anchors ``A0/..`` and ``B0/..``). All
factors are per-token means (SPEC section 6). A factor that SPEC section 5 proves unnecessary for
the variant is simply absent, and ``AdapterInfo.has_sx`` / ``has_sg`` say so.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from . import curvature_file
from .reference import lowrank_format
from .reference.closed_form import finalize
from .reference.packed_format import (TILE, check_tile, mirror_diagonal_tiles_, mirror_upper, pack, packed_numel,
                                      packed_trace, unpack)
from .version import __version__

VARIANTS = ("diag", "kfac", "tri", "wkfac")
FISHERS = ("empirical", "mc")
LAYOUTS = ("dense", "packed", "lowrank")
PACKED_KINDS = ("Sx/", "Sg/")          # the big factors: kept dense, tile-packed, or as U of low rank
EIGEN_KINDS = ("SxE/", "SgE/")         # low rank: each big factor's [rho, lam_1 .. lam_k]
ANCHOR_KINDS = ("A0/", "B0/")


def check_layout(layout: str) -> None:
    if layout not in LAYOUTS:
        raise ValueError(f"storage/layout={layout!r} is unknown; use 'packed' or 'dense'")


def check_variant(variant: str) -> None:
    if variant not in VARIANTS:
        raise ValueError(f"variant={variant!r} is unknown; use one of {', '.join(map(repr, VARIANTS))}")


@dataclass(frozen=True)
class AdapterInfo:
    """Identity of one adapted ``nn.Linear``: ``h = W0 x + scaling * B (A x)``."""
    in_features: int
    out_features: int
    rank: int
    scaling: float
    sx_key: str          # the module whose input this adapter shares (itself if none)
    has_sx: bool         # Sx of sx_key is stored and used by this adapter
    has_sg: bool         # Sg of this module is stored

    def validate(self) -> None:
        for name in ("in_features", "out_features", "rank"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name}={v!r} must be an integer >= 1")
        if isinstance(self.scaling, bool) or not isinstance(self.scaling, (int, float)) \
                or not math.isfinite(self.scaling) or self.scaling <= 0:
            raise ValueError(f"scaling={self.scaling!r} must be a finite number > 0")
        if not isinstance(self.sx_key, str) or not isinstance(self.has_sx, bool) or not isinstance(self.has_sg, bool):
            raise ValueError("sx_key must be a string and has_sx, has_sg booleans")


def _require(fin: dict, key: str, k: int) -> torch.Tensor:
    if key not in fin:
        raise ValueError(f"adapter {k}: {key} is needed; pass {key}[{k}] or the factor it derives from "
                         "(Sx for Caa, Sg for Cbb)")
    return fin[key]


def _symmetric_input(name: str, S: torch.Tensor) -> torch.Tensor:
    """A caller's covariance factor, exactly symmetric: S itself when it is, else (when it is within
    ``LoRACurvature.SYMMETRY_TOL``, e.g. a GEMM's rounding) a copy mirrored from its upper triangle,
    so that dense and packed storage see the same matrix."""
    if not isinstance(S, torch.Tensor) or S.dim() != 2 or S.shape[0] != S.shape[1] or not S.dtype.is_floating_point:
        raise ValueError(f"{name} must be a square floating-point (n, n) tensor, got "
                         f"{tuple(S.shape) if isinstance(S, torch.Tensor) else type(S).__name__}")
    if torch.equal(S, S.T):
        return S
    scale = float(S.abs().max())
    asym = float((S - S.T).abs().max())
    if asym > LoRACurvature.SYMMETRY_TOL * scale:
        raise ValueError(f"{name} is not symmetric (max |S - S^T| = {asym:.3g} of max |S| = {scale:.3g}); pass the "
                         "covariance itself, e.g. X.T @ X / N")
    return mirror_upper(S)


def adapter_tensor_keys(adapters: dict[str, AdapterInfo], names) -> list[str]:
    """Every tensor key the adapters ``names`` may own (their shared Sx included)."""
    keys = []
    for n in names:
        keys += [f"{kind}/{n}" for kind in ("A0", "B0", "Sg", "SgE", "Caa", "Cbb", "Ka", "Kb", "FA", "FB")]
        if adapters[n].has_sx and f"Sx/{adapters[n].sx_key}" not in keys:
            keys += [f"Sx/{adapters[n].sx_key}", f"SxE/{adapters[n].sx_key}"]
    return keys


class LoRACurvature:
    """Curvature factors, anchors and identity of every adapter; see the module docstring."""

    def __init__(self, *, variant: str, fisher: str, mc_samples: int, num_tokens: int,
                 adapter_name: str, model_type: str, adapters: dict[str, AdapterInfo],
                 tensors: dict[str, torch.Tensor], norm_constant: Optional[float] = None,
                 version: str = __version__, layout: str = "dense", tile: int = TILE):
        check_variant(variant)
        check_layout(layout)
        check_tile(tile)
        self.variant, self.fisher, self.mc_samples = variant, fisher, mc_samples
        self.num_tokens, self.adapter_name, self.model_type = num_tokens, adapter_name, model_type
        self.adapters, self.tensors = dict(adapters), dict(tensors)
        self.version, self.layout, self.tile = version, layout, int(tile)
        self.check_shapes()
        self.check_finite()
        self.norm_constant = self._mean_diag() if norm_constant is None else float(norm_constant)

    @classmethod
    def from_tensors(cls, A_star, B_star, *, variant: str, scaling, Sx=(), sx_index=None, Sg=None,
                     Caa=None, Cbb=None, FA=None, FB=None, num_tokens: int = 0,
                     adapter_name: str = "default") -> "LoRACurvature":
        """A curvature from plain per-adapter tensors (see ``fused_laplace_penalty``); ``adapter_name``:
        the peft adapter it is for (``LaLoRARegularizer`` refuses any other)."""
        check_variant(variant)
        n = len(A_star)
        for arg, val in (("B_star", B_star), ("scaling", scaling)):
            if len(val) != n:
                raise ValueError(f"{arg} has {len(val)} entries but A_star has {n}; give one per adapter")
        sx_index = list(sx_index) if sx_index is not None else [None] * n
        Sg = list(Sg) if Sg is not None else [None] * n
        FA, FB, Caa, Cbb = (list(F) if F is not None else [None] * n for F in (FA, FB, Caa, Cbb))
        for arg, val in (("sx_index", sx_index), ("Sg", Sg), ("FA", FA), ("FB", FB), ("Caa", Caa),
                         ("Cbb", Cbb)):
            if len(val) != n:
                raise ValueError(f"{arg} has {len(val)} entries but A_star has {n}; give one per adapter")
        Sx = [_symmetric_input(f"Sx[{j}]", S) for j, S in enumerate(Sx)]
        Sg = [None if S is None else _symmetric_input(f"Sg[{k}]", S) for k, S in enumerate(Sg)]
        tensors, adapters, kron = {}, {}, variant in ("kfac", "tri")
        for k in range(n):
            if A_star[k].dim() != 2 or B_star[k].dim() != 2 or B_star[k].shape[1] != A_star[k].shape[0]:
                raise ValueError(f"adapter {k}: A_star[{k}] {tuple(A_star[k].shape)} and B_star[{k}] "
                                 f"{tuple(B_star[k].shape)} must be (r, in) and (out, r) with the same r")
            name, (r, i), o = f"adapter{k}", A_star[k].shape, B_star[k].shape[0]
            j = sx_index[k]
            if j is not None and not 0 <= j < len(Sx):
                raise ValueError(f"sx_index[{k}]={j} is out of range for {len(Sx)} Sx tensors")
            # SPEC section 5: a block whose weight is exactly zero (kfac/tri: Cbb for the A block, Caa
            # for the B block, zero when B*, resp. A*, is; diag: an all-zero FA or FB) is skipped with
            # the factor only it reads, whatever the caller passed, so that lam, the mean_diag constant
            # and the bytes read are those of an estimated curvature
            has_sx, has_sg = j is not None, Sg[k] is not None
            if kron:         # the given factors derive Caa, Cbb, Ka, Kb even where they are not kept
                fin = finalize(A_star[k], B_star[k], Sx[j] if has_sx else None, Sg[k])
                fin.update({key: v for key, v in (("Caa", Caa[k]), ("Cbb", Cbb[k])) if v is not None})
                has_sx = has_sx and bool(_require(fin, "Cbb", k).any())
                has_sg = has_sg and bool(_require(fin, "Caa", k).any())
            if variant == "wkfac" and not (has_sx and has_sg):
                raise ValueError(f"variant='wkfac' needs Sx and Sg for every adapter; adapter {k} lacks one")
            tensors[f"A0/{name}"], tensors[f"B0/{name}"] = A_star[k], B_star[k]
            if has_sx:
                tensors[f"Sx/input{j}"] = Sx[j]
            if has_sg:
                tensors[f"Sg/{name}"] = Sg[k]
            if kron:
                if has_sx:
                    tensors[f"Cbb/{name}"] = fin["Cbb"]
                if has_sg:
                    tensors[f"Caa/{name}"] = fin["Caa"]
                if variant == "tri" and has_sx and has_sg:
                    tensors[f"Ka/{name}"], tensors[f"Kb/{name}"] = fin["Ka"], fin["Kb"]
            for kind, F in (("FA", FA[k]), ("FB", FB[k])):
                if F is not None and bool(F.any()):
                    tensors[f"{kind}/{name}"] = F
            adapters[name] = AdapterInfo(i, o, r, float(scaling[k]), f"input{j}" if has_sx else name,
                                         has_sx, has_sg)
        dtypes = {t.dtype for k, t in tensors.items() if not k.startswith(("A0/", "B0/"))}
        if not dtypes <= {torch.float32, torch.float64} or len(dtypes) > 1:
            raise ValueError(f"curvature factors must all be float32 or all float64, got {dtypes}; "
                             "cast them with .float() (for bf16 storage, build in fp32, then "
                             ".to(dtype=torch.bfloat16))")
        devices = {t.device for t in tensors.values()}
        if len(devices) > 1:
            raise ValueError(f"factors and anchors are on several devices {devices}; move them to one")
        curv = cls(variant=variant, fisher="empirical", mc_samples=1, num_tokens=num_tokens,
                   adapter_name=adapter_name, model_type="external", adapters=adapters, tensors=tensors)
        curv.validate()
        return curv

    # ---- access -------------------------------------------------------------------------------
    def get(self, kind: str, name: str) -> Optional[torch.Tensor]:
        """The tensor ``kind/name`` (kind in Sx, Sg, Caa, Cbb, Ka, Kb, FA, FB, A0, B0) or None."""
        return self.tensors.get(f"{kind}/{name}")

    def sx(self, name: str) -> Optional[torch.Tensor]:
        """The (i, i) input factor adapter ``name`` reads (unpacked if tile-packed), or None."""
        info = self.adapters[name]
        return self.dense(f"Sx/{info.sx_key}") if info.has_sx else None

    def dim(self, key: str) -> int:
        """n of the n x n factor ``Sx/<leader>`` or ``Sg/<module>``."""
        kind, name = key.split("/", 1)
        if kind in ("Sx", "SxE"):
            info = next((a for a in self.adapters.values() if a.sx_key == name and a.has_sx), None)
            if info is None:
                raise KeyError(f"{key!r} is read by no adapter of this curvature")
            return info.in_features
        return self.adapters[name].out_features

    def is_packed(self, key: str) -> bool:
        return self.layout == "packed" and key.startswith(PACKED_KINDS)

    def is_lowrank(self, key: str) -> bool:
        return self.layout == "lowrank" and key.startswith(PACKED_KINDS)

    @staticmethod
    def eigen_key(key: str) -> str:
        """``SxE/<name>`` of ``Sx/<name>`` (the low-rank factor's eigenvalues and tail)."""
        kind, name = key.split("/", 1)
        return f"{kind}E/{name}"

    def dense(self, key: str) -> Optional[torch.Tensor]:
        """The tensor ``key`` as stored, or its (n, n) matrix when it is tile-packed or low-rank."""
        t = self.tensors.get(key)
        if t is None:
            return t
        if self.is_packed(key):
            return unpack(t, self.dim(key), self.tile)
        if self.is_lowrank(key):
            return lowrank_format.expand(t, self.tensors[self.eigen_key(key)])
        return t

    def trace(self, key: str) -> float:
        t = self.tensors[key]
        if self.is_lowrank(key):
            return lowrank_format.trace(t, self.tensors[self.eigen_key(key)])
        return float(packed_trace(t, self.dim(key), self.tile) if self.is_packed(key) else t.trace())

    def to_layout(self, layout: str, tile: int = TILE, rank: Optional[int] = None,
                  energy: Optional[float] = None) -> "LoRACurvature":
        """Convert ``Sx``/``Sg`` to 'packed' (tile ``tile``), 'dense' or 'lowrank' storage, in place.
        Dense and packed convert exactly in either direction; 'lowrank' keeps the top ``rank``
        eigenpairs of each factor (or as many as hold ``energy`` of its trace) and the trace exactly;
        from 'lowrank' the others hold the low-rank matrix exactly."""
        check_layout(layout)
        check_tile(tile)
        if layout == self.layout and (layout == "dense" or (layout == "packed" and tile == self.tile)):
            return self
        if layout == self.layout == "lowrank":
            raise ValueError("the curvature is low-rank already; re-estimate, or convert from dense factors")
        for key in [k for k in self.tensors if k.startswith(PACKED_KINDS)]:
            dense = self.dense(key)
            self.tensors.pop(self.eigen_key(key), None)
            if layout == "lowrank":
                self.tensors[key], self.tensors[self.eigen_key(key)] = lowrank_format.compress(dense, rank, energy)
            else:
                self.tensors[key] = pack(dense, tile) if layout == "packed" else dense
        self.layout, self.tile = layout, int(tile)
        return self

    @property
    def factor_dtype(self) -> torch.dtype:
        """The dtype the factors are stored in (low rank: U's; its eigenvalues stay fp32/fp64)."""
        return next(t.dtype for k, t in self.tensors.items() if not k.startswith(ANCHOR_KINDS + EIGEN_KINDS))

    @property
    def device(self) -> torch.device:
        return next(iter(self.tensors.values())).device

    def num_factors(self) -> dict[str, int]:
        """How many tensors of each kind are stored (shared Sx counted once)."""
        counts: dict[str, int] = {}
        for key in self.tensors:
            kind = key.split("/", 1)[0]
            counts[kind] = counts.get(kind, 0) + 1
        return counts

    def memory_bytes(self, anchors: bool = False) -> int:
        """Bytes held by the curvature factors (plus the anchors when ``anchors=True``)."""
        return sum(t.numel() * t.element_size() for k, t in self.tensors.items()
                   if anchors or not k.startswith(ANCHOR_KINDS))

    def to(self, device=None, dtype: Optional[torch.dtype] = None) -> "LoRACurvature":
        """Move factors (and anchors) to ``device``; ``dtype`` applies to the factors only (low rank:
        to U; its eigenvalues stay fp32, or fp64 for fp64 factors)."""
        for k, t in self.tensors.items():
            if k.startswith(EIGEN_KINDS):
                self.tensors[k] = t.to(device=device, dtype=None if dtype is None else lowrank_format.eigen_dtype(dtype))
            else:
                self.tensors[k] = t.to(device=device, dtype=None if k.startswith(ANCHOR_KINDS) else dtype)
        return self

    def subset(self, names) -> "LoRACurvature":
        """The curvature of the adapters ``names`` only (tensors shared, not copied)."""
        names = list(names)
        unknown = [n for n in names if n not in self.adapters]
        if unknown:
            raise KeyError(f"adapters {unknown[:3]} are not in this curvature")
        keys = adapter_tensor_keys(self.adapters, names)
        return LoRACurvature(variant=self.variant, fisher=self.fisher, mc_samples=self.mc_samples,
                             num_tokens=self.num_tokens, adapter_name=self.adapter_name,
                             model_type=self.model_type, adapters={n: self.adapters[n] for n in names},
                             tensors={k: self.tensors[k] for k in keys if k in self.tensors},
                             norm_constant=self.norm_constant, version=self.version, layout=self.layout,
                             tile=self.tile)

    # ---- interop ------------------------------------------------------------------------------
    def kfac_blocks(self, module_name: str) -> dict[str, dict[str, Optional[torch.Tensor]]]:
        """Generic per-Linear K-FAC of ``lora_A`` and ``lora_B`` for one adapter (SPEC section 2).

        Returns ``{"lora_A": {"input_cov", "grad_cov"}, "lora_B": {...}, "cross": {"input_cross",
        "grad_cross"}}``. A block is ``grad_cov (x) input_cov`` on the row-major flattened weight,
        so ``vec(D)^T (G (x) A) vec(D) = tr(D^T G D A)``; the cross block (A rows, B columns) is
        ``grad_cross (x) input_cross`` with grad_cross ``(r, o)`` and input_cross ``(i, r)``.
        A factor is None where it was provably unnecessary and not stored; its Kronecker partner
        is then exactly zero, and so is the block.
        """
        if module_name not in self.adapters:
            raise KeyError(f"module_name={module_name!r} is not in this curvature; known: "
                           f"{list(self.adapters)[:4]}...")
        if self.variant == "diag":
            raise ValueError("a 'diag' curvature stores no Kronecker factors; estimate with "
                             "variant='kfac', 'tri' or 'wkfac' to get kfac_blocks()")
        info = self.adapters[module_name]
        s2 = info.scaling ** 2
        A0, B0 = self.get("A0", module_name), self.get("B0", module_name)
        Sx, Sg = self.sx(module_name), self.dense(f"Sg/{module_name}")
        fin = finalize(A0, B0, Sx, Sg)
        Caa = self.get("Caa", module_name)
        Cbb = self.get("Cbb", module_name)
        Caa = fin.get("Caa") if Caa is None else Caa
        Cbb = fin.get("Cbb") if Cbb is None else Cbb
        zero = torch.zeros(info.rank, info.rank, dtype=self.factor_dtype, device=self.device)
        return {
            "lora_A": {"input_cov": Sx, "grad_cov": zero if Cbb is None else s2 * Cbb},
            "lora_B": {"input_cov": zero if Caa is None else Caa, "grad_cov": None if Sg is None else s2 * Sg},
            "cross": {"input_cross": None if "Ka" not in fin else fin["Ka"].T,
                      "grad_cross": None if "Kb" not in fin else s2 * fin["Kb"].T},
        }

    # ---- checks -------------------------------------------------------------------------------
    def check_shapes(self) -> None:
        """Every adapter has the tensors its variant and flags need, and every tensor the shape its
        layout and adapter dimensions call for."""
        for name, a in self.adapters.items():
            need = ["A0", "B0"]
            if self.variant in ("kfac", "tri"):
                need += (["Cbb"] if a.has_sx else []) + (["Caa"] if a.has_sg else [])
                need += ["Ka", "Kb"] if self.variant == "tri" and a.has_sx and a.has_sg else []
            for key in ([f"Sx/{a.sx_key}"] if a.has_sx else []) + ([f"Sg/{name}"] if a.has_sg else []):
                if key not in self.tensors:
                    raise ValueError(f"adapter {name!r} reads {key}, which the curvature lacks; the file or "
                                     "tensors are incomplete: re-estimate or re-save the curvature")
            r, i, o = a.rank, a.in_features, a.out_features
            shapes = {"A0": (r, i), "B0": (o, r), "Caa": (r, r), "Cbb": (r, r), "Ka": (r, i), "Kb": (o, r),
                      "FA": (r, i), "FB": (o, r)}
            for kind, want in shapes.items():
                t = self.get(kind, name)
                if t is None:
                    if kind in need:
                        raise ValueError(f"adapter {name!r} needs {kind}/{name} under variant={self.variant!r}, "
                                         "which the curvature lacks; the file or tensors are incomplete: "
                                         "re-estimate or re-save the curvature")
                elif tuple(t.shape) != want:
                    raise ValueError(f"curvature tensor '{kind}/{name}' has shape {tuple(t.shape)}; adapter "
                                     f"{name!r} (in={i}, out={o}, r={r}) needs {want}")
        for key, t in self.tensors.items():
            if not key.startswith(PACKED_KINDS + EIGEN_KINDS):
                continue
            n = self.dim(key)
            if self.layout == "lowrank":
                E = self.tensors.get(self.eigen_key(key)) if key.startswith(PACKED_KINDS) else t
                U = t if key.startswith(PACKED_KINDS) else self.tensors.get(key.replace("E/", "/", 1))
                if U is None or E is None or U.dim() != 2 or U.shape[0] != n or not 1 <= U.shape[1] <= n \
                        or tuple(E.shape) != (U.shape[1] + 1,):
                    raise ValueError(f"curvature tensor {key!r}: a low-rank factor of n={n} is U (n, k) with "
                                     "1 <= k <= n and its eigenvalues [rho, lam_1..lam_k] (k + 1,); the file or "
                                     "tensors are incomplete or mismatched")
                continue
            if key.startswith(EIGEN_KINDS):
                raise ValueError(f"curvature tensor {key!r} belongs to the low-rank layout, not {self.layout!r}")
            want = (packed_numel(n, self.tile),) if self.layout == "packed" else (n, n)
            if tuple(t.shape) != want:
                raise ValueError(f"curvature tensor {key!r} has shape {tuple(t.shape)}, but layout="
                                 f"{self.layout!r} (tile {self.tile}) with n={n} needs {want}; convert "
                                 "with to_layout() or pass the matching layout")

    def check_finite(self) -> None:
        for k, t in self.tensors.items():
            # one reduction per tensor; the exact elementwise test only when the sum is not finite
            # (a sum can also overflow on finite entries)
            if not bool(torch.isfinite(t.sum())) and not bool(torch.isfinite(t).all()):
                raise ValueError(f"curvature tensor {k!r} has non-finite entries (NaN/Inf); the proxy "
                                 "pass overflowed or the model diverged: re-estimate in fp32 on finite data")

    FACTOR_DTYPES = (torch.float32, torch.float64, torch.bfloat16)
    SYMMETRY_TOL = 1e-5          # |S - S^T| / max|S| accepted (and mirrored away) from foreign data

    def validate(self, stored_norm: Optional[float] = None) -> None:
        """The checks for data from outside (files, ``from_tensors``): factors of one float dtype,
        anchors floating; every symmetric factor symmetric (to ``SYMMETRY_TOL``, then made exact
        from its upper triangle) with a non-negative diagonal; ``FA``/``FB`` non-negative; and, with
        ``stored_norm``, the normalisation consistent with the factors."""
        factor_dtypes = {t.dtype for k, t in self.tensors.items() if not k.startswith(ANCHOR_KINDS + EIGEN_KINDS)}
        if not factor_dtypes <= set(self.FACTOR_DTYPES) or len(factor_dtypes) > 1:
            raise ValueError(f"the factors are {sorted(map(str, factor_dtypes))}; they must all be one of float32, "
                             "float64 or bfloat16: cast them with curvature.to(dtype=...)")
        bad = [k for k, t in self.tensors.items() if k.startswith(ANCHOR_KINDS) and not t.dtype.is_floating_point]
        if bad:
            raise ValueError(f"anchors {bad[:3]} are not floating point")
        for key, t in self.tensors.items():
            kind = key.split("/", 1)[0]
            if kind in ("SxE", "SgE"):
                if not t.dtype.is_floating_point or bool((t < 0).any()):
                    raise ValueError(f"curvature tensor {key!r} holds a negative eigenvalue or tail; a low-rank "
                                     "covariance factor's are >= 0")
            elif self.is_lowrank(key):
                continue                         # U: any orthonormal-ish basis defines a symmetric S_c
            elif kind in ("Sx", "Sg", "Caa", "Cbb"):
                self._symmetric(key, t)
            elif kind in ("FA", "FB") and bool((t < 0).any()):
                raise ValueError(f"curvature tensor {key!r} has negative entries; a diagonal Fisher is a mean of squares")
        if stored_norm is not None:
            fresh = self._mean_diag()
            tol = 1e-2 if self.factor_dtype == torch.bfloat16 else 1e-5
            if not math.isclose(stored_norm, fresh, rel_tol=tol, abs_tol=1e-300):
                raise ValueError(f"norm_constant={stored_norm!r} does not match the factors' mean diagonal {fresh!r}; "
                                 "the file was edited or corrupted: re-save the curvature")

    def _symmetric(self, key: str, t: torch.Tensor) -> None:
        """Check one symmetric factor (dense, or the diagonal tiles of a packed one) and mirror it."""
        if not t.numel():
            return
        scale = max(abs(float(t.amax())), abs(float(t.amin())))
        if self.is_packed(key):
            n, T = self.dim(key), self.tile
            nt = -(-n // T)
            blocks = t.view(-1, T, T)[torch.tensor([I * nt - I * (I - 1) // 2 for I in range(nt)], device=t.device)]
            asym = float((blocks - blocks.transpose(1, 2)).abs().max())
            diag = blocks.diagonal(dim1=1, dim2=2)
        else:          # in row blocks, so that no n x n temporary is made
            asym = max(float((t[i:i + 1024] - t[:, i:i + 1024].T).abs().max()) for i in range(0, t.shape[0], 1024))
            diag = t.diagonal()
        if asym > self.SYMMETRY_TOL * scale:
            raise ValueError(f"curvature tensor {key!r} is not symmetric (max |S - S^T| = {asym:.3g} of max |S| = "
                             f"{scale:.3g}); a covariance factor must be")
        if bool((diag < -self.SYMMETRY_TOL * scale).any()):
            raise ValueError(f"curvature tensor {key!r} has a negative diagonal entry ({float(diag.min()):.3g}); "
                             "a covariance factor is positive semi-definite")
        if asym:
            if self.is_packed(key):
                mirror_diagonal_tiles_(t, self.dim(key), self.tile)
            else:
                t.copy_(mirror_upper(t))

    def check_model(self, layers: dict[str, tuple[int, int, int, float]]) -> None:
        """Raise if ``layers`` (name -> (in, out, rank, scaling)) is not the adapter set estimated."""
        mine, theirs = set(self.adapters), set(layers)
        if mine != theirs:
            missing, extra = sorted(mine - theirs)[:3], sorted(theirs - mine)[:3]
            raise ValueError("the curvature does not match the model's LoRA layers: missing in model "
                             f"{missing}, not in curvature {extra}; estimate the curvature on this model "
                             "(same target_modules and module names)")
        for name, (i, o, r, s) in layers.items():
            a = self.adapters[name]
            if (a.in_features, a.out_features, a.rank) != (i, o, r) or not math.isclose(a.scaling, s):
                raise ValueError(f"adapter {name!r}: curvature has (in, out, r, scaling)="
                                 f"{(a.in_features, a.out_features, a.rank, a.scaling)}, model has "
                                 f"{(i, o, r, s)}; re-estimate the curvature for this LoRA config")

    # ---- normalisation (SPEC section 6) ---------------------------------------------------------
    def _mean_diag(self) -> float:
        """Mean diagonal of F over the parameters the variant penalises."""
        total, count = 0.0, 0
        for name, a in self.adapters.items():
            s2, i, o, r = a.scaling ** 2, a.in_features, a.out_features, a.rank
            if self.variant == "diag":
                for kind, n in (("FA", r * i), ("FB", o * r)):
                    t = self.get(kind, name)
                    if t is not None:
                        total, count = total + float(t.sum()), count + n
            elif self.variant == "wkfac":
                total += s2 * self.trace(f"Sx/{a.sx_key}") * self.trace(f"Sg/{name}")
                count += i * o
            else:
                if a.has_sx:
                    total += s2 * float(self.get("Cbb", name).trace()) * self.trace(f"Sx/{a.sx_key}")
                    count += r * i
                if a.has_sg:
                    total += s2 * self.trace(f"Sg/{name}") * float(self.get("Caa", name).trace())
                    count += o * r
        return total / count if count else 0.0

    # ---- files --------------------------------------------------------------------------------
    def save(self, path) -> None:
        """Write factors, anchors and metadata to one safetensors file, atomically (``curvature_file``)."""
        curvature_file.save(self, path)

    @classmethod
    def load(cls, path, device="cpu", adapters=None, layout: Optional[str] = None,
             tile: Optional[int] = None) -> "LoRACurvature":
        """Read a file written by ``save``, checking every field and tensor (``curvature_file``);
        ``device`` is where the tensors go. ``adapters``: load only these adapters' tensors (a rank's
        share under ``shard_factors``). ``layout``: convert to 'packed' (tile ``tile``) or 'dense'
        storage; None keeps the file's layout."""
        return curvature_file.load(cls, path, device, adapters, layout, tile)

    def __repr__(self) -> str:
        return (f"LoRACurvature(variant={self.variant!r}, fisher={self.fisher!r}, adapters="
                f"{len(self.adapters)}, tokens={self.num_tokens}, layout={self.layout!r}, factors={self.num_factors()}, "
                f"MiB={self.memory_bytes() / 2**20:.2f})")
