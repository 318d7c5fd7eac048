"""Built-in correlators: how discarded tokens relate to preserved ones."""
