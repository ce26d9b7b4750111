"""Triton kernels with torch references."""
