"""load_weights: .pt (official layouts) and .safetensors, meta skeletons, strict errors."""

from __future__ import annotations

import argparse

import pytest
import torch
from safetensors.torch import save_file

from ditq.models import create, load_weights


def tiny(seed: int = 0, **overrides) -> torch.nn.Module:
    torch.manual_seed(seed)
    kwargs = dict(input_size=8, depth=2, hidden_size=64, num_heads=4, num_classes=10)
    model = create("DiT-S/2", **{**kwargs, **overrides})
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(std=0.05)  # make the zero-initialised layers non-trivial
    return model.eval()


def probe(model: torch.nn.Module) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 8, 8, generator=gen)
    with torch.no_grad():
        return model(x, torch.tensor([10, 500]), torch.tensor([1, 7]))


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


def save(state: dict, path) -> None:
    if str(path).endswith(".safetensors"):
        save_file(state, str(path))
    else:
        torch.save(state, path)


@pytest.mark.parametrize("suffix", [".pt", ".pth", ".safetensors"])
def test_round_trip(tmp_path, suffix):
    src = tiny(seed=0)
    path = tmp_path / f"w{suffix}"
    save(src.state_dict(), path)
    dst = tiny(seed=1)
    assert load_weights(dst, path) is dst
    assert_same_weights(src, dst)
    assert torch.equal(probe(src), probe(dst))


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_load_into_meta_skeleton(tmp_path, suffix):
    src = tiny(seed=0)
    path = tmp_path / f"w{suffix}"
    save(src.state_dict(), path)
    with torch.device("meta"):
        dst = create("DiT-S/2", input_size=8, depth=2, hidden_size=64, num_heads=4, num_classes=10)
    load_weights(dst, str(path)).eval()
    assert all(t.device.type == "cpu" for t in dst.state_dict().values())
    assert dst.pos_embed.requires_grad is False
    assert dst.blocks[0].attn.qkv.weight.requires_grad is True
    assert_same_weights(src, dst)
    assert torch.equal(probe(src), probe(dst))


def test_official_training_checkpoint_prefers_ema(tmp_path):
    model_weights, ema_weights = tiny(seed=0), tiny(seed=1)
    opt = torch.optim.AdamW(model_weights.parameters(), lr=1e-4)
    checkpoint = {
        "model": model_weights.state_dict(),
        "ema": ema_weights.state_dict(),
        "opt": opt.state_dict(),
        "args": argparse.Namespace(model="DiT-XL/2", image_size=256),  # as DiT's train.py stores it
    }
    path = tmp_path / "0400000.pt"
    torch.save(checkpoint, path)
    dst = load_weights(tiny(seed=2), path)
    assert_same_weights(ema_weights, dst)

    torch.save({"model": model_weights.state_dict()}, path)
    assert_same_weights(model_weights, load_weights(tiny(seed=2), path))


def test_materialised_model_keeps_its_dtype(tmp_path):
    src = tiny(seed=0)
    path = tmp_path / "w.safetensors"
    save({k: v.half() for k, v in src.state_dict().items()}, path)
    dst = load_weights(tiny(seed=1), path)
    assert dst.blocks[0].attn.qkv.weight.dtype == torch.float32
    assert torch.equal(dst.blocks[0].attn.qkv.weight, src.blocks[0].attn.qkv.weight.half().float())


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_missing_and_unexpected_keys_are_listed(tmp_path, suffix):
    state = tiny().state_dict()
    del state["blocks.1.mlp.fc2.bias"]
    state["blocks.1.mlp.extra"] = torch.zeros(3)
    path = tmp_path / f"w{suffix}"
    save(state, path)
    with pytest.raises(ValueError) as info:
        load_weights(tiny(), path)
    message = str(info.value)
    assert str(path) in message
    assert "missing keys (1)" in message and "blocks.1.mlp.fc2.bias" in message
    assert "unexpected keys (1)" in message and "blocks.1.mlp.extra" in message


def test_shape_mismatch_is_listed(tmp_path):
    path = tmp_path / "w.pt"
    save(tiny(num_classes=20).state_dict(), path)
    with pytest.raises(
        ValueError, match=r"y_embedder.embedding_table.weight: file \(21, 64\), model \(11, 64\)"
    ):
        load_weights(tiny(), path)


def test_model_is_untouched_when_check_fails(tmp_path):
    path = tmp_path / "w.pt"
    state = tiny(seed=0).state_dict()
    del state["pos_embed"]
    save(state, path)
    dst = tiny(seed=1)
    before = {k: v.clone() for k, v in dst.state_dict().items()}
    with pytest.raises(ValueError, match="pos_embed"):
        load_weights(dst, path)
    assert all(torch.equal(before[k], v) for k, v in dst.state_dict().items())


def test_long_listings_are_truncated(tmp_path):
    path = tmp_path / "w.pt"
    save({"unrelated": torch.zeros(1)}, path)
    with pytest.raises(ValueError, match=r"missing keys \(32\):[\s\S]*\.\.\. and 12 more"):
        load_weights(tiny(), path)


def test_missing_file(tmp_path):
    path = tmp_path / "nope.pt"
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        load_weights(tiny(), path)


def test_unsupported_suffix(tmp_path):
    path = tmp_path / "w.bin"
    path.write_bytes(b"")
    with pytest.raises(ValueError, match=r"w.bin: unsupported weights file suffix '.bin'"):
        load_weights(tiny(), path)


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_corrupt_file(tmp_path, suffix):
    path = tmp_path / f"w{suffix}"
    save(tiny().state_dict(), path)
    path.write_bytes(path.read_bytes()[:200])  # truncated
    with pytest.raises(ValueError, match=f"w{suffix}: not a readable"):
        load_weights(tiny(), path)


class _Payload:
    """Not a tensor: a weights-only load must refuse to unpickle it."""


def test_pickled_code_is_refused(tmp_path):
    path = tmp_path / "w.pt"
    torch.save({"model": _Payload()}, path)
    with pytest.raises(ValueError, match="weights-only"):
        load_weights(tiny(), path)


def test_non_state_dict_content(tmp_path):
    path = tmp_path / "w.pt"
    torch.save([torch.zeros(1)], path)
    with pytest.raises(ValueError, match="does not hold a state dict"):
        load_weights(tiny(), path)
