"""The engine service: a paged-KV continuous batcher behind the internal EngineService API."""
