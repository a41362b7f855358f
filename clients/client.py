"""The blocking client of the public `llmserve.v1.GenerateService` API."""

from __future__ import annotations

from collections.abc import Generator, Sequence
from types import TracebackType
from typing import Any, Unpack

import grpc

from llmserve.clients._base import (
    ClientBase,
    health_request,
    health_status_name,
    model_info_to_dict,
)
from llmserve.clients.chunk import Chunk, Completion, chunk_from_proto
from llmserve.clients.request import GenerateParams, build_generate_request, build_tokenize_request
from llmserve.v1 import generate_service_pb2


class LLMClient(ClientBase):
    """A blocking client of an llmserve router.

    Args:
        target: A gRPC target: `host:port`, or `dns:///svc:50051` to resolve every address behind
            a (headless) Kubernetes Service.
        channel_credentials: TLS credentials (`grpc.ssl_channel_credentials(...)`); plaintext
            when `None`.
        token: Sent as `authorization: Bearer <token>` metadata on every call.
        options: gRPC channel arguments, e.g. `[("grpc.max_receive_message_length", -1)]`.
        load_balancing: A gRPC load-balancing policy such as `"round_robin"`, which spreads calls
            over every address the target resolves to (with `dns:///`) instead of pinning one.

    Every method raises `grpc.RpcError` when the call fails; `.code()` is the server's status
    (`INVALID_ARGUMENT` for bad input, `RESOURCE_EXHAUSTED` for shed load, `UNAVAILABLE`,
    `DEADLINE_EXCEEDED`, ...) and `.details()` its message. Methods take `timeout` (seconds; the
    deadline travels to the server) and extra `metadata` pairs. Use as a context manager, or call
    `close()`.
    """

    _grpc = grpc

    def generate(
        self,
        prompt: str | None = None,
        *,
        timeout: float | None = None,
        metadata: Sequence[tuple[str, str]] = (),
        **params: Unpack[GenerateParams],
    ) -> Generator[Chunk, None, None]:
        """Streams a completion, one `Chunk` per response, as the server produces them.

        Takes the arguments of `llmserve.clients.request.build_generate_request`. The call starts
        at the first `next()`. Leaving the loop early (`break`, an exception) or calling
        `.close()` on the generator cancels the call, so the server stops generating; keep no
        other reference to the generator if you rely on `break` alone.
        """
        request = build_generate_request(prompt, **params)
        call = self._stub.Generate(request, **self._call_options(timeout, metadata))
        try:
            for response in call:
                yield chunk_from_proto(response)
        finally:
            # A no-op once the stream has ended; otherwise the server is told to stop.
            call.cancel()

    def generate_text(
        self,
        prompt: str | None = None,
        *,
        timeout: float | None = None,
        metadata: Sequence[tuple[str, str]] = (),
        **params: Unpack[GenerateParams],
    ) -> Completion:
        """Runs `generate()` to the end and returns the joined `Completion`."""
        return Completion.from_chunks(
            self.generate(prompt, timeout=timeout, metadata=metadata, **params)
        )

    def tokenize(
        self,
        prompt: str | None = None,
        messages: list[dict[str, str]] | None = None,
        *,
        timeout: float | None = None,
        metadata: Sequence[tuple[str, str]] = (),
    ) -> list[int]:
        """Returns the token ids the router would send to an engine for this prompt or chat."""
        request = build_tokenize_request(prompt, messages)
        response = self._stub.Tokenize(request, **self._call_options(timeout, metadata))
        return list(response.token_ids)

    def model_info(
        self, *, timeout: float | None = None, metadata: Sequence[tuple[str, str]] = ()
    ) -> dict[str, Any]:
        """Describes the served model: `model`, `max_model_len`, `vocab_size`, `num_engines`,
        `max_tokens_default`."""
        response = self._stub.GetModelInfo(
            generate_service_pb2.GetModelInfoRequest(), **self._call_options(timeout, metadata)
        )
        return model_info_to_dict(response)

    def health(
        self,
        service: str = "",
        *,
        timeout: float | None = None,
        metadata: Sequence[tuple[str, str]] = (),
    ) -> str:
        """Asks `grpc.health.v1.Health/Check`; returns "SERVING", "NOT_SERVING", "UNKNOWN", ..."""
        response = self._health.Check(
            health_request(service), **self._call_options(timeout, metadata)
        )
        return health_status_name(response)

    def close(self) -> None:
        """Closes the channel, cancelling any call still running."""
        self._channel.close()

    def __enter__(self) -> LLMClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
