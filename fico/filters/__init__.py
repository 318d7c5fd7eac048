"""Built-in filters: redundancy scores and the discarded/preserved split."""
