"""Triton kernels of the LETTER ops (CUDA, or CPU under TRITON_INTERPRET=1)."""
