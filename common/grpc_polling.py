"""Which of gRPC's socket pollers our servers run: the one that reads on grpc.aio's own thread.

gRPC's default EventEngine reads a socket on an EventEngine thread, then wakes the
completion-queue thread that grpc.aio drains into the event loop: two thread wake-ups per message
before the loop sees it. The classic poller reads the socket on that completion-queue thread, one
wake-up fewer. A forwarded token crosses four such message ends more than a direct one (router
in and out, both ways), so the router's cost to a first token is mostly these wake-ups.
`benchmarks/grpc_poller.py` times a message round trip with each.

gRPC reads the choice once, from GRPC_EXPERIMENTS, when it starts; an operator's setting wins.
"""

import os
import sys

CLASSIC_POLLER = "-event_engine_listener,-event_engine_client"


def use_classic_poller() -> None:
    """Makes the classic poller this process's default; call it before grpc is imported."""
    if "grpc" not in sys.modules:
        os.environ.setdefault("GRPC_EXPERIMENTS", CLASSIC_POLLER)
