"""The zoo: every entry builds (on meta), configs rebuild models, errors name what is wrong."""

from __future__ import annotations

import json

import pytest
import torch

from ditq.models import MODEL_CONFIGS, DiT, LargeDiT, build, create

DIT_MNIST_PARAMS = 9_762_848
FP16_LIMIT_BYTES = 20_000_000


def shapes(model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def test_zoo_names():
    dit = {f"DiT-{s}/{p}" for s in ("S", "B", "L", "XL") for p in (2, 4, 8)}
    assert set(MODEL_CONFIGS) == dit | {
        "DiT-MNIST", "LargeDiT-600M", "LargeDiT-4.2B", "LargeDiT-MNIST", "TerDiT-600M", "TerDiT-4.2B"
    }


@pytest.mark.parametrize("name", sorted(MODEL_CONFIGS))
def test_every_entry_builds_on_meta_and_rebuilds_from_its_config(name):
    with torch.device("meta"):
        model = create(name)
        assert all(t.is_meta for t in model.state_dict().values())
        assert model.arch == MODEL_CONFIGS[name]["arch"]
        config = json.loads(json.dumps(model.config))  # JSON-serialisable, as a checkpoint stores it
        rebuilt = build(model.arch, config)
    assert rebuilt.config == model.config
    assert shapes(rebuilt) == shapes(model)


@pytest.mark.parametrize(
    "name, hidden, depth, heads, patch",
    [
        ("DiT-S/8", 384, 12, 6, 8),
        ("DiT-B/4", 768, 12, 12, 4),
        ("DiT-L/2", 1024, 24, 16, 2),
        ("DiT-XL/4", 1152, 28, 16, 4),
    ],
)
def test_dit_sizes(name, hidden, depth, heads, patch):
    with torch.device("meta"):
        model = create(name)
    assert isinstance(model, DiT)
    c = model.config
    assert (c["hidden_size"], c["depth"], c["num_heads"], c["patch_size"], c["input_size"]) == (
        hidden,
        depth,
        heads,
        patch,
        32,
    )


def test_large_dit_entries_use_terdit_adaln_norm():
    with torch.device("meta"):
        for name in ("LargeDiT-600M", "LargeDiT-4.2B", "LargeDiT-MNIST"):
            model = create(name)
            assert isinstance(model, LargeDiT) and model.config["adaln_norm"] is True
        assert create("LargeDiT-600M", adaln_norm=False).config["adaln_norm"] is False


def test_dit_mnist_has_9_762_848_parameters_and_fits_20mb_in_fp16():
    model = create("DiT-MNIST")
    n = sum(t.numel() for t in model.state_dict().values())
    assert n == DIT_MNIST_PARAMS
    assert 2 * n <= FP16_LIMIT_BYTES
    assert (model.in_channels, model.out_channels, model.num_classes, model.input_size) == (1, 2, 10, 32)
    out = model(torch.zeros(2, 1, 32, 32), torch.tensor([0, 999]), torch.tensor([3, 10]))  # 10 = null class
    assert out.shape == (2, 2, 32, 32)


def test_large_dit_mnist_fits_20mb_in_fp16():
    with torch.device("meta"):
        model = create("LargeDiT-MNIST")
    assert 2 * sum(t.numel() for t in model.state_dict().values()) <= FP16_LIMIT_BYTES


def test_overrides_apply():
    with torch.device("meta"):
        model = create("DiT-XL/2", input_size=64, depth=2)
    assert model.config["input_size"] == 64 and len(model.blocks) == 2
    assert model.pos_embed.shape == (1, 1024, 1152)


def test_create_does_not_mutate_the_zoo():
    before = json.dumps(MODEL_CONFIGS, sort_keys=True)
    with torch.device("meta"):
        create("DiT-S/2", depth=1)
    assert json.dumps(MODEL_CONFIGS, sort_keys=True) == before


def test_unknown_name_lists_known_names():
    with pytest.raises(ValueError, match="unknown model 'DiT-XXL/2'") as info:
        create("DiT-XXL/2")
    assert "DiT-XL/2" in str(info.value) and "LargeDiT-600M" in str(info.value)


def test_unknown_override_is_named():
    with pytest.raises(ValueError, match=r"unknown overrides \['hidden'\]") as info:
        create("DiT-S/2", hidden=64)
    assert "hidden_size" in str(info.value)
    with pytest.raises(ValueError, match="qk_norm"):
        create("DiT-S/2", qk_norm=True)  # a Large-DiT option is not a DiT option


def test_build_errors():
    with pytest.raises(ValueError, match="unknown model arch 'unet'.*'dit', 'large_dit'"):
        build("unet", {})
    with pytest.raises(ValueError, match=r"unknown config keys \['arch'\]"):
        build("dit", {"arch": "dit", "depth": 1})


def test_invalid_override_values_raise():
    with pytest.raises(ValueError, match="num_heads"):
        create("DiT-S/2", num_heads=5)
    with pytest.raises(ValueError, match="patch_size"):
        create("DiT-S/8", input_size=36)
