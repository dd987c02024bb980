"""TerDiT: ternary QAT (quantizer, STE, α), the adaLN RMSNorm, training, 2-bit export, released checkpoints."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import nn

import ditq
from ditq.diffusion import create_diffusion
from ditq.methods.terdit import TERDIT, export_packed, load_released, unpack_hqq_2bit
from ditq.models import create
from ditq.models.terdit import LlamaDiT
from ditq.qat import QAT, convert, prepare
from ditq.quant.fakequant import FakeQuantLinear
from ditq.quant.qlinear import QuantLinear
from ditq.quant.spec import QuantSpec
from ditq.train import TrainConfig, build_parser, config_from_args, train
from ditq.training import schedules
from ditq.training.checkpoint import load_train_state
from tests.test_train import assert_same_runs, kill_during_fifth_step, tiny_config

TERNARY = QuantSpec(w_bits=2, w_format="ternary")
EPS = 1e-6

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_dit(adaln_norm: bool = True) -> nn.Module:
    torch.manual_seed(0)
    model = create("DiT-MNIST", depth=2, hidden_size=64, num_heads=2, patch_size=8, adaln_norm=adaln_norm)
    with torch.no_grad():  # leave adaLN-Zero so that every layer matters
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.02)
    return model


# --------------------------------------------------------------------------------------------
# The quantizer, per chunk, against the formulas
# --------------------------------------------------------------------------------------------


def test_per_chunk_absmean_codes_alpha_and_gradients() -> None:
    torch.manual_seed(0)
    lin = nn.Linear(32, 24)
    with torch.no_grad():
        lin.weight[8:16] *= 5.0  # the middle part (k) much larger than q and v
    fq = FakeQuantLinear.from_linear(lin, TERNARY, learnable_scale=True, chunks=3)
    w = lin.weight.detach()
    parts = w.reshape(3, 8, 32)
    gamma = parts.abs().mean(dim=(1, 2))
    codes = torch.round(parts / (gamma[:, None, None] + EPS)).clamp(-1, 1).reshape(24, 32)
    torch.testing.assert_close(fq.scale.detach(), gamma)  # α₀ = γ of each part
    alpha_rows = gamma.repeat_interleave(8)[:, None]
    assert torch.equal(fq.quantized_weight().detach(), alpha_rows * codes)
    # one γ for the whole fused matrix would zero most of q and v
    whole = torch.round(w / (w.abs().mean() + EPS)).clamp(-1, 1)
    assert (whole[:8] == 0).float().mean() > (codes[:8] == 0).float().mean() + 0.2

    x, g = torch.randn(5, 32), torch.randn(5, 24)
    (fq(x) * g).sum().backward()
    dw_hat = g.T @ x  # ∂L/∂Ŵ
    torch.testing.assert_close(fq.weight.grad, alpha_rows * dw_hat)  # identity STE on W̃
    expected_alpha = (dw_hat * codes).reshape(3, 8, 32).sum(dim=(1, 2)) / math.sqrt(8 * 32)
    torch.testing.assert_close(fq.scale.grad, expected_alpha)


def test_zero_initialised_layer_gets_a_positive_alpha_and_trains() -> None:
    lin = nn.Linear(16, 48)
    nn.init.zeros_(lin.weight)
    fq = FakeQuantLinear.from_linear(lin, TERNARY, learnable_scale=True)
    torch.testing.assert_close(fq.scale.detach(), torch.tensor([math.sqrt(6 / 64) / 2]))
    (fq(torch.randn(4, 16)) * torch.randn(4, 48)).sum().backward()
    assert fq.weight.grad.abs().sum() > 0  # α = γ = 0 would leave it dead


def test_convert_is_exact_for_chunks_and_negative_alpha() -> None:
    torch.manual_seed(1)
    lin = nn.Linear(32, 24)
    fq = FakeQuantLinear.from_linear(lin, TERNARY, learnable_scale=True, chunks=3)
    with torch.no_grad():
        fq.scale.copy_(torch.tensor([0.3, -0.05, 0.0]))
    packed = convert(nn.Sequential(fq))[0]
    assert isinstance(packed, QuantLinear) and bool((packed.scales > 0).all())
    assert torch.equal(packed.dequantized_weight(), fq.quantized_weight().detach())
    x = torch.randn(3, 32)
    torch.testing.assert_close(packed(x), fq(x).detach(), rtol=0, atol=1e-6)


def test_prepare_splits_fused_qkv_and_keeps_the_fp_parts() -> None:
    model = prepare(tiny_dit(), TERDIT)
    qkv, adaln = model.blocks[0].attn.qkv, model.blocks[0].adaLN_modulation[1]
    assert isinstance(qkv, FakeQuantLinear) and qkv.chunks == 3 and qkv.scale.shape == (3,)
    assert isinstance(adaln, FakeQuantLinear) and adaln.chunks == 1  # adaLN is ternary in TerDiT
    for name in ("x_embedder.proj", "t_embedder.mlp.0", "final_layer.linear", "final_layer.adaLN_modulation.1"):
        assert not isinstance(model.get_submodule(name), FakeQuantLinear), name
    unsplit = prepare(tiny_dit(), QAT(w_format="ternary", w_bits=2, split_fused=False, skip=TERDIT.skip))
    assert unsplit.blocks[0].attn.qkv.chunks == 1


# --------------------------------------------------------------------------------------------
# The adaLN RMSNorm
# --------------------------------------------------------------------------------------------


def test_adaln_rmsnorm_is_one_rms_over_the_six_chunks() -> None:
    model = tiny_dit(adaln_norm=True)
    block = model.blocks[0]
    norm = block.adaLN_modulation[2]
    assert isinstance(norm, nn.RMSNorm) and norm.weight.shape == (6 * 64,) and norm.weight.requires_grad
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    c = torch.randn(3, 64)
    m = block.adaLN_modulation[1](nn.functional.silu(c))
    expected = m / torch.sqrt(m.square().mean(dim=1, keepdim=True) + 1e-5) * norm.weight
    torch.testing.assert_close(block.adaLN_modulation(c), expected)
    assert model.config["adaln_norm"] is True
    plain = tiny_dit(adaln_norm=False)  # official layout: no extra tensor, no extra config key
    assert "adaln_norm" not in plain.config
    assert not any("adaLN_modulation.2" in k for k in plain.state_dict())
    assert set(model.state_dict()) - set(plain.state_dict()) == {f"blocks.{i}.adaLN_modulation.2.weight" for i in range(2)}


def test_fine_tune_from_fp_sets_the_rmsnorm_gain_to_the_fp_modulation_rms(tmp_path: Path) -> None:
    fp = tiny_dit(adaln_norm=False)
    ckpt = ditq.save(fp, tmp_path / "fp.safetensors")
    cfg = tiny_config(tmp_path / "run", model_overrides=dict(depth=2, hidden_size=64, num_heads=2, patch_size=8,
                      adaln_norm=True), init_from=str(ckpt))  # fmt: skip
    from ditq.training.loop import build_model

    model = build_model(cfg, torch.device("cpu"))
    t, y = torch.linspace(0, 999, 256).round().long(), torch.randint(0, 10, (256,), generator=torch.Generator().manual_seed(0))
    c = fp.t_embedder(t) + fp.y_embedder(y, False)
    rms = fp.blocks[1].adaLN_modulation(c).square().mean(1).sqrt().mean()
    torch.testing.assert_close(model.blocks[1].adaLN_modulation[2].weight, rms.expand(6 * 64).detach())
    assert torch.equal(model.blocks[1].attn.qkv.weight, fp.blocks[1].attn.qkv.weight)


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------


def test_a_few_ternary_qat_steps_lower_the_loss() -> None:
    model = prepare(tiny_dit(), TERDIT).train()
    diffusion = create_diffusion("", learn_sigma=True)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(16, 1, 32, 32, generator=gen).clamp(-1, 1)
    y = torch.arange(16) % 10
    t = torch.randint(0, 1000, (16,), generator=gen)
    noise = torch.randn(x.shape, generator=gen)

    def loss() -> torch.Tensor:
        torch.manual_seed(0)  # same label dropout each time
        return diffusion.training_losses(model, x, t, dict(y=y), noise=noise)["loss"].mean()

    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3)
    first = float(loss().detach())
    for _ in range(25):
        opt.zero_grad()
        loss().backward()
        opt.step()
    assert float(loss().detach()) < 0.7 * first


def test_step_schedule_drops_the_lr_late() -> None:
    cfg = TrainConfig(steps=100, lr=5e-4, lr_schedule="step", lr_decay_step=80, lr_decay_factor=0.2)
    assert [schedules.lr_at(cfg, s) for s in (0, 79, 80, 99)] == [5e-4, 5e-4, 5e-4 * 0.2, 5e-4 * 0.2]
    with pytest.raises(ValueError, match="lr_decay_step"):
        TrainConfig(lr_schedule="step")
    with pytest.raises(ValueError, match="lr_decay_factor"):
        TrainConfig(lr_schedule="step", lr_decay_step=5, lr_decay_factor=0.0)


def test_cli_takes_the_terdit_preset() -> None:
    args = build_parser().parse_args(["--recipe", "terdit", "--lr-schedule", "step", "--lr-decay-step", "9"])
    cfg = config_from_args(args)
    assert cfg.recipe == TERDIT.to_dict() and cfg.lr_decay_step == 9


def test_ternary_run_resumes_bit_exactly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    changes = dict(
        model_overrides=dict(depth=1, hidden_size=64, patch_size=8, adaln_norm=True),
        recipe=TERDIT.to_dict(), lr_schedule="step", lr_decay_step=4,
    )  # fmt: skip
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train(tiny_config(straight, **changes))
    kill_during_fifth_step(monkeypatch, lambda: train(tiny_config(resumed, **changes)))
    train(tiny_config(resumed, resume=True, **changes))
    assert_same_runs(straight, resumed)
    state = load_train_state(straight / "checkpoints" / "last.safetensors")
    assert state.model["blocks.0.attn.qkv.scale"].shape == (3,)


# --------------------------------------------------------------------------------------------
# Deployment: 2-bit export
# --------------------------------------------------------------------------------------------


def test_packed_export_reloads_bit_exactly_and_serves_the_qat_outputs(tmp_path: Path) -> None:
    model = prepare(tiny_dit(), TERDIT).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, FakeQuantLinear):
                m.scale.mul_(torch.empty_like(m.scale).uniform_(0.5, 2.0))  # "trained" α
    x, t, y = torch.randn(4, 1, 32, 32), torch.tensor([0, 250, 500, 999]), torch.tensor([0, 3, 7, 10])
    with torch.no_grad():
        expected = model(x, t, y)
    path = export_packed(model, tmp_path / "terdit.safetensors", float_dtype=torch.float32)
    assert all(not isinstance(m, FakeQuantLinear) for m in model.modules())
    loaded = ditq.load(path)
    mine, theirs = model.state_dict(), loaded.state_dict()
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
    assert loaded.blocks[0].attn.qkv.qweight.dtype == torch.uint8
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, t, y), expected, rtol=0, atol=1e-5)
    fp32 = sum(p.numel() * 4 for p in tiny_dit().parameters())
    assert path.stat().st_size < fp32 / 3  # tiny model: the FP embedders dominate; DiT-MNIST is in the GPU script


# --------------------------------------------------------------------------------------------
# The released networks
# --------------------------------------------------------------------------------------------


def released_params(dim: int, depth: int, in_ch: int = 4, patch: int = 2, classes: int = 1000) -> int:
    """Parameter count from the release's formulas, independent of the module code."""
    cond = min(dim, 1024)
    ffn = 256 * -(-int(2 * 4 * dim / 3) // 256)
    block = 4 * dim * dim + 3 * dim * ffn + 2 * dim + cond * 6 * dim + 6 * dim + 6 * dim
    embed = (patch * patch * in_ch + 1) * dim + (256 + 1) * cond + (cond + 1) * cond + (classes + 1) * cond
    final = (dim + 1) * patch * patch * 2 * in_ch + (cond + 1) * 2 * dim
    return embed + depth * block + final


@pytest.mark.parametrize("name, dim, depth, billions", [("TerDiT-600M", 1536, 16, 0.61), ("TerDiT-4.2B", 3072, 32, 4.24)])
def test_released_networks_on_meta(name: str, dim: int, depth: int, billions: float) -> None:
    with torch.device("meta"):
        model = create(name)
    n = sum(p.numel() for p in model.parameters())
    assert n == released_params(dim, depth) and abs(n / 1e9 - billions) < 0.005
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    ffn = {1536: 4096, 3072: 8192}[dim]
    pinned = {
        "x_embedder.weight": (dim, 16), "x_embedder.bias": (dim,),
        "t_embedder.mlp.0.weight": (1024, 256), "t_embedder.mlp.2.weight": (1024, 1024),
        "y_embedder.embedding_table.weight": (1001, 1024),
        "layers.0.attention.wq.weight": (dim, dim), "layers.0.attention.wo.weight": (dim, dim),
        "layers.0.feed_forward.w1.weight": (ffn, dim), "layers.0.feed_forward.w2.weight": (dim, ffn),
        "layers.0.feed_forward.w3.weight": (ffn, dim),
        "layers.0.attention_norm.weight": (dim,), "layers.0.ffn_norm.weight": (dim,),
        "layers.0.adaLN_modulation.1.weight": (6 * dim, 1024), "layers.0.adaLN_modulation.1.bias": (6 * dim,),
        "layers.0.adaLN_modulation.2.weight": (6 * dim,),
        "final_layer.linear.weight": (32, dim), "final_layer.adaLN_modulation.1.weight": (2 * dim, 1024),
    }  # fmt: skip
    assert {k: shapes[k] for k in pinned} == pinned
    per_layer = {k.split(".", 2)[2] for k in shapes if k.startswith("layers.0.")}
    assert len(per_layer) == 12 and len(shapes) == 7 + 12 * depth + 4
    assert not any("q_norm" in k for k in shapes)  # qk_norm is off unless asked for
    with torch.device("meta"):
        assert "layers.0.attention.q_norm.bias" in create(name, qk_norm=True).state_dict()


def hqq_pack(codes: torch.Tensor) -> torch.Tensor:
    """Written from the HQQ kernel's description: byte (r, c) = u[r]<<6 | u[r+R]<<4 | u[r+2R]<<2 | u[r+3R]."""
    u = codes.to(torch.uint8)
    r = u.shape[0] // 4
    return (u[:r] << 6) | (u[r : 2 * r] << 4) | (u[2 * r : 3 * r] << 2) | u[3 * r :]


def test_hqq_unpack_matches_the_kernel_layout() -> None:
    codes = torch.randint(0, 3, (8, 5), dtype=torch.uint8)
    packed = hqq_pack(codes)
    assert int(packed[1, 2]) == int(codes[1, 2]) * 64 + int(codes[3, 2]) * 16 + int(codes[5, 2]) * 4 + int(codes[7, 2])
    assert torch.equal(unpack_hqq_2bit(packed), codes)


def test_released_file_converts_to_2bit_quantlinears(tmp_path: Path) -> None:
    config = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=2, num_heads=4,
                  num_classes=10, qk_norm=True)  # fmt: skip
    torch.manual_seed(0)
    reference = LlamaDiT(**config)
    flat = {}
    ternary = [n for n, m in reference.named_modules() if isinstance(m, nn.Linear) and n.startswith("layers.")]
    with torch.no_grad():
        for p in reference.parameters():
            p.add_(torch.randn_like(p) * 0.05)
        for i, name in enumerate(ternary):
            linear = reference.get_submodule(name)
            t = torch.randint(-1, 2, linear.weight.shape)
            alpha = torch.tensor([0.05 * (i + 1) * (-1 if i == 2 else 1)])  # one negative α, as N(0, 1) gives
            linear.weight.copy_(alpha * t)
            flat[f"{name}.weight"] = hqq_pack(t + 1)
            flat[f"{name}.alphas"] = alpha
    flat |= {k: v for k, v in reference.state_dict().items() if k.removesuffix(".weight") not in ternary}
    path = tmp_path / "consolidated_ema_ternary.00-of-01.pth"
    torch.save(flat, path)
    model = load_released(path, input_size=8, num_heads=4)
    assert model.config == reference.config
    wq = model.layers[0].attention.wq
    assert isinstance(wq, QuantLinear) and wq.spec.w_format == "ternary" and wq.qweight.shape == (64, 16)
    x, t, y = torch.randn(3, 4, 8, 8), torch.tensor([1, 500, 999]), torch.tensor([0, 5, 10])
    with torch.no_grad():
        torch.testing.assert_close(model(x, t, y), reference.eval()(x, t, y), rtol=1e-4, atol=1e-5)
    saved = ditq.load(ditq.save(model, tmp_path / "terdit.safetensors"))  # ditq's format round trip
    with torch.no_grad():
        torch.testing.assert_close(saved(x, t, y), model(x, t, y), rtol=0, atol=0)
    del flat["layers.1.feed_forward.w2.alphas"]
    torch.save(flat, path)
    with pytest.raises(ValueError, match="layers.1.feed_forward.w2"):
        load_released(path, input_size=8, num_heads=4)
