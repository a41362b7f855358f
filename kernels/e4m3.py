"""The FP8 format both FP8 paths store, the KV cache and the W8A8 linears: e4m3."""

import torch

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0  # torch.finfo(torch.float8_e4m3fn).max
# e4m3 conversions in hardware and FP8 GEMMs (cuBLASLt row-wise scaling): Ada (8.9) and Hopper on.
FP8_MIN_CAPABILITY = (8, 9)
