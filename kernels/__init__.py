"""Triton kernels, one file per family; installed as `kernopt.kernels`. Imports only torch and triton."""
