"""Malformed input to the public lalora:: ops, on every backend, each case in a worker process so that
a crash is a failing test: the probes that once read or wrote outside their buffers, and a fuzz test
(hypothesis) over class tables, tiles and sizes. Every case must give a clean Python error that
names the argument, or the reference's exact result (empty classes give exact zeros)."""
import json

import pytest
from conftest import available_backends
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from isolated import Worker

CLEAN = ("ValueError", "TypeError")


@pytest.fixture(scope="module", params=available_backends())
def worker(request):
    w = Worker(LALORA_BACKEND=request.param)
    yield w
    w.close()


def _gram_case(classes, tile, d_numel, s_numel, op="grouped_gram", c_numel=None):
    """Code for one grouped_gram(_quad) call on random buffers of the given sizes, compared with the
    reference when it succeeds (result: the largest difference, and whether every output is finite)."""
    grad = "" if op == "grouped_gram" else f", torch.randn({c_numel}), True"
    return f"""
D, arena = torch.randn({d_numel}), torch.randn({s_numel})
out = ops.{op}(D, arena, {json.dumps(classes)}, {tile}{grad})
ref = reference["{op}"](D, arena, {json.dumps(classes)}, {tile}{grad})
result = {{"diff": max(float((a - b).abs().max()) if a.numel() else 0.0 for a, b in zip(out, ref)),
          "finite": all(bool(torch.isfinite(a).all()) for a in out), "sizes": [a.numel() for a in out]}}
"""


def _expect_clean_error(answer, match):
    assert "crashed" not in answer, f"the worker crashed (rc {answer.get('crashed')}): {answer.get('stderr')}"
    assert not answer["ok"], f"accepted: {answer}"
    assert answer["error"] in CLEAN and match in answer["message"], answer


# ---- the probes that used to reach memory unchecked ---------------------------------------------
def test_packed_update_with_an_overflowing_tile(worker):
    answer = worker.run("ops.packed_cov_update_(torch.zeros(0), torch.randn(4, 9), None, 1.0, 2**32)")
    _expect_clean_error(answer, "tile=4294967296 must be a power of two from 1 to 64")


@pytest.mark.parametrize("field,value,match", [
    (4, -2048, "s_off=-2048"),          # a negative factor offset: read outside the arena
    (3, -9, "d_off=-9"),                # negative row offset
    (5, -4, "g_off=-4"),                # negative Gram offset: heap corruption in the C++ kernel
    (0, 0, "n=0"),                      # an empty factor
    (0, -3, "n=-3"),
    (1, -1, "R=-1"),
    (1, 0, "R=0"),
    (2, -1, "m=-1"),
    (4, 10**6, "reads arena"),          # past the arena's end (Triton: SIGSEGV)
    (3, 10**6, "reads D"),
])
@pytest.mark.parametrize("tile", [0, 32])
def test_bad_class_tables_are_refused(worker, field, value, match, tile):
    n, R = 40, 3
    classes = [n, R, 1, 0, 0, 0]
    classes[field] = value
    s = n * n if tile == 0 else 2 * 2 * 32 * 32 // 2 + 32 * 32
    for op in ("grouped_gram", "grouped_gram_quad"):
        _expect_clean_error(worker.run(_gram_case(classes, tile, R * n, s, op, R * R)), match)


def test_overlapping_classes_are_refused(worker):
    classes = [8, 2, 1, 0, 0, 0, 8, 2, 1, 16, 64, 0]      # both write G[0:4]
    _expect_clean_error(worker.run(_gram_case(classes, 0, 32, 128)), "Gram blocks of classes 0 and 1 overlap")


@pytest.mark.parametrize("tile", [0, 32])
def test_empty_classes_give_exact_zeros(worker, tile):
    """m = 0 (no bundles) and no classes at all: exact zeros, never uninitialised memory."""
    for classes in ([40, 3, 0, 0, 0, 0], []):
        answer = worker.run(_gram_case(classes, tile, 0, 0, "grouped_gram_quad", 0))
        assert answer.get("ok"), answer
        assert answer["result"]["diff"] == 0.0 and answer["result"]["finite"]
    code = """
v, dD = ops.grouped_gram_quad(torch.zeros(0), torch.zeros(0), [40, 3, 0, 0, 0, 0], 0, torch.zeros(0), True)
result = [float(v), dD.numel()]
"""
    assert worker.run(code) == {"ok": True, "result": [0.0, 0]}


