"""Attention kernels over the paged KV cache: a torch reference that runs anywhere, Triton on CUDA."""
