"""The engine core process: builds the engine, then runs the step loop (scheduler, KV blocks,
model runner, sampler) on the frontend's requests; `core_process.core_process_main` is its entry."""
