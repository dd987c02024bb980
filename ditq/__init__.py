"""ditq: quantization toolkit for diffusion transformers."""

__version__ = "0.1.0"
