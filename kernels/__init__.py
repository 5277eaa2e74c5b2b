"""Triton kernels, installed as `prunekit.kernels`. Tested on CPU with TRITON_INTERPRET=1."""
