"""The README's examples, run: the recall example's console commands through the real CLI (on longmem-tiny, as the
README names it) must print what the README shows; the library example runs (on longmem-tiny)."""

import hashlib
import os
import re
import subprocess
import sys
import xml.etree.ElementTree
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# the README's line numbers (1053, 2012-2040) are those of this file (CPython 3.11's ElementTree.py)
ETREE_SHA256 = "ff904b02de3a86888001f47f1518204d04d4e790d4ed85352d8544347ae7e940"


def readme_session() -> list[tuple[str, list[str]]]:
    """[(command, expected output lines)] of the console block that runs `longmem generate --memory etree`."""
    blocks = re.findall(r"```console\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    block = next(b for b in blocks if "--memory etree" in b)
    steps = []
    for line in block.splitlines():
        if line.startswith("$ "):
            steps.append((line[2:], []))
        else:
            steps[-1][1].append(line)
    return steps


@pytest.mark.skipif(hashlib.sha256(Path(xml.etree.ElementTree.__file__).read_bytes()).hexdigest() != ETREE_SHA256,
                    reason="the README's example names lines of CPython 3.11's xml/etree/ElementTree.py; this Python has another")
def test_the_readme_recall_example_prints_what_the_readme_shows(tmp_path):
    steps = readme_session()
    assert sum(cmd.startswith("longmem ") for cmd, _ in steps) == 3
    (tmp_path / ".venv" / "bin").mkdir(parents=True)
    (tmp_path / ".venv" / "bin" / "python").symlink_to(sys.executable)  # the README runs from the repository root
    (tmp_path / "models").symlink_to(ROOT / "models")
    home = tmp_path / "home"
    env = {**os.environ, "LONGMEM_HOME": str(home), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    script = "set -e\n"
    for i, (cmd, _) in enumerate(steps):
        script += f"{{ {cmd} ; }} > out{i}.txt\n"
    r = subprocess.run(["bash", "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    for i, (cmd, expected) in enumerate(steps):
        got = (tmp_path / f"out{i}.txt").read_text().replace(str(home), "~/.local/share/longmem").splitlines()
        assert got == expected, f"`{cmd}` printed {got}, the README shows {expected}"
    # what the example claims: the name is in the memory's text, not in the prompt
    name = "_raise_serialization_error"
    assert name in (tmp_path / "etree-first-half.py").read_text()
    assert name not in (tmp_path / "prompt.py").read_text()


def test_the_readme_library_example_runs_and_incremental_decoding_matches(tmp_path, monkeypatch):
    """The README's python block, on longmem-tiny (it loads the default; the suite names the small model):
    write_memory, a scored window, then the same window decoded incrementally with a cache must give the same last
    logits."""
    import torch

    block = next(b for b in re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
                 if "load_model_and_tokenizer" in b)
    assert block.count("load_model_and_tokenizer()") == 1
    block = block.replace("load_model_and_tokenizer()", 'load_model_and_tokenizer("longmem-tiny")')
    (tmp_path / "book.txt").write_text(Path(xml.etree.ElementTree.__file__).read_text()[:12000])
    monkeypatch.chdir(tmp_path)
    env: dict = {}
    exec(compile(block, "README.md", "exec"), env)
    assert env["T"] == 256 and env["ids"].shape[1] > env["T"] and torch.isfinite(env["out"].loss)
    torch.testing.assert_close(env["step"].logits[:, -1], env["out"].logits[:, -1], rtol=1e-4, atol=1e-4)
