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


def open_engine_channel(
    address: str,
    credentials: grpc.ChannelCredentials | None,
    server_name: str | None = None,
    stream_window_bytes: int | None = None,
) -> grpc.aio.Channel:
    """Dials `address`; with credentials, the engine's certificate must name `server_name`.

    `stream_window_bytes` fixes each stream's receive window (None = gRPC's auto-tuned one).

    `server_name` matters for engines found through DNS: the router dials the resolved pod IP,
    while the certificate names the headless Service (what the chart asks engines' certificates
    to carry). Without it the address's own host is checked.
    """
    options: list[tuple[str, int | str]] = [
        ("grpc.max_receive_message_length", ENGINE_MAX_MESSAGE_BYTES),
        ("grpc.max_send_message_length", ENGINE_MAX_MESSAGE_BYTES),
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
