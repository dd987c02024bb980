"""Fidelity evaluation: MNIST feature network, metrics, and FID Inception for real models."""

from ditq.eval.features import (
    FeatureNet,
    features_and_logits,
    load_feature_net,
    load_real_stats,
    train_feature_net,
)
from ditq.eval.metrics import (
    class_accuracy,
    feature_stats,
    fid_from_features,
    fid_from_stats,
    inception_score,
    inception_score_splits,
    precision_recall,
    psnr,
    ssim,
)

__all__ = [
    "FeatureNet",
    "class_accuracy",
    "feature_stats",
    "features_and_logits",
    "fid_from_features",
    "fid_from_stats",
    "inception_score",
    "inception_score_splits",
    "load_feature_net",
    "load_real_stats",
    "precision_recall",
    "psnr",
    "ssim",
    "train_feature_net",
]
