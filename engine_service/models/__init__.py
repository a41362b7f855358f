"""Model definitions the engine runs (pure torch modules; attention goes through a backend), and
the checkpoint reader that gives their shape."""
