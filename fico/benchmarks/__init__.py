"""Benchmarks that print measured numbers (never timed unit tests)."""
