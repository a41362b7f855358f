"""The channel a router opens to one engine: plaintext, or mutual TLS when configured."""

import grpc

# The engine accepts requests up to 64 MiB; its replies can be as large: a WatchKvEvents snapshot
# lists every cached block hash, megabytes for a big pool, past gRPC's 4 MiB default.
ENGINE_MAX_MESSAGE_BYTES = 64 << 20


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
    ]
    if credentials is None:
        return grpc.aio.insecure_channel(address, options=options)
    if server_name:
        options.append(("grpc.ssl_target_name_override", server_name))
    return grpc.aio.secure_channel(address, credentials, options=options)
