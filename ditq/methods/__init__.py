"""Quantization methods; importing this package registers every one of them."""

from ditq.methods import qdit, rtn, svdquant, terdit

__all__ = ["qdit", "rtn", "svdquant", "terdit"]
