"""The channel a router opens to one engine: plaintext, or mutual TLS when configured."""

import grpc

# The engine accepts requests up to 64 MiB; its replies can be as large: a WatchKvEvents snapshot
# lists every cached block hash, megabytes for a big pool, past gRPC's 4 MiB default.
ENGINE_MAX_MESSAGE_BYTES = 64 << 20
# Each engine stream's HTTP/2 receive window: about six one-token responses (~20 bytes each).
# The engine's frontend merges every token a stream has queued into its next response
# (`AsyncEngine.generate`), but tokens only queue while its send waits; with gRPC's default window
# (64 KiB, grown by BDP probing) a router that falls behind instead buffers thousands of one-token
# responses per stream and pays the full per-message cost for each. A small fixed window pushes
# back on the engine after a few responses, so a busy router receives fewer, larger messages: it
# degrades into more tokens per message instead of a growing backlog. A message larger than the
# window (a long merged batch, logprobs, a KV snapshot) still passes: gRPC widens the window for
# the message being read. Measured with a CPU-capped router: 64-128 bytes merged 2.2-2.5 tokens
# per message, 256 bytes 1.4, while below ~2 messages (32 bytes) nothing was merged at all.
STREAM_WINDOW_BYTES = 128


def open_engine_channel(
    address: str,
    credentials: grpc.ChannelCredentials | None,
    server_name: str | None = None,
) -> grpc.aio.Channel:
    """Dials `address`; with credentials, the engine's certificate must name `server_name`.

    `server_name` matters for engines found through DNS: the router dials the resolved pod IP,
    while the certificate names the headless Service (what the chart asks engines' certificates
    to carry). Without it the address's own host is checked.
    """
    options: list[tuple[str, int | str]] = [
        ("grpc.max_receive_message_length", ENGINE_MAX_MESSAGE_BYTES),
        ("grpc.max_send_message_length", ENGINE_MAX_MESSAGE_BYTES),
        ("grpc.http2.lookahead_bytes", STREAM_WINDOW_BYTES),
        # BDP probing would grow the window back to the connection's bandwidth-delay product.
        ("grpc.http2.bdp_probe", 0),
    ]
    if credentials is None:
        return grpc.aio.insecure_channel(address, options=options)
    if server_name:
        options.append(("grpc.ssl_target_name_override", server_name))
    return grpc.aio.secure_channel(address, credentials, options=options)
