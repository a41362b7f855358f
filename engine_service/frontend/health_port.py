"""A plaintext port that serves gRPC health and nothing else, for kubelet probes.

Under mutual TLS the engine's serving port demands a client certificate, which kubelet's native
gRPC probes cannot show. This port serves only `grpc.health.v1.Health`, backed by the main
server's own health servicer, so it always reports what the main port reports (SERVING, then
NOT_SERVING while draining) and exposes no engine API without a certificate.
"""

import grpc
import structlog
from grpc_health.v1 import health, health_pb2_grpc

log = structlog.get_logger(__name__)


async def start_health_server(
    servicer: health.aio.HealthServicer, host: str, port: int
) -> grpc.aio.Server:
    """Starts a plaintext server for `servicer` on `host:port` (0 = any free port)."""
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    try:
        bound_port = server.add_insecure_port(f"{host}:{port}")
    except RuntimeError as exc:
        # grpcio reports a taken port as RuntimeError; the CLI reports OSError as a start-up error.
        raise OSError(f"cannot bind the health port {host}:{port}") from exc
    await server.start()
    log.info("health_serving", host=host, port=bound_port)
    return server
