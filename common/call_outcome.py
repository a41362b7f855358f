"""The outcome label under which both tiers count a request (`llmserve_*_requests_total`).

`finished`: the stream ended with its last response. `cancelled`: the caller cancelled the call
or went away. Any other end is the gRPC status the call ended with, in lower case:
`invalid_argument` (refused by a bound), `resource_exhausted` (shed), `deadline_exceeded`,
`unavailable`, ... `failed`: an exception nobody expected (the caller sees UNKNOWN).
"""

import grpc

FINISHED = "finished"
FAILED = "failed"


def status_outcome(code: grpc.StatusCode) -> str:
    return code.name.lower()


CANCELLED = status_outcome(grpc.StatusCode.CANCELLED)
DEADLINE_EXCEEDED = status_outcome(grpc.StatusCode.DEADLINE_EXCEEDED)


def ended_from_outside(context: grpc.aio.ServicerContext) -> str:
    """The outcome of a call that ended while its handler ran: the handler was cancelled, or
    (a streaming one) closed at a `yield` because gRPC stopped iterating it, as it does when
    the cancellation lands while it writes the previous response.

    gRPC ends a call whose deadline passed as it ends one its caller cancelled; only the time
    left tells them apart.
    """
    return DEADLINE_EXCEEDED if context.time_remaining() == 0 else CANCELLED
