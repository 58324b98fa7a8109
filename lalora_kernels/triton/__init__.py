"""Triton kernels of the ``lalora::`` ops (the CUDA backend; also runs under TRITON_INTERPRET=1): one
file per op, named after it, launcher next to its kernels; ``common`` holds the launch policy."""
