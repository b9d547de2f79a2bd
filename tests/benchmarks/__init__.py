"""Tests of benchmarks/throughput.py on the CPU with a micro model (no GPU needed)."""
