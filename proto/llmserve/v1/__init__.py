"""Generated protobuf and gRPC code for the llmserve.v1 API (see the .proto files beside it)."""
