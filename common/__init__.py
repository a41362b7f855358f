"""Pieces both servers share that need neither torch nor tokenizers: logging and block hashing."""
