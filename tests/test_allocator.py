"""pilamim.allocator: freed training buffers stay in the process instead of coming back from
the kernel as fresh pages (counted as minor page faults, in a fresh process each)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from pilamim.allocator import keep_freed_memory

STEPS = """
import resource, sys, torch
if sys.argv[1] == "keep":
    from pilamim.allocator import keep_freed_memory
    assert keep_freed_memory()
torch.set_num_threads(1)
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(128, 512), torch.nn.GELU(), torch.nn.Linear(512, 128))
x = torch.randn(4096, 128)  # 8 MB activations: above glibc's default mmap threshold

def step():
    model(x).square().mean().backward()

step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    step()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _page_faults(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", STEPS, mode], capture_output=True, text=True,
                         check=True)
    return int(out.stdout.strip())


@pytest.mark.skipif(sys.platform != "linux", reason="glibc's mallopt")
def test_kept_memory_cuts_the_page_faults_of_repeated_steps():
    assert keep_freed_memory()
    default, kept = _page_faults("default"), _page_faults("keep")
    assert kept < default / 2, (default, kept)
