"""Kernels and their plain-torch references. Nothing here imports models or pretrain."""

from ops.attention import BACKENDS, attention, flash_available, reference_attention, select_backend

__all__ = ["BACKENDS", "attention", "flash_available", "reference_attention", "select_backend"]
