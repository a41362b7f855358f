"""The router's HTTP port for operators: Prometheus `/metrics` and `/healthz`, its health details.

gRPC health says only SERVING or not; `/healthz` says why, per engine, as JSON: whether the
engine is ready and whether prefix routing to it works (see `hash_check`). It answers 200 while
the router can serve (some engine is ready), 503 otherwise. The port is the metrics port, which
deployments already open to monitoring only: engine addresses are not for the public API.
"""

import asyncio
import json
import socket
import threading
from collections.abc import Callable, Iterable
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import make_wsgi_app
from prometheus_client.exposition import ThreadingWSGIServer

HEALTH_PATH = "/healthz"
# How long a /healthz request waits for the event loop to describe the router.
DETAILS_TIMEOUT_S = 5.0


class _QuietHandler(WSGIRequestHandler):
    """No access log on stderr: scrapes every few seconds would drown the structured log."""

    def log_message(self, format: str, *args: Any) -> None:
        pass


class OpsHttpServer:
    """Serves `/metrics` and `/healthz` from a daemon thread until `close()`."""

    def __init__(
        self,
        host: str,
        port: int,
        loop: asyncio.AbstractEventLoop,
        details: Callable[[], dict[str, Any]],
    ) -> None:
        """`details` is called on `loop` (it reads state the loop owns) and returns the JSON
        body of `/healthz`; its "status" is "SERVING" when the router can serve."""
        self._loop = loop
        self._details = details
        self._metrics_app = make_wsgi_app()

        class Server(ThreadingWSGIServer):
            address_family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]

        self._server: WSGIServer = make_server(
            host, port, self._app, Server, handler_class=_QuietHandler
        )
        self.port: int = self._server.server_port
        threading.Thread(target=self._server.serve_forever, name="ops-http", daemon=True).start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    async def _describe(self) -> dict[str, Any]:
        return self._details()

    def _app(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        if environ.get("PATH_INFO") != HEALTH_PATH:
            return self._metrics_app(environ, start_response)
        details = asyncio.run_coroutine_threadsafe(self._describe(), self._loop).result(
            DETAILS_TIMEOUT_S
        )
        body = json.dumps(details, indent=2).encode()
        status = "200 OK" if details.get("status") == "SERVING" else "503 Service Unavailable"
        start_response(
            status,
            [("Content-Type", "application/json"), ("Content-Length", str(len(body)))],
        )
        return [body]
