"""The command line's malloc setting: a large block freed and allocated again is reused, not faulted in anew
(unless ``LONGMEM_MALLOC=system`` opts out)."""

import os
import subprocess
import sys

import pytest

from longmem.malloc import reuse_freed_memory

PROBE = r"""
import resource, sys
import torch
if sys.argv[1] != "system":
    from longmem.malloc import reuse_freed_memory
    assert reuse_freed_memory() == (sys.argv[1] == "reuse")  # "opted out": LONGMEM_MALLOC=system
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
pages = []
for _ in range(6):  # allocate, touch and free 100 MB, as a training step does with an LM head's logits, 6 times
    before = faults()
    x = torch.ones(25_000_000)
    del x
    pages.append(faults() - before)
# the last 3 rounds: with reuse the heap has settled by then (a small block landing in the freed space can make the
# second round extend the heap once more)
print(sum(pages[-3:]))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_freed_blocks_are_reused_instead_of_faulted_in_again():
    def last_round_faults(mode: str, **env) -> int:
        out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True,
                             env={**os.environ, "LONGMEM_MALLOC": "", **env})
        return int(out.stdout)

    system, reused = last_round_faults("system"), last_round_faults("reuse")
    assert system > 15_000  # 3 x 100 MB mapped afresh: a fault per 4 KB page (fewer with huge pages, still thousands)
    assert reused < system / 20
    assert last_round_faults("opted out", LONGMEM_MALLOC="system") > system / 2  # glibc's default left alone


def test_the_command_line_tunes_malloc_before_a_command_runs(monkeypatch, tmp_path):
    from longmem import cli

    calls = []
    monkeypatch.setattr(cli, "reuse_freed_memory", lambda: calls.append(1))
    assert cli.main(["memory", "list", "--home", str(tmp_path / "store")]) == 0
    assert calls == [1]
    assert reuse_freed_memory() is reuse_freed_memory()  # applied once per process (cached)
