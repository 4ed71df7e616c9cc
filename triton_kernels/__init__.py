"""Triton kernels of modekernels (installed as ``modekernels.triton_kernels``), one op per module."""
