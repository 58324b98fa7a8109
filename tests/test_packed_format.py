"""The tile-packed format (docs/SPEC.md section 8, ``reference.packed_format``): exact round trips,
the layout, symmetry built from the upper triangle."""
import pytest
import torch
from problems import spd

from lalora_kernels.reference.packed_format import (TILE, mirror_diagonal_tiles_, pack, packed_numel, packed_trace,
                                                    unpack)


@pytest.mark.parametrize("n", [1, 7, 31, 32, 33, 129])
@pytest.mark.parametrize("tile", [1, 8, 16, 32, 64])
def test_round_trip_is_exact(n, tile):
    S = spd(n)
    P = pack(S, tile)
    nt = -(-n // tile)
    assert P.shape == (nt * (nt + 1) // 2 * tile * tile,) == (packed_numel(n, tile),)
    assert torch.equal(unpack(P, n, tile), S)
    assert torch.equal(pack(unpack(P, n, tile), tile), P)
    assert float(packed_trace(P, n, tile)) == pytest.approx(float(S.trace()), rel=1e-14)
    # layout: tile (I, J) at row-major upper-triangle index, element (a, b) row-major in it
    last = nt * (nt + 1) // 2 - 1                       # tile (nt-1, nt-1)
    a = (n - 1) % tile
    assert P[last * tile * tile + a * tile + a] == S[n - 1, n - 1]
    if n > tile + 1:                                   # tile (0, 1), element (0, 1)
        assert P[tile * tile + 1] == S[0, tile + 1]


@pytest.mark.parametrize("tile", [1, 8, 32])
def test_pack_reads_the_upper_triangle_only(tile):
    """Whatever a caller's lower triangle holds (a GEMM's rounding, or garbage), the packed factor is
    that of the upper triangle mirrored: exactly symmetric, and the same on every CPU."""
    n = 45
    S = torch.randn(n, n, dtype=torch.float64)
    P = pack(S, tile)
    sym = S.triu() + S.triu(1).T
    assert torch.equal(P, pack(sym, tile))
    assert torch.equal(unpack(P, n, tile), sym)


def test_mirror_diagonal_tiles_touches_only_their_lower_halves():
    n, tile = 40, 16
    P = pack(spd(n), tile)
    nt = -(-n // tile)
    starts = [I * nt - I * (I - 1) // 2 for I in range(nt)]
    bent = P.clone().view(-1, tile, tile)
    for s in starts:
        bent[s] += torch.randn(tile, tile, dtype=P.dtype).tril(-1)     # a reduction's lower-half rounding
    out = mirror_diagonal_tiles_(bent.view(-1).clone(), n, tile)
    assert torch.equal(out, P)


@pytest.mark.parametrize("n", [1024, 2048, 4096])
def test_packed_bytes_at_most_052_of_dense(n):
    assert packed_numel(n, TILE) / n ** 2 <= 0.52


def test_bad_tile_and_shape_rejected():
    with pytest.raises(ValueError, match="power of two"):
        pack(spd(5), 12)
    with pytest.raises(ValueError, match="packed factor of n=9"):
        unpack(torch.zeros(10, dtype=torch.float64), 9, 8)
