import torch

from ditq.bundled import bundled_path, open_model
from ditq.diffusion import sample_images
from ditq.eval.features import features_and_logits, load_feature_net


def test_bundled_dit_mnist_draws_the_digits_it_is_asked_for():
    assert bundled_path("DiT-MNIST") is not None
    assert bundled_path("DiT-MNIST").stat().st_size <= 20_000_000
    model, source = open_model("DiT-MNIST")
    assert "bundled" in source and sum(p.numel() for p in model.parameters()) == 9_762_848
    labels = torch.arange(20) % 10
    images = sample_images(model, labels, steps=10, cfg_scale=1.5, seed=0)
    _, logits = features_and_logits(load_feature_net(), images)
    accuracy = (logits.argmax(1) == labels).float().mean().item()
    assert accuracy >= 0.9, accuracy


def test_zoo_models_without_weights_say_they_are_random():
    model, source = open_model("DiT-S/8")
    assert "RANDOM" in source
