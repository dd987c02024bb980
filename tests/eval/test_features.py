"""The bundled MNIST feature network and its statistics file; training determinism; file errors."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from ditq.data import load_mnist, to_model_space
from ditq.eval.features import (
    FeatureNet,
    default_feature_net_path,
    default_stats_path,
    features_and_logits,
    file_sha256,
    load_feature_net,
    load_real_stats,
    save_feature_net,
    train_feature_net,
)
from ditq.eval.metrics import class_accuracy


@pytest.fixture(scope="module")
def mnist():
    images, labels = load_mnist()
    return to_model_space(images), labels


def test_bundled_net_classifies_heldout_images(mnist):
    x, y = mnist
    net = load_feature_net()
    feats, logits = features_and_logits(net, x[8000:9000], batch_size=250)
    assert feats.shape == (1000, 128) and logits.shape == (1000, 10)
    assert feats.dtype == np.float32
    assert class_accuracy(logits, y[8000:9000]) >= 0.98


def test_bundled_stats_match_bundled_net(mnist):
    stats = load_real_stats()
    assert default_stats_path().stat().st_size < 2_000_000
    assert str(stats["feature_net_sha256"]) == file_sha256(default_feature_net_path())
    d = stats["mu"].shape[0]
    for key in ("", "_half0", "_half1"):
        assert stats[f"mu{key}"].shape == (d,) and stats[f"sigma{key}"].shape == (d, d)
        np.testing.assert_allclose(stats[f"sigma{key}"], stats[f"sigma{key}"].T)
    assert float(stats["heldout_accuracy"]) >= 0.98
    assert 0 <= float(stats["fid_floor_random_split"]) < float(stats["fid_floor"])
    # The stored real features are the bundled net's features of the stored indices.
    idx = stats["feats_indices"][:300]
    feats, _ = features_and_logits(load_feature_net(), mnist[0][idx])
    np.testing.assert_allclose(stats["feats"][:300], feats, rtol=1e-4, atol=1e-4)


def test_training_is_deterministic(mnist):
    x, y = mnist
    kwargs = dict(epochs=1, batch_size=64, lr=1e-3, device="cpu")
    a = train_feature_net(x[:192], y[:192], seed=3, **kwargs).state_dict()
    b = train_feature_net(x[:192], y[:192], seed=3, **kwargs).state_dict()
    c = train_feature_net(x[:192], y[:192], seed=4, **kwargs).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    torch.manual_seed(123)
    before = torch.rand(3)
    torch.manual_seed(123)
    train_feature_net(x[:64], y[:64], seed=3, **kwargs)
    torch.testing.assert_close(torch.rand(3), before)  # the caller's global RNG is untouched
    assert not torch.equal(a["fc_logits.weight"], c["fc_logits.weight"])


def test_save_load_round_trip(tmp_path, mnist):
    torch.manual_seed(0)
    net = FeatureNet(widths=(8, 16), feature_dim=32).eval()
    path = tmp_path / "net.safetensors"
    save_feature_net(net, path, extra={"note": "test"})
    loaded = load_feature_net(path)
    assert loaded.config == net.config and not loaded.training
    x = mnist[0][:4]
    for a, b in zip(features_and_logits(net, x), features_and_logits(loaded, x), strict=True):
        np.testing.assert_array_equal(a, b)
    assert [p.name for p in tmp_path.iterdir()] == ["net.safetensors"]  # no temp file left
    assert path.stat().st_mode & 0o044 == 0o044  # readable by group and others, not mkstemp's 0600
    first = path.read_bytes()
    save_feature_net(net, path, extra={"note": "test"})
    assert path.read_bytes() == first  # byte-reproducible, so the recorded SHA-256 is too


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        load_feature_net(tmp_path / "missing.safetensors")
    foreign = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(2)}, str(foreign))
    with pytest.raises(ValueError, match="not a ditq feature net"):
        load_feature_net(foreign)
    newer = tmp_path / "newer.safetensors"
    header = {"format": "ditq-feature-net", "version": 99, "config": {}}
    save_file({"w": torch.zeros(2)}, str(newer), metadata={"ditq": json.dumps(header)})
    with pytest.raises(ValueError, match="newer"):
        load_feature_net(newer)
    with pytest.raises(FileNotFoundError, match="nope.npz"):
        load_real_stats(tmp_path / "nope.npz")


def test_features_reject_wrong_input():
    net = FeatureNet(widths=(4,), feature_dim=8)
    with pytest.raises(ValueError, match="to_model_space"):
        features_and_logits(net, np.zeros((2, 28, 28), np.uint8))
