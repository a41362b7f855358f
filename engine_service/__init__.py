"""The engine service: a paged-KV continuous batcher behind the internal EngineService API.

Two processes: `frontend/` serves gRPC and starts the engine core process (`core/`), which runs
the step loop on the model `runner/` (`models/`, `attention/`, `parallel/` and the kernels
below it). What crosses between the two processes is in `seam.py`.
"""

from llmserve.common.grpc_polling import use_classic_poller

# First, before any module of this package imports grpc.
use_classic_poller()
