"""`pensievectl`: the client that controls a Pensieve daemon. Never imports MLX at start."""
