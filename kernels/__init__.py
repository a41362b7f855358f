"""Kernels for the engine: Triton kernels for the GPU and the pure-torch twins that define them.

Each module holds one operation; its `*_torch` function is the reference the Triton kernel must
match and the path the CPU engine runs.
"""
