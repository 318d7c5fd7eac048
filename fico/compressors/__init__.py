"""Built-in compressors: how discarded information enters the preserved tokens."""