def test_gaps_in_a_table_read_as_zeros(worker):
    """A hand-made table may leave rows of D and blocks of G to no class: they come back 0."""
    classes = [8, 2, 1, 4, 0, 6]                       # D[0:4] and G[0:6] belong to no class
    answer = worker.run(_gram_case(classes, 0, 4 + 16, 64))
    assert answer.get("ok") and answer["result"]["diff"] <= 1e-5 and answer["result"]["finite"], answer
    code = """
D = torch.randn(20)
G, Q = ops.grouped_gram(D, torch.randn(64), [8, 2, 1, 4, 0, 6], 0)
result = [G[:6].abs().max().item(), Q[:4].abs().max().item()]
"""
    assert worker.run(code) == {"ok": True, "result": [0.0, 0.0]}


def test_wrong_dtypes_and_devices_are_refused(worker):
    _expect_clean_error(worker.run("ops.grouped_gram(torch.randn(6), torch.randn(16).int(), [4, 1, 1, 0, 0, 0], 0)"),
                        "arena must be a floating-point tensor, got torch.int32")
    _expect_clean_error(worker.run("ops.cov_update_(torch.zeros(3, 3).half(), torch.randn(2, 3), None, 1.0)"),
                        "S is torch.float16")
    _expect_clean_error(worker.run("ops.cov_update_(torch.zeros(3, 3), torch.randn(2, 3), torch.ones(3), 1.0)"),
                        "mask has shape (3,)")
    _expect_clean_error(worker.run("ops.cov_update_(torch.zeros(3, 3), torch.randn(2, 3), None, float('nan'))"),
                        "weight=nan must be finite")


# ---- the fuzz test ----------------------------------------------------------------------------------
FIELD = st.one_of(st.integers(-3, 3), st.integers(0, 80), st.sampled_from([-2**40, 2**31, 2**62]))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=st.lists(st.tuples(FIELD, FIELD, FIELD, FIELD, FIELD, FIELD), max_size=3),
       tile=st.sampled_from([0, 16, 32, 3, -32, 128]), d_numel=st.integers(0, 400), s_numel=st.integers(0, 5000),
       quad=st.booleans())
def test_fuzz_grouped_ops(worker, rows, tile, d_numel, s_numel, quad):
    classes = [v for row in rows for v in row]
    c_numel = sum(r[1] * r[1] * r[2] for r in rows if r[1] > 0 and r[2] > 0 and r[1] * r[1] * r[2] < 10**6)
    answer = worker.run(_gram_case(classes, tile, d_numel, s_numel, "grouped_gram_quad" if quad else "grouped_gram",
                                   c_numel))
    assert "crashed" not in answer, f"crashed on classes={classes} tile={tile}: {answer}"
    if answer["ok"]:                        # a valid table: the reference's result, finite
        assert answer["result"]["finite"] and answer["result"]["diff"] <= 1e-3, (classes, tile, answer)
    else:
        assert answer["error"] in CLEAN, (classes, tile, answer)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(n=st.integers(-2, 70), numel=st.integers(0, 6000), tile=st.sampled_from([1, 8, 16, 32, 0, 5, 2**32]),
       rows=st.integers(0, 9))
def test_fuzz_packed_update(worker, n, numel, tile, rows):
    code = f"""
P = torch.zeros({numel})
X = torch.randn({rows}, {max(n, 0)})
ops.packed_cov_update_(P, X, None, 0.5, {tile})
result = bool(torch.isfinite(P).all())
"""
    answer = worker.run(code)
    assert "crashed" not in answer, f"crashed on n={n} numel={numel} tile={tile}: {answer}"
    assert answer["ok"] and answer["result"] or answer.get("error") in CLEAN, answer
