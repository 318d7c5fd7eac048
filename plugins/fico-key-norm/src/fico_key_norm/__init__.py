"""Example fico plugin package: the ``key_norm`` filter."""
