"""Attention kernels in pure JAX and Pallas; ``common.py`` is their shared contract. Imports
nothing outside ``jaxmt.kernels``."""
