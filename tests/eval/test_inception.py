"""FID Inception-v3 (random weights): output shapes, strict loading, ADM reference batches."""

import numpy as np
import pytest
import torch

from ditq.eval.inception import (
    InceptionV3,
    fid_vs_reference,
    inception_features,
    inception_score_adm,
    load_inception,
    load_reference_stats,
    precision_recall_vs_reference,
    sfid_vs_reference,
)
from ditq.eval.metrics import feature_stats, fid_from_stats, inception_score


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A random-weight net and its state dict saved as a pytorch-fid style .pth file."""
    torch.manual_seed(0)
    net = InceptionV3().eval()
    path = tmp_path_factory.mktemp("inception") / "pt_inception.pth"
    torch.save(net.state_dict(), path)
    return net, path


def test_shapes_at_299(saved):
    net, _ = saved
    with torch.no_grad():
        out = net(torch.rand(2, 3, 32, 32))  # resized to 299x299 inside
    assert out.pool.shape == (2, 2048)
    assert out.spatial.shape == (2, 7 * 17 * 17)
    assert out.logits.shape == (2, 1008)
    assert torch.isfinite(out.pool).all()


def test_strict_round_trip(saved):
    net, path = saved
    loaded = load_inception(path)
    loaded.resize_input = net.resize_input = False  # 75x75 is the smallest input; keeps CPU time low
    x = torch.rand(2, 3, 75, 75)
    with torch.no_grad():
        a, b = net(x), loaded(x)
    net.resize_input = True
    torch.testing.assert_close(a.pool, b.pool, rtol=0, atol=0)
    torch.testing.assert_close(a.logits, b.logits, rtol=0, atol=0)


def test_logits_bias_option(saved):
    """Default logits follow ADM (softmax weight only); logits_bias=True adds fc.bias."""
    _, path = saved
    plain, with_bias = load_inception(path), load_inception(path, logits_bias=True)
    plain.resize_input = with_bias.resize_input = False
    x = torch.rand(1, 3, 75, 75)
    with torch.no_grad():
        a, b = plain(x), with_bias(x)
    torch.testing.assert_close(a.logits, a.pool @ plain.fc.weight.T)
    torch.testing.assert_close(b.logits, b.pool @ with_bias.fc.weight.T + with_bias.fc.bias)


def _variant(saved, tmp_path, edit):
    state = dict(saved[0].state_dict())
    edit(state)
    path = tmp_path / "variant.pth"
    torch.save(state, path)
    return path


def test_missing_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="absent.pth"):
        load_inception(tmp_path / "absent.pth")


def test_missing_key(saved, tmp_path):
    path = _variant(saved, tmp_path, lambda s: s.pop("Mixed_6d.branch1x1.conv.weight"))
    with pytest.raises(ValueError, match="Mixed_6d.branch1x1.conv.weight"):
        load_inception(path)


def test_unexpected_key(saved, tmp_path):
    path = _variant(saved, tmp_path, lambda s: s.update({"AuxLogits.fc.weight": torch.zeros(1)}))
    with pytest.raises(ValueError, match="AuxLogits.fc.weight"):
        load_inception(path)


def test_wrong_shape(saved, tmp_path):
    path = _variant(
        saved, tmp_path, lambda s: s.update({"Conv2d_1a_3x3.conv.weight": torch.zeros(32, 3, 5, 5)})
    )
    with pytest.raises(ValueError, match="Conv2d_1a_3x3.conv.weight"):
        load_inception(path)


def test_not_a_state_dict(tmp_path):
    path = tmp_path / "tensor.pth"
    torch.save(torch.zeros(3), path)
    with pytest.raises(ValueError, match="state dict"):
        load_inception(path)


def test_optional_fc_and_bn_counters(saved, tmp_path):
    def drop(state):
        for k in [k for k in state if k.startswith("fc.") or k.endswith("num_batches_tracked")]:
            del state[k]

    net = load_inception(_variant(saved, tmp_path, drop))
    net.resize_input = False
    with torch.no_grad():
        out = net(torch.rand(1, 3, 75, 75))
    assert net.fc is None and out.logits is None and out.pool.shape == (1, 2048)


def test_inception_features_uint8_nhwc(saved):
    net, _ = saved
    net.resize_input = False
    images = np.random.default_rng(0).integers(0, 256, (3, 75, 75, 3), dtype=np.uint8)
    try:
        feats = inception_features(net, images, batch_size=2)
        with torch.no_grad():
            direct = net(torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255)
    finally:
        net.resize_input = True
    assert feats["pool"].shape == (3, 2048) and feats["logits"].shape == (3, 1008)
    np.testing.assert_allclose(feats["pool"], direct.pool.double().numpy(), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="NHWC"):
        inception_features(net, images[..., :1])


def test_reference_stats_from_moments(tmp_path):
    rng = np.random.default_rng(0)
    pool, spatial = rng.normal(size=(50, 6)), rng.normal(size=(50, 5))
    mu, sigma = feature_stats(pool)
    mu_s, sigma_s = feature_stats(spatial)
    path = tmp_path / "VIRTUAL_ref.npz"
    np.savez(path, arr_0=np.zeros((2, 4, 4, 3), np.uint8), mu=mu, sigma=sigma, mu_s=mu_s, sigma_s=sigma_s)
    ref = load_reference_stats(path)
    assert ref.pool is None
    sample = rng.normal(size=(40, 6)) + 0.5
    assert fid_vs_reference(sample, ref) == pytest.approx(fid_from_stats(*feature_stats(sample), mu, sigma))
    assert sfid_vs_reference(spatial, ref) == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="pool features"):
        precision_recall_vs_reference(sample, ref)


def test_reference_stats_from_features(tmp_path):
    rng = np.random.default_rng(1)
    pool = rng.normal(size=(60, 4))
    path = tmp_path / "ref_pool.npz"
    np.savez(path, pool=pool)
    ref = load_reference_stats(path)
    np.testing.assert_allclose(ref.mu, pool.mean(0))
    assert ref.mu_s is None
    assert precision_recall_vs_reference(pool, ref) == (1.0, 1.0)
    with pytest.raises(ValueError, match="spatial"):
        sfid_vs_reference(pool, ref)


def test_reference_stats_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="gone.npz"):
        load_reference_stats(tmp_path / "gone.npz")
    path = tmp_path / "images_only.npz"
    np.savez(path, arr_0=np.zeros((2, 4, 4, 3), np.uint8))
    with pytest.raises(ValueError, match="inception_features"):
        load_reference_stats(path)


def test_inception_score_adm_chunks():
    rng = np.random.default_rng(2)
    logits = rng.normal(size=(250, 20)) * 2
    expected = np.mean([inception_score(logits[i : i + 100]) for i in (0, 100, 200)])
    assert inception_score_adm(logits, split_size=100) == pytest.approx(expected)
    assert inception_score_adm(logits, split_size=5000) == pytest.approx(inception_score(logits))
