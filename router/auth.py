"""Bearer-token auth on the router's public API, with per-tenant keys.

The keys file (`--auth-keys-file`, a Kubernetes Secret in the chart) is JSON mapping each tenant
to the keys that act for it:

    {"tenants": {"team-a": ["key-a1", "key-a2"], "team-b": ["key-b1"]}}

A caller sends `authorization: Bearer <key>`. The tenant is the one the key belongs to, never the
one the request names: a request naming another tenant is refused with PERMISSION_DENIED, and one
naming none is bound to the key's tenant. Health and reflection stay open, so probes and
`grpcurl list` need no key; every `GenerateService` method needs one.
"""

import contextlib
import hashlib
import hmac
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import structlog
from google.protobuf.message import Message

from llmserve.common.call_outcome import status_outcome
from llmserve.common.request_limits import MAX_TENANT_CHARS
from llmserve.router import metrics

log = structlog.get_logger(__name__)

Check = Callable[[Any, grpc.aio.ServicerContext], Awaitable[None]]


def _digest(key: str) -> bytes:
    # Comparing fixed-length digests keeps the comparison's time independent of key lengths too.
    return hashlib.sha256(key.encode()).digest()


class TenantKeys:
    """The keys of each tenant, held as digests, looked up in constant time."""

    def __init__(self, tenants: dict[str, list[str]]) -> None:
        owner: dict[bytes, str] = {}
        for tenant, keys in tenants.items():
            if not isinstance(tenant, str) or not tenant:
                raise ValueError("auth keys: tenant names must be non-empty strings")
            if len(tenant) > MAX_TENANT_CHARS:
                # Requests run as their key's tenant: every one would be refused.
                raise ValueError(
                    f"auth keys: tenant names are at most {MAX_TENANT_CHARS} characters"
                )
            if not isinstance(keys, list) or not keys:
                raise ValueError(f"auth keys: tenant '{tenant}' needs a non-empty list of keys")
            for key in keys:
                if not isinstance(key, str) or not key or key != "".join(key.split()):
                    raise ValueError(
                        f"auth keys: tenant '{tenant}' has a key that is empty, not a string or "
                        "contains whitespace"
                    )
                other = owner.setdefault(_digest(key), tenant)
                if other != tenant:
                    raise ValueError(
                        f"auth keys: tenants '{other}' and '{tenant}' share a key; a key must "
                        "name exactly one tenant"
                    )
        if not owner:
            raise ValueError("auth keys: no tenant has a key")
        self._entries = list(owner.items())
        self.tenants = sorted(tenants)

    @classmethod
    def from_file(cls, path: Path) -> "TenantKeys":
        """Reads `{"tenants": {"<tenant>": ["<key>", ...]}}` (ValueError when malformed)."""
        try:
            document = json.loads(path.read_text())
        except OSError as exc:
            raise ValueError(f"cannot read the auth keys file {path}: {exc.strerror}") from exc
        except json.JSONDecodeError as exc:
            # The position only: the decoder's message never quotes the file's content.
            raise ValueError(f"auth keys file {path} is not JSON: {exc.msg} at {exc.pos}") from exc
        if not isinstance(document, dict) or not isinstance(document.get("tenants"), dict):
            raise ValueError(
                f'auth keys file {path}: expected {{"tenants": {{"<tenant>": ["<key>", ...]}}}}'
            )
        return cls(document["tenants"])

    @property
    def num_keys(self) -> int:
        return len(self._entries)

    def tenant_for(self, token: str) -> str | None:
        """The tenant `token` is a key of, or None."""
        digest = _digest(token)
        found = None
        for key_digest, tenant in self._entries:
            # No early exit: the time taken does not tell which entry matched, or whether any did.
            if hmac.compare_digest(digest, key_digest):
                found = tenant
        return found


def bearer_token(metadata: Any) -> str | None:
    """The token of an `authorization: Bearer <token>` header, or None without one."""
    for name, value in metadata or ():
        if name == "authorization" and isinstance(value, str):
            scheme, _, token = value.strip().partition(" ")
            return (token.strip() or None) if scheme.lower() == "bearer" else None
    return None


def _wrap(handler: grpc.RpcMethodHandler, check: Check) -> grpc.RpcMethodHandler:
    """The same handler with `check` run first; `check` aborts the call or lets it through."""
    if handler.unary_stream is not None:
        inner_stream = handler.unary_stream

        async def stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            await check(request, context)
            # Closing this stream (a cancelled call) closes the handler's at once, so its
            # clean-up (admission slot, metrics) does not wait for garbage collection.
            async with contextlib.aclosing(inner_stream(request, context)) as responses:
                async for response in responses:
                    yield response

        return grpc.unary_stream_rpc_method_handler(
            stream,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )
    if handler.unary_unary is not None:
        inner_unary = handler.unary_unary

        async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
            await check(request, context)
            return await inner_unary(request, context)

        return grpc.unary_unary_rpc_method_handler(
            unary,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )
    # Refusing beats passing a client-streaming method through unchecked.
    raise TypeError("bearer auth covers unary-request methods only")


class BearerAuthInterceptor(grpc.aio.ServerInterceptor):
    """Authenticates every call to methods under `protected_prefix` and binds its tenant."""

    def __init__(self, keys: TenantKeys, protected_prefix: str) -> None:
        self.keys = keys
        self.protected_prefix = protected_prefix

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        """Wraps protected methods' handlers in the token check; the rest pass untouched."""
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or not method.startswith(self.protected_prefix):
            return handler
        token = bearer_token(handler_call_details.invocation_metadata)
        tenant = None if token is None else self.keys.tenant_for(token)
        if tenant is None:
            return _wrap(handler, _refuse(method, missing=token is None))
        return _wrap(handler, _bind_tenant(tenant, method))


def _abort(
    context: grpc.aio.ServicerContext, method: str, code: grpc.StatusCode, details: str
) -> Awaitable[None]:
    """Refuses the call; a refused Generate is counted like every other Generate call."""
    if method.endswith("/Generate"):
        metrics.REQUESTS.labels(status_outcome(code)).inc()
    return context.abort(code, details)


def _refuse(method: str, missing: bool) -> Check:
    async def refuse(request: Any, context: grpc.aio.ServicerContext) -> None:
        # Which peer and why, never the token itself.
        log.warning(
            "auth_refused",
            method=method,
            peer=context.peer(),
            reason="missing token" if missing else "unknown key",
        )
        await _abort(
            context,
            method,
            grpc.StatusCode.UNAUTHENTICATED,
            "missing bearer token: send the metadata 'authorization: Bearer <key>'"
            if missing
            else "the bearer token is not a valid key",
        )

    return refuse


def _bind_tenant(tenant: str, method: str) -> Check:
    async def bind(request: Any, context: grpc.aio.ServicerContext) -> None:
        # A request that failed to parse has no tenant field; the handler reports it.
        if not isinstance(request, Message) or "tenant" not in request.DESCRIPTOR.fields_by_name:
            return
        if request.tenant and request.tenant != tenant:
            await _abort(
                context,
                method,
                grpc.StatusCode.PERMISSION_DENIED,
                f"the request names tenant '{request.tenant}' but the key belongs to '{tenant}'",
            )
        request.tenant = tenant

    return bind
