"""SVDQuant's low-rank codes kernel (`ditq.kernels.triton.lowrank`) against its PyTorch reference; Triton runs
under `TRITON_INTERPRET=1` on the CPU at small odd shapes (M not a multiple of the block, K past a block edge)."""

from __future__ import annotations

import pytest
import torch

from ditq.kernels.triton.lowrank import append_lowrank_codes, append_lowrank_codes_reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def low_rank_down(k: int, rank: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """L1_q (K, R) e4m3 and its scale as `ditq.kernels.fp8._lowrank_parts` makes them (|P| ≤ 448)."""
    g = torch.Generator().manual_seed(seed)
    down = (torch.randn(k, rank, generator=g) * 100).clamp(-448, 448).to(torch.float8_e4m3fn)
    return down.to(DEVICE), (1 / down.float().abs().sum(0, keepdim=True)).to(DEVICE)


def operands(m: int, k: int, rank: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    codes = torch.empty(m, k + 2 * rank, dtype=torch.float8_e4m3fn)
    codes[:, :k] = (torch.randn(m, k, generator=g) * 100).clamp(-448, 448).to(torch.float8_e4m3fn)
    return codes.to(DEVICE), *low_rank_down(k, rank, seed + 1)


@pytest.mark.parametrize(("m", "k", "rank"), [(7, 48, 16), (70, 131, 32), (1, 16, 16)])
def test_low_rank_codes_are_the_reference(m, k, rank):
    codes, down, scale = operands(m, k, rank, seed=k)
    expected = codes.clone()
    append_lowrank_codes_reference(expected, down, scale)
    append_lowrank_codes(codes, down, scale, block_m=16, block_k=32)
    assert torch.equal(codes[:, :k].float(), expected[:, :k].float())  # the input's own codes stay
    assert torch.equal(codes[:, k : k + rank].float(), codes[:, k + rank :].float())  # P twice
    # float32 sums in another order: a rare P one e4m3 step off
    a, b = codes[:, k:].float(), expected[:, k:].float()
    torch.testing.assert_close(a, b, rtol=2**-3, atol=2**-9)
    assert (a != b).float().mean() < 0.02
    assert (
        expected[:, k:].float().abs().max() > 8
    )  # P spans a good part of e4m3's range: the scale is applied


def test_an_empty_batch_launches_nothing():
    codes, down, scale = operands(0, 48, 16)
    append_lowrank_codes(codes, down, scale)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda c, d, s: (c[:, :-1], d, s), r"codes must be e4m3 \(M, 48 \+ 2·16\)"),
        (lambda c, d, s: (c, d[:, :12].contiguous(), s[:, :12]), "power of two >= 16"),
        (lambda c, d, s: (c, d, s.double()), r"down_scale must be float32 \(1, 16\)"),
    ],
    ids=["codes_width", "rank", "scale_dtype"],
)
def test_bad_operands_are_refused_by_name(change, message):
    with pytest.raises(ValueError, match=message):
        append_lowrank_codes(*change(*operands(3, 48, 16)))
