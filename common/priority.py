"""Priority on the wire (an enum) and inside the servers (a class, lower = more important)."""

from llmserve.v1 import common_pb2

PRIORITY_CLASS = {
    common_pb2.PRIORITY_UNSPECIFIED: 1,
    common_pb2.PRIORITY_CRITICAL: 0,
    common_pb2.PRIORITY_STANDARD: 1,
    common_pb2.PRIORITY_BATCH: 2,
}
