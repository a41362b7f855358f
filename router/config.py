"""The router's settings, fixed at start-up.

Every `llmserve-router` flag is a field here (`common.config_flags` derives the flags, the
checks and docs/configuration.md).
"""

from dataclasses import dataclass
from enum import Enum
from pathlib import Path

from llmserve.common.config_flags import (
    INT32_MAX,
    PORT_MAX,
    check,
    host_setting,
    log_format_setting,
    log_level_setting,
    setting,
)

DEFAULT_METRICS_PORT = 9400
SECURITY = "TLS and auth (none given = plaintext, no auth)"


class Policy(Enum):
    """How the balancer picks an engine (see `balancer`)."""

    PREFIX = "prefix"
    ROUND_ROBIN = "round_robin"
    LEAST_LOAD = "least_load"
    RANDOM = "random"


@dataclass(frozen=True)
class RouterConfig:
    """What the router serves, in front of which engines, and under which limits."""

    model: Path = setting(Path("demo"), "checkpoint directory (only its tokenizer files are "
                                        "read), or 'demo'")
    engines: str = setting("127.0.0.1:50052",
                           "comma-separated host:port list, or dns:NAME:PORT (re-resolved)")
    host: str = host_setting()
    port: int = setting(50051, "gRPC port (0 = any)", low=0, high=PORT_MAX)
    metrics_port: int | None = setting(
        None, f"HTTP port of /metrics and /healthz (health details per engine) (default: "
              f"{DEFAULT_METRICS_PORT}, or the next free one; -1 = off)", low=-1, high=PORT_MAX)
    max_connection_age_s: float = setting(
        300.0, "clients' connections are closed after this long, so they reconnect and spread "
               "over router replicas added since", low=1, high=86400)
    routing_policy: str = setting("prefix", "prefix: lowest estimated time to first token",
                                  choices=[p.value for p in Policy])
    max_queue: int = setting(
        1024, "requests that may wait for admission before the least important is shed",
        low=0, high=INT32_MAX)
    # gRPC's message size limit is an int32 of bytes.
    max_message_mb: int = setting(
        16, "largest request or response message in MiB (a long prompt fits in the default)",
        low=1, high=2047)
    max_concurrent_rpcs: int = setting(
        4096, "calls in flight before new ones get RESOURCE_EXHAUSTED at once (keep it above "
              "--max-queue plus what the engines run)", low=1, high=INT32_MAX)
    busy_poll: bool = setting(
        False, "poll sockets instead of sleeping while requests are in flight: one thread "
               "wake-up fewer per message received, for one busy core (give the router 2 cores "
               "or more)")
    # Above the engines' one-second load heartbeat with room for a late one; below a minute,
    # past which frozen engines' streams would stall longer than clients wait.
    engine_silence_timeout_s: float = setting(
        3.0, "an engine that sends nothing for this long (its load stream beats every second; "
             "HTTP/2 pings go unanswered) leaves the pool and its streams fail over, as if it "
             "had died", low=2, high=60)
    tls_cert: Path | None = setting(None, "server certificate of the public port",
                                    group=SECURITY)
    tls_key: Path | None = setting(None, "private key of --tls-cert", group=SECURITY)
    engine_tls_ca: Path | None = setting(None, "CA of the engines' certificates: TLS to engines",
                                         group=SECURITY)
    engine_tls_cert: Path | None = setting(
        None, "client certificate shown to engines (mutual TLS)", group=SECURITY)
    engine_tls_key: Path | None = setting(None, "private key of --engine-tls-cert",
                                          group=SECURITY)
    auth_keys_file: Path | None = setting(
        None, 'JSON {"tenants": {"<tenant>": ["<key>", ...]}}: calls need '
              "'authorization: Bearer <key>' and run as the key's tenant", group=SECURITY)
    log_format: str = log_format_setting()
    log_level: str = log_level_setting()
    cprofile_out: Path | None = setting(
        None, "profile the event loop's CPU time with cProfile and write its stats here on "
              "exit (for benchmarks: the profiler slows the router down)")

    def __post_init__(self) -> None:
        check(self)
        if not self.engine_targets:
            raise ValueError("--engines: give at least one host:port or dns:NAME:PORT")

    @property
    def engine_targets(self) -> list[str]:
        return [t.strip() for t in self.engines.split(",") if t.strip()]

    @property
    def policy(self) -> Policy:
        return Policy(self.routing_policy)

    @property
    def max_message_bytes(self) -> int:
        return self.max_message_mb << 20
