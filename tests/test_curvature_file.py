"""Curvature files: saved atomically (permissions and symlinks kept), and read back with every field
and tensor checked; each edit a careless or hostile user might make is refused with the file named."""
import json
import os
import stat

import pytest
import torch
from problems import curvature_of, penalty_problem
from safetensors import safe_open
from safetensors.torch import save_file

from lalora_kernels import LaplacePenalty, LoRACurvature
from lalora_kernels.curvature_file import CurvatureFileError


@pytest.fixture
def saved(tmp_path):
    p = penalty_problem(zero_b=())
    path = tmp_path / "c.safetensors"
    curv = curvature_of(p, "tri")
    curv.save(path)
    return path, p


def _edit(path, tensors=None, meta=None, raw_meta=None):
    """Rewrite a curvature file with some tensors or metadata fields changed."""
    with safe_open(path, framework="pt") as f:
        ts = {k: f.get_tensor(k) for k in f.keys()}
        m = json.loads(f.metadata()["lalora"])
    ts.update(tensors(ts) if tensors else {})
    m.update(meta or {})
    save_file(ts, path, metadata={"lalora": raw_meta if raw_meta is not None else json.dumps(m)})


def _refused(path, match):
    with pytest.raises(CurvatureFileError, match=match) as info:
        LoRACurvature.load(path)
    assert str(path) in str(info.value), "the error names the file"


def test_round_trip(saved):
    path, p = saved
    back = LoRACurvature.load(path)
    curv = curvature_of(p, "tri")
    assert all(torch.equal(back.tensors[k], t) for k, t in curv.tensors.items())
    assert back.norm_constant == curv.norm_constant


@pytest.mark.parametrize("device", ["cpu:0", torch.device("cpu", 0)])
def test_load_on_an_indexed_cpu_device(saved, device):
    # accelerate's FSDP sets the Trainer's device to cpu:0, which safetensors does not take as it is
    path, p = saved
    back = LoRACurvature.load(path, device=device)
    assert all(torch.equal(back.tensors[k], t) for k, t in curvature_of(p, "tri").tensors.items())


@pytest.mark.parametrize("value,match", [(float("inf"), "norm_constant=inf"), (1e-320, "norm_constant=1e-320"),
                                         (3.5, "norm_constant=3.5 does not match")])
def test_normalisation_must_be_finite_normal_and_match_the_factors(saved, value, match):
    path, _ = saved
    _edit(path, meta={"norm_constant": value})
    _refused(path, match)


def test_negated_factor_is_refused(saved):
    path, _ = saved
    _edit(path, tensors=lambda ts: {"Sg/adapter0": -ts["Sg/adapter0"]})
    _refused(path, "'Sg/adapter0' has a negative diagonal entry")


def test_asymmetric_factor_is_refused(saved):
    path, _ = saved
    _edit(path, tensors=lambda ts: {"Sx/input0": ts["Sx/input0"] + torch.randn_like(ts["Sx/input0"]).triu(1)})
    _refused(path, "'Sx/input0' is not symmetric")


def test_integer_and_mixed_dtype_factors_are_refused(saved, tmp_path):
    path, _ = saved
    _edit(path, tensors=lambda ts: {"Sg/adapter0": (100 * ts["Sg/adapter0"]).int()})
    _refused(path, "they must all be one of float32, float64 or bfloat16")
    other = tmp_path / "mixed.safetensors"
    curvature_of(penalty_problem(zero_b=()), "tri").save(other)
    _edit(other, tensors=lambda ts: {"Sg/adapter0": ts["Sg/adapter0"].float()})
    _refused(other, "they must all be one of")


def test_unknown_tensor_is_refused(saved):
    path, _ = saved
    _edit(path, tensors=lambda ts: {"junk": torch.zeros(3)})
    _refused(path, r"tensors \['junk'\] belong to no adapter")


@pytest.mark.parametrize("meta,raw,match", [
    ({"colour": "blue"}, None, r"unknown metadata fields \['colour'\]"),
    ({"format": 99}, None, "written in format 99"),
    ({"tile": "32"}, None, "'tile' is '32'; it must be a int"),
    ({"adapters": {"adapter0": {"rank": 3}}}, None, "adapter 'adapter0' must have exactly the fields"),
    (None, "{not json", "not valid JSON"),
    (None, "[1, 2]", "metadata is a list, not an object"),
])
def test_malformed_metadata_is_refused(saved, meta, raw, match):
    path, _ = saved
    _edit(path, meta=meta, raw_meta=raw)
    _refused(path, match)


def test_a_file_that_is_not_safetensors_names_the_path(tmp_path):
    path = tmp_path / "garbage.safetensors"
    path.write_bytes(b"\x00" * 64)
    _refused(path, "cannot be read as safetensors")


def test_load_on_cuda_without_cuda(saved):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(ValueError, match="CUDA is not available here; load on 'cpu'"):
        LoRACurvature.load(saved[0], device="cuda")


def test_save_keeps_permissions_and_symlinks(saved, tmp_path):
    path, p = saved
    os.chmod(path, 0o640)
    link = tmp_path / "link.safetensors"
    link.symlink_to(path)
    curv = curvature_of(p, "kfac")
    curv.save(link)
    assert link.is_symlink(), "the link is kept, its target replaced"
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o640
    assert LoRACurvature.load(path).variant == "kfac"
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".lalora-")], "no temporary file left"


def test_a_failed_save_leaves_the_old_file(saved, monkeypatch):
    path, p = saved
    before = path.read_bytes()
    import lalora_kernels.curvature_file as cf
    monkeypatch.setattr(cf.os, "replace", lambda *a: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError, match="disk full"):
        curvature_of(p, "kfac").save(path)
    assert path.read_bytes() == before
    assert not [f for f in os.listdir(path.parent) if f.startswith(".lalora-")]


def test_penalty_refuses_lam_that_overflows(saved):
    curv = LoRACurvature.load(saved[0])
    with pytest.raises(ValueError, match="lam=1e\\+308 times the scaling"):
        LaplacePenalty(curv, lam=1e308)
    with pytest.raises(ValueError, match="lam=inf must be a finite number"):
        LaplacePenalty(curv, lam=float("inf"))
