"""Quantization methods; importing this package registers every one of them."""

from ditq.methods import matquant, qdit, rtn, svdquant, terdit

__all__ = ["matquant", "qdit", "rtn", "svdquant", "terdit"]
