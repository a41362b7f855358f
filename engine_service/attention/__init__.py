"""Paged attention: the layer the models call and its backends (torch, Triton, flash-attn 4)."""
