"""Triton kernels for the FP8 path on Hopper (and Ada): each has a PyTorch reference it is tested against.

Imported lazily by `ditq.kernels.fp8` so that ditq runs without Triton; CI runs these kernels on the CPU
under `TRITON_INTERPRET=1` at small shapes.
"""
