"""Quantization methods; importing this package registers every one of them."""

from ditq.methods import rtn

__all__ = ["rtn"]
