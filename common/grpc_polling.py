"""Which of gRPC's socket pollers our servers run: the one that reads on grpc.aio's own thread.

gRPC's default EventEngine reads a socket on an EventEngine thread, then wakes the
completion-queue thread that grpc.aio drains into the event loop: two thread wake-ups per message
before the loop sees it. The classic poller reads the socket on that completion-queue thread, one
wake-up fewer. A routed request crosses two more message hops than a direct one (router to engine
and back), so most of what the router adds to a first token is these wake-ups.

The trade (`benchmarks/grpc_poller.py`, `router_throughput.py`, W2; figures in
docs/benchmarks.md):
- a message round trip on an open stream is shorter, back to back and idle alike;
- the router adds less to W2's first-token latency at 4 req/s;
- one router streams fewer tokens/s at most: its event-loop thread spends more per message.
  Routers scale out; a deployment bound by router CPU rather than latency can set
  GRPC_EXPERIMENTS="" to get the EventEngine back.

gRPC reads the choice once, from GRPC_EXPERIMENTS, when it starts; an operator's setting wins.
"""

import os
import sys

CLASSIC_POLLER = "-event_engine_listener,-event_engine_client"


def use_classic_poller() -> None:
    """Makes the classic poller this process's default; call it before grpc is imported."""
    if "grpc" not in sys.modules:
        os.environ.setdefault("GRPC_EXPERIMENTS", CLASSIC_POLLER)
