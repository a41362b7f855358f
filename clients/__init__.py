"""The Python client library of llmserve, for services that call the router.

Depends on grpcio and protobuf only (no torch, no tokenizers)::

    from llmserve.clients import LLMClient

    with LLMClient("localhost:50051") as client:
        for chunk in client.generate("Once upon a time", max_tokens=32):
            print(chunk.text, end="", flush=True)
        print(client.generate_text("2 + 2 =", temperature=0).text)

`AsyncLLMClient` offers the same methods on asyncio. Failed calls raise `grpc.RpcError` with the
server's status code. The `llmserve` command (`llmserve.clients.cli`) wraps the client for a shell.
"""

from llmserve.clients.async_client import AsyncLLMClient
from llmserve.clients.chunk import Chunk, Completion, TokenLogprob, TopLogprob, Usage
from llmserve.clients.client import LLMClient

__all__ = [
    "AsyncLLMClient",
    "Chunk",
    "Completion",
    "LLMClient",
    "TokenLogprob",
    "TopLogprob",
    "Usage",
]
