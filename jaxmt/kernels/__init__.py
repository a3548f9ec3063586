"""Attention kernels: pure-JAX blockwise reference logic (Pallas kernels build on it)."""
