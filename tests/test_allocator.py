"""glibc allocator tuning: camera-sized buffers stop being mapped and unmapped per message."""

from __future__ import annotations

import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mallopt is glibc's")

#: Frees and allocates three 450 KB buffers (a camera-sized message's worth) per round; prints minor page faults per round.
ROUNDS = """
import ctypes, resource, sys
# Without transparent huge pages: with them the kernel may back a buffer with 2 MiB pages, and the
# plain count drops from ~190 to a handful depending on the machine's memory state (seen: 4.7).
ctypes.CDLL(None).prctl(41, 1, 0, 0, 0)  # PR_SET_THP_DISABLE
if sys.argv[1] == "tuned":
    from policylink import tune_allocator
    assert tune_allocator() and tune_allocator()  # idempotent
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    buffers = [bytearray(450_000) for _ in range(3)]
    del buffers
before = faults()
for _ in range(200):
    buffers = [bytearray(450_000) for _ in range(3)]  # zero-filled: every page is touched
    del buffers
print((faults() - before) / 200)
"""


def faults_per_round(mode: str) -> float:
    out = subprocess.run([sys.executable, "-c", ROUNDS, mode], capture_output=True, text=True, timeout=60, check=True)
    return float(out.stdout.strip())


def test_tuned_allocator_reuses_message_sized_buffers():
    plain, tuned = faults_per_round("plain"), faults_per_round("tuned")
    assert tuned < 5, f"{tuned} page faults per round with the tuning"
    # glibc's defaults give back the freed buffers' pages and fault them in again (about 190 per round here).
    assert plain > 10 * max(tuned, 1.0), (plain, tuned)
