"""Which of gRPC's socket pollers our servers run: the one that reads on grpc.aio's own thread.

gRPC's default EventEngine reads a socket on an EventEngine thread, then wakes the
completion-queue thread that grpc.aio drains into the event loop: two thread wake-ups per message
before the loop sees it. The classic poller reads the socket on that completion-queue thread, one
wake-up fewer. A routed request crosses two more message hops than a direct one (router to engine
and back), so most of what the router adds to a first token is these wake-ups.

The trade, measured on the H200 host (`benchmarks/grpc_poller.py`, `router_throughput.py`, W2):
- a message round trip on an open stream: 198 -> 88 us back to back, 809 -> 582 us idle;
- what the router adds to W2's TTFT p50 at 4 req/s: +1.21 and +1.25 ms -> +0.95 to +1.23 ms
  over four runs (the path outside the engine, router minus direct of the mean client TTFT
  less the engine's own: 1.08-1.13 -> 0.80-1.02 ms);
- one router's most tokens/s to 256 streams: 24-33k -> 19-24k; its event-loop thread spends
  more per message (4.7-5.0 s against 3.5-4.3 s for the same 131k tokens). Routers scale out;
  a deployment bound by router CPU rather than latency can set GRPC_EXPERIMENTS="" to get the
  EventEngine back.

gRPC reads the choice once, from GRPC_EXPERIMENTS, when it starts; an operator's setting wins.
"""

import os
import sys

CLASSIC_POLLER = "-event_engine_listener,-event_engine_client"


def use_classic_poller() -> None:
    """Makes the classic poller this process's default; call it before grpc is imported."""
    if "grpc" not in sys.modules:
        os.environ.setdefault("GRPC_EXPERIMENTS", CLASSIC_POLLER)
