"""Quantization methods; importing this package registers every one of them."""

from ditq.methods import gptq, qdit, rtn, terdit

__all__ = ["gptq", "qdit", "rtn", "terdit"]
