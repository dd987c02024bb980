"""Datasets: the bundled MNIST test split that DiT-MNIST and its feature network use."""

from ditq.data.mnist import default_data_dir, from_model_space, load_mnist, to_model_space

__all__ = ["default_data_dir", "from_model_space", "load_mnist", "to_model_space"]
