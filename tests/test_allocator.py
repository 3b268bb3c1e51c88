"""m2restore.allocator: freed large blocks are reused without page faults, and the opt-out works.
Each case runs in a fresh interpreter: the setting is process-wide and cannot be undone."""
from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                                reason="glibc's mallopt")

# A loop that makes and frees three 64 MiB temporaries per step, like a model's activations; the
# page faults of its last steps are counted (the heap needs a few steps to hold reusable blocks:
# PyTorch's 64-byte-aligned requests do not fit exactly into the block just freed).
PROBE = """
import resource, torch
from m2restore.allocator import retain_freed_memory
took = retain_freed_memory()
x = torch.ones(1 << 24)
for step in range(10):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    y = x * 2
    z = y + 1
    del y
    w = z.exp()
    del z, w
print(int(took), resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def probe(**env) -> tuple[bool, int]:
    out = subprocess.run([sys.executable, "-c", PROBE], check=True, capture_output=True, text=True,
                         env={**os.environ, **env}).stdout.split()
    return out[0] == "1", int(out[1])


def test_freed_blocks_are_reused_without_page_faults():
    took, faults = probe()
    assert took
    assert faults < 64  # three fresh 64 MiB blocks: 49,152 faults in 4 KiB pages, 96 in 2 MiB ones


def test_opt_out_keeps_the_system_behaviour():
    took, faults = probe(M2RESTORE_MALLOC="system")
    assert not took
    assert faults >= 96  # glibc maps every 64 MiB block afresh and faults it in page by page
