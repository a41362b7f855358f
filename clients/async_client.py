"""The asyncio client of the public `llmserve.v1.GenerateService` API, on `grpc.aio`."""

from __future__ import annotations

from collections.abc import AsyncGenerator, Sequence
from types import TracebackType
from typing import Any, Unpack

from grpc import aio

from llmserve.clients._base import (
    ClientBase,
    health_request,
    health_status_name,
    model_info_to_dict,
)
from llmserve.clients.chunk import Chunk, Completion, chunk_from_proto
from llmserve.clients.request import GenerateParams, build_generate_request, build_tokenize_request
from llmserve.v1 import generate_service_pb2


class AsyncLLMClient(ClientBase):
    """An asyncio client of an llmserve router: `LLMClient`'s surface, awaited.

    Takes `LLMClient`'s arguments. Create it inside the event loop that uses it. Failed calls
    raise `grpc.RpcError` (a `grpc.aio.AioRpcError`) carrying the server's status code and
    details. Use `async with`, or `await close()`.
    """

    _grpc = aio

    async def generate(
        self,
        prompt: str | None = None,
        *,
        timeout: float | None = None,
        metadata: Sequence[tuple[str, str]] = (),
        **params: Unpack[GenerateParams],
    ) -> AsyncGenerator[Chunk, None]:
        """Streams a completion, one `Chunk` per response.

        Takes the arguments of `llmserve.clients.request.build_generate_request`. Leaving the
        loop early cancels the call once the generator is closed: at once with
        `contextlib.aclosing(client.generate(...))` or `await gen.aclose()`, or, after a bare
        `break`, when the event loop finalizes the abandoned generator (soon after, in CPython).
        """
        request = build_generate_request(prompt, **params)
        call = self._stub.Generate(request, **self._call_options(timeout, metadata))
        try:
            async for response in call:
                yield chunk_from_proto(response)
        finally:
            # A no-op once the stream has ended; otherwise the server is told to stop.
            call.cancel()

    async def generate_text(
        self,
        prompt: str | None = None,
        *,
        timeout: float | None = None,
        metadata: Sequence[tuple[str, str]] = (),
        **params: Unpack[GenerateParams],
    ) -> Completion:
        """Runs `generate()` to the end and returns the joined `Completion`."""
        stream = self.generate(prompt, timeout=timeout, metadata=metadata, **params)
        return Completion.from_chunks([chunk async for chunk in stream])

    async def tokenize(
        self,
        prompt: str | None = None,
        messages: list[dict[str, str]] | None = None,
        *,
        timeout: float | None = None,
        metadata: Sequence[tuple[str, str]] = (),
    ) -> list[int]:
        """The token ids the router would send to an engine (see `LLMClient.tokenize`)."""
        request = build_tokenize_request(prompt, messages)
        response = await self._stub.Tokenize(request, **self._call_options(timeout, metadata))
        return list(response.token_ids)

    async def model_info(
        self, *, timeout: float | None = None, metadata: Sequence[tuple[str, str]] = ()
    ) -> dict[str, Any]:
        """Describes the served model (see `LLMClient.model_info`)."""
        response = await self._stub.GetModelInfo(
            generate_service_pb2.GetModelInfoRequest(), **self._call_options(timeout, metadata)
        )
        return model_info_to_dict(response)

    async def health(
        self,
        service: str = "",
        *,
        timeout: float | None = None,
        metadata: Sequence[tuple[str, str]] = (),
    ) -> str:
        """Asks `grpc.health.v1.Health/Check`; returns "SERVING", "NOT_SERVING", "UNKNOWN", ..."""
        response = await self._health.Check(
            health_request(service), **self._call_options(timeout, metadata)
        )
        return health_status_name(response)

    async def close(self) -> None:
        """Closes the channel, cancelling any call still running."""
        await self._channel.close()

    async def __aenter__(self) -> AsyncLLMClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()
