"""Benchmarks and studies, each run as ``python -m benchmarks.<name>``."""
