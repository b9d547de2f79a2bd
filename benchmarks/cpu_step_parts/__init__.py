"""The pieces of :mod:`benchmarks.cpu_step` (the CLI lives there): :mod:`.measure` times the
matmul reference, the pretrain step and the fine-tune step."""
