"""Triton kernels of the lalora:: ops (the CUDA backend; also runs under TRITON_INTERPRET=1).

One file per kernel family, launchers next to their kernels:
``accumulate`` (masked symmetric covariance update), ``diag`` (squared-operand GEMM),
``gram`` (the penalty's grouped factor product ``G = D S D^T``, ``Q = D S``).
"""
