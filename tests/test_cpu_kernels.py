"""The C++ CPU kernels (``_C``) as a whole: built, the instruction set chosen at run time, results
bitwise identical run to run and for any thread count, and the fallback when ``_C`` is absent."""
import os
import subprocess
import sys
import warnings

import pytest
import torch
from problems import gram_problem, quad_weights, spd

import lalora_kernels
from lalora_kernels import _cpp, ops as lops
from lalora_kernels.reference.packed_cov_update import packed_cov_update_
from lalora_kernels.reference.packed_format import pack, packed_numel

ops = torch.ops.lalora


def test_cpp_extension_is_built():
    assert _cpp.available(), f"lalora_kernels._C failed to load: {_cpp.load()}"
    info = lalora_kernels.backends()
    assert info["cpp"]["available"] and info["cpu"] == "cpp" and info["default_storage"]["cpu"] == "packed"


def test_cpp_results_are_bitwise_identical_run_to_run_and_across_threads(monkeypatch):
    monkeypatch.setenv("LALORA_BACKEND", "cpp")
    shapes = [(300, 16, 3), (1000, 8, 1), (64, 40, 2)]
    g = gram_problem(shapes, tile=32)
    packed, pflat = g.packed.float(), g.packed_classes
    D = g.D.float()
    X = torch.randn(700, 300)
    mask = torch.rand(700) > 0.2
    threads = torch.get_num_threads()
    outs = []
    try:
        for t in (threads, threads, 1):
            torch.set_num_threads(t)
            G, Q = ops.grouped_gram(D, packed, pflat, 32)
            v, dD = ops.grouped_gram_quad(D, packed, pflat, 32, quad_weights(shapes, torch.float32), True)
            P = torch.zeros(packed_numel(300, 32))
            ops.packed_cov_update_(P, X, mask, 0.5, 32)
            outs.append((G, Q, v, dD, P))
    finally:
        torch.set_num_threads(threads)
    for other in outs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(outs[0], other))


def test_fallback_to_reference_warns_once(monkeypatch):
    monkeypatch.setattr(_cpp, "_state", {"error": "ImportError: _C was not built (test)"})
    monkeypatch.setenv("LALORA_BACKEND", "auto")
    assert lalora_kernels.backends()["cpu"] == "torch"
    P = pack(spd(9).float(), 8)
    ref = P.clone()
    X = torch.randn(6, 9)
    with pytest.warns(_cpp.CppFallbackWarning, match="not built.*no-build-isolation"):
        ops.packed_cov_update_(P, X, None, 1.0, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")          # only once
        ops.packed_cov_update_(P, X, None, 1.0, 8)
    packed_cov_update_(ref, X, None, 1.0, 8)
    packed_cov_update_(ref, X, None, 1.0, 8)
    assert torch.equal(P, ref)
    assert lops.default_storage("cpu", warn=False) == "dense"
    monkeypatch.setenv("LALORA_BACKEND", "cpp")
    with pytest.raises(ValueError, match="LALORA_BACKEND=cpp but lalora_kernels._C is not available"):
        ops.packed_cov_update_(P, X, None, 1.0, 8)


def test_fallback_when_extension_cannot_be_imported():
    """A real failed import (``_C`` blocked): the package still works, says so once, on the reference."""
    code = (
        "import sys, warnings\n"
        "sys.modules['lalora_kernels._C'] = None\n"
        "import torch, lalora_kernels\n"
        "from lalora_kernels.reference.packed_format import pack\n"
        "info = lalora_kernels.backends()\n"
        "assert info['cpu'] == 'torch' and not info['cpp']['available'], info\n"
        "assert 'ImportError' in info['cpp']['error'] or 'ModuleNotFound' in info['cpp']['error'], info\n"
        "P = pack(torch.eye(5), 8)\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    for _ in range(3):\n"
        "        torch.ops.lalora.packed_cov_update_(P, torch.randn(4, 5), None, 1.0, 8)\n"
        "assert len([x for x in w if 'C++ CPU kernels' in str(x.message)]) == 1, [str(x.message) for x in w]\n"
        "print('ok')\n")
    env = {k: v for k, v in os.environ.items() if k != "LALORA_BACKEND"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


def test_cpu_capability_is_chosen_at_run_time_and_capped_by_the_environment():
    """One build carries the tile products for every x86 level; LALORA_CPU_CAPABILITY (else
    ATEN_CPU_CAPABILITY) caps the one in use, which is how make test runs them all on one CPU."""
    code = "import lalora_kernels._cpp as c; print(c.capability())"
    def run(**env):
        full = {k: v for k, v in os.environ.items() if not k.endswith("CPU_CAPABILITY")}
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**full, **env},
                             timeout=300)
        return out.returncode, out.stdout.strip(), out.stderr
    rc, best, err = run()
    assert rc == 0 and best in ("avx512", "avx2", "default"), err[-2000:]
    assert run(LALORA_CPU_CAPABILITY="default")[1] == "default"
    assert run(ATEN_CPU_CAPABILITY="default")[1] == "default"
    assert run(LALORA_CPU_CAPABILITY="avx2")[1] == ("default" if best == "default" else "avx2")
    assert run(LALORA_CPU_CAPABILITY="avx512")[1] == best          # a cap never raises the level
    rc, _, err = run(LALORA_CPU_CAPABILITY="sse9")
    assert rc != 0 and "LALORA_CPU_CAPABILITY=sse9 is unknown; use default, avx2 or avx512" in err
