"""The integer codes the Triton kernels (``triton_kernels/``) and the CUDA kernels
(``csrc/activation.cuh``) take for an activation and for a gate: one table for both families."""

ACTIVATION_CODES = {"identity": 0, "silu": 1, "gelu": 2, "relu": 3}
GATE_CODES = {"none": 0, "relu": 1, "sigmoid": 2}
