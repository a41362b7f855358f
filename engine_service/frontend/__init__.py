"""The gRPC frontend process: serves EngineService, checks requests and streams the outputs of
the core process, which it starts and talks to only through `seam` (so it loads no torch)."""
