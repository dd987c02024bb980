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
    assert_low_rank_codes_round_the_exact_sums(codes, expected, down, scale)
    assert expected[:, k:].float().abs().max() > 8  # P spans much of e4m3's range: the scale is applied


def assert_low_rank_codes_round_the_exact_sums(
    codes: torch.Tensor, expected: torch.Tensor, down: torch.Tensor, scale: torch.Tensor
) -> None:
    """Both P (the last 2R columns of `codes` and of `expected`) are e4m3 roundings of Σ_k codes·down · scale
    up to float32 rounding: the products are exact, a sum of K of them in any order is within
    K·2⁻²⁴·Σ|products| of its exact value, and the scale's product adds 2⁻²⁴ of it (one more for the float64
    → float32 step here). So they agree but where that interval holds an e4m3 rounding midpoint, and there
    they are one step apart."""
    k, rank = down.shape
    products = codes[:, :k].double().cpu(), down.double().cpu()
    exact = (products[0] @ products[1]) * scale.double().cpu()  # (M, R)
    error = (k + 2) * 2.0**-24 * (products[0].abs() @ products[1].abs()) * scale.double().cpu()

    def rounded(v: torch.Tensor) -> torch.Tensor:
        return v.clamp(-448, 448).float().to(torch.float8_e4m3fn).float()

    low, high = rounded(exact - error).repeat(1, 2), rounded(exact + error).repeat(1, 2)
    for p in (codes[:, k:].float().cpu(), expected[:, k:].float().cpu()):
        assert bool(((low <= p) & (p <= high)).all())


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
