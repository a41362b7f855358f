"""The router: text in and out for users, token ids to and from engines."""

from llmserve.common.grpc_polling import use_classic_poller

# First, before any module of this package imports grpc.
use_classic_poller()
