"""The model runner: runs one planned step (its flat batch, the model over the paged KV cache,
CUDA graphs where captured) and samples its tokens. It lives in the core process, and alone in
every other tensor-parallel rank's process (`follower`)."""
