"""Model inference: one backend protocol, three backends, a request cache."""
