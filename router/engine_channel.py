"""The channel a router opens to one engine: plaintext, or mutual TLS when configured."""

import grpc

# The engine accepts requests up to 64 MiB; its replies can be as large: a WatchKvEvents snapshot
# lists every cached block hash, megabytes for a big pool, past gRPC's 4 MiB default.
ENGINE_MAX_MESSAGE_BYTES = 64 << 20
# The receive window of each stream on the channel that carries a router's GenerateStreams call.
# Fixed (no BDP auto-tuning): when the router's event loop falls behind the engine's per-step
# token messages, the window fills within a few messages, the engine's next write waits, and the
# engine merges every stream's new tokens into it: fewer, larger messages for a busy router to
# fan out, instead of an auto-tuned window buffering every step for it to handle one by one.
LINK_STREAM_WINDOW_BYTES = 64 << 10
# gRPC's own reconnect backoff grows 1.6-fold to 120 s: an engine restarted after a few failed
# dials was found long after it served. Capped at 1 s, a dial is never more than ~1.2 s away.
RECONNECT_INITIAL_BACKOFF_MS = 100
RECONNECT_MAX_BACKOFF_MS = 1000


def open_engine_channel(
    address: str,
    credentials: grpc.ChannelCredentials | None,
    server_name: str | None = None,
    stream_window_bytes: int | None = None,
    keepalive_s: float | None = None,
) -> grpc.aio.Channel:
    """Dials `address`; with credentials, the engine's certificate must name `server_name`.

    `stream_window_bytes` fixes each stream's receive window (None = gRPC's auto-tuned one).
    `keepalive_s`: an HTTP/2 ping goes out after that long without one, and the connection (with
    every call on it) fails when no answer comes within that long again: a frozen or unreachable
    engine's calls end with UNAVAILABLE instead of hanging until their deadlines (engines permit
    pings this often, see `engine_service.frontend.server`). None = no pings.

    `server_name` matters for engines found through DNS: the router dials the resolved pod IP,
    while the certificate names the headless Service (what the chart asks engines' certificates
    to carry). Without it the address's own host is checked.
    """
    options: list[tuple[str, int | str]] = [
        ("grpc.max_receive_message_length", ENGINE_MAX_MESSAGE_BYTES),
        ("grpc.max_send_message_length", ENGINE_MAX_MESSAGE_BYTES),
        ("grpc.initial_reconnect_backoff_ms", RECONNECT_INITIAL_BACKOFF_MS),
        ("grpc.max_reconnect_backoff_ms", RECONNECT_MAX_BACKOFF_MS),
    ]
    if keepalive_s is not None:
        options += [
            ("grpc.keepalive_time_ms", int(keepalive_s * 1000)),
            ("grpc.keepalive_timeout_ms", int(keepalive_s * 1000)),
            ("grpc.http2.ping_timeout_ms", int(keepalive_s * 1000)),
            # Idle connections too (the request connection between requests), without limit:
            # an engine that froze while idle is known before a request is sent there.
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.max_pings_without_data", 0),
        ]
    if stream_window_bytes is not None:
        options += [
            ("grpc.http2.bdp_probe", 0),
            ("grpc.http2.lookahead_bytes", stream_window_bytes),
        ]
    if credentials is None:
        return grpc.aio.insecure_channel(address, options=options)
    if server_name:
        options.append(("grpc.ssl_target_name_override", server_name))
    return grpc.aio.secure_channel(address, credentials, options=options)
