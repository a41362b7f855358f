"""TLS credentials for gRPC servers and channels, loaded from PEM files named on the command line.

Kubernetes mounts certificates from Secrets as files (`tls.crt`, `tls.key`, `ca.crt`), so every
credential here is built from paths. Nothing given means plaintext; a half-given pair (a
certificate without its key) is a start-up error rather than a silent fallback to plaintext.
"""

from pathlib import Path

import grpc


def _read(path: Path, what: str) -> bytes:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ValueError(f"cannot read the {what} {path}: {exc.strerror}") from exc
    if b"-----BEGIN " not in data:
        raise ValueError(f"the {what} {path} is not PEM")
    return data


def server_credentials(
    cert: Path | None, key: Path | None, client_ca: Path | None = None
) -> grpc.ServerCredentials | None:
    """Credentials for a listening port: TLS with `cert`/`key`, or None (plaintext) with neither.

    With `client_ca`, the port demands a client certificate signed by that CA (mutual TLS) and
    refuses the handshake of any client that shows none or another CA's.
    """
    if cert is None and key is None:
        if client_ca is not None:
            raise ValueError("a client CA needs the server's own certificate and key as well")
        return None
    if cert is None or key is None:
        raise ValueError("a TLS certificate and its key must be given together")
    return grpc.ssl_server_credentials(
        [(_read(key, "TLS key"), _read(cert, "TLS certificate"))],
        root_certificates=None if client_ca is None else _read(client_ca, "client CA"),
        require_client_auth=client_ca is not None,
    )


def channel_credentials(
    ca: Path | None, cert: Path | None = None, key: Path | None = None
) -> grpc.ChannelCredentials | None:
    """Credentials for dialling a TLS server whose certificate `ca` signed; None = plaintext.

    `cert`/`key` are this side's client certificate, for servers that demand one (mutual TLS).
    """
    if (cert is None) != (key is None):
        raise ValueError("a client certificate and its key must be given together")
    if ca is None:
        if cert is not None:
            raise ValueError("a client certificate needs the CA that signed the server's")
        return None
    return grpc.ssl_channel_credentials(
        root_certificates=_read(ca, "CA certificate"),
        private_key=None if key is None else _read(key, "TLS key"),
        certificate_chain=None if cert is None else _read(cert, "TLS certificate"),
    )
