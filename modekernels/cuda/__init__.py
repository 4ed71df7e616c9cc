"""The ``cuda`` backend: host code over the compiled kernels of :mod:`modekernels._C` (``csrc/``).

Its modules import ``modekernels._C`` and are loaded only when the backend runs an op.
"""
