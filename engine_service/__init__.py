"""The engine service: a paged-KV continuous batcher behind the internal EngineService API."""

from llmserve.common.grpc_polling import use_classic_poller

# First, before any module of this package imports grpc.
use_classic_poller()
