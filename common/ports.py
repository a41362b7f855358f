"""Server ports: a default steps to the next free port, a port given outright must be free, and
a port no one configures (the tensor-parallel rendezvous) is one the OS picks.

A second local engine started with the defaults takes the next free ports; a port that was
asked for and is taken fails start-up with a message naming it (gRPC's own bind error names
no flag, the Prometheus server's not even the port).
"""

import errno
import socket

import structlog

log = structlog.get_logger(__name__)

# How many ports from a default are tried before giving up.
PORT_SEARCH = 16


def port_is_free(host: str, port: int) -> bool:
    """Whether a server could bind `host:port` now. SO_REUSEADDR, as gRPC and the metrics
    server set it: a port left in TIME_WAIT by a server that just stopped counts as free."""
    family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                return False
            raise
    return True


def cannot_listen(option: str, host: str, port: int, reason: str) -> OSError:
    """The start-up error for a port that cannot be served, naming the flag and the port."""
    return OSError(f"{option} {port}: cannot listen on {host}:{port}: {reason}")


def check_port_free(option: str, host: str, port: int) -> None:
    """Raises `cannot_listen` when `port` is taken (0 = any port: never)."""
    if port != 0 and not port_is_free(host, port):
        raise cannot_listen(
            option, host, port, "address already in use (another server running?)"
        )


def first_free_port(option: str, host: str, default: int) -> int:
    """The first free port from `default` on; logs the ones it skipped as taken."""
    taken = []
    for port in range(default, default + PORT_SEARCH):
        if port_is_free(host, port):
            if taken:
                log.info("default_port_taken", option=option, taken=taken, port=port)
            return port
        taken.append(port)
    raise OSError(
        f"{option}: ports {default}..{default + PORT_SEARCH - 1} on {host} are all in use",
    )


def ephemeral_port() -> int:
    """A loopback port the OS reports unused now, for a listener only our own processes dial:
    no user names it, so there is no default to step from. It is free when returned, not
    reserved: the caller binds it next."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
