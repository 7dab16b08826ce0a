"""Files from another version of longmem: memories and checkpoints carry a format version; loading one
this library does not read is refused with one line that names both versions and the way out."""

import json
import shutil

import pytest
import torch

from longmem import LongMem, LongMemError
from longmem.cli import main
from longmem.memory import FORMAT_VERSION, MemoryBank
from longmem.io import CHECKPOINT_VERSION, CONFIG_FILE
from longmem.loading import load_model
from longmem.store import MemoryStore


def rewrite_memory_version(path, version):
    """Re-save a memory file with another version in its header; tensors (and so the checksum) unchanged."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), framework="pt") as f:
        header = json.loads(f.metadata()["longmem"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    header["version"] = version
    save_file(tensors, str(path), metadata={"longmem": json.dumps(header)})


def small_bank(tmp_path):
    bank = MemoryBank(1, num_heads=2, head_dim=4, chunk_size=2, memory_size=16)
    bank.add(torch.randn(1, 2, 5, 4), torch.randn(1, 2, 5, 4))
    path = tmp_path / "m.safetensors"
    bank.save(path)
    MemoryBank.load(path)  # the untouched file loads
    return path


@pytest.mark.parametrize("version", [FORMAT_VERSION + 1, 99])
def test_a_memory_from_a_newer_longmem_says_upgrade(tmp_path, version):
    path = small_bank(tmp_path)
    rewrite_memory_version(path, version)
    with pytest.raises(LongMemError) as e:
        MemoryBank.load(path)
    msg = str(e.value)
    assert f"memory format version {version!r}" in msg and f"reads version {FORMAT_VERSION}" in msg
    assert "upgrade longmem" in msg and "\n" not in msg


@pytest.mark.parametrize("version", [FORMAT_VERSION - 1, None, "1"])
def test_a_memory_from_an_older_longmem_says_rebuild(tmp_path, version):
    path = small_bank(tmp_path)
    rewrite_memory_version(path, version)
    with pytest.raises(LongMemError) as e:
        MemoryBank.load(path)
    msg = str(e.value)
    assert f"memory format version {version!r}" in msg and f"reads version {FORMAT_VERSION}" in msg
    assert "`longmem memory add" in msg and "upgrade" not in msg and "\n" not in msg


def test_memory_add_onto_an_old_memory_is_one_line_and_changes_nothing(tiny_checkpoint, tiny_assets, tmp_path, capsys):
    home = tmp_path / "home"
    book = sorted(tiny_assets["train"].iterdir())[0]
    args = ["memory", "add", "m", str(book), "--model", str(tiny_checkpoint), "--no-progress", "--home", str(home)]
    assert main(args) == 0
    path = MemoryStore(home).path("m")
    rewrite_memory_version(path, FORMAT_VERSION + 1)
    before = path.read_bytes()
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert f"memory format version {FORMAT_VERSION + 1}" in err and "upgrade longmem" in err
    assert "\n" not in err and "Traceback" not in err
    assert path.read_bytes() == before


def edit_checkpoint(src, dst, **changes):
    shutil.copytree(src, dst)
    meta = json.loads((dst / CONFIG_FILE).read_text())
    for k, v in changes.items():
        if v is None:
            meta.pop(k, None)
        else:
            meta[k] = v
    (dst / CONFIG_FILE).write_text(json.dumps(meta))
    return dst


@pytest.mark.parametrize("version, fix", [(CHECKPOINT_VERSION + 1, "upgrade longmem"), (CHECKPOINT_VERSION - 1, "retrain"),
                                          (None, "retrain")])
def test_a_checkpoint_of_another_version_names_both_versions(tiny_checkpoint, tmp_path, version, fix):
    ckpt = edit_checkpoint(tiny_checkpoint, tmp_path / "ckpt", version=version)
    for load in (LongMem.from_pretrained, load_model):
        with pytest.raises(LongMemError) as e:
            load(ckpt)
        msg = str(e.value)
        assert f"checkpoint format version {version!r}" in msg and f"reads version {CHECKPOINT_VERSION}" in msg
        assert fix in msg and "\n" not in msg


def test_a_json_that_is_not_a_checkpoint_says_so(tiny_checkpoint, tmp_path):
    ckpt = edit_checkpoint(tiny_checkpoint, tmp_path / "ckpt", format="something-else")
    with pytest.raises(LongMemError, match="is not a LongMem checkpoint"):
        LongMem.from_pretrained(ckpt)


def test_the_cli_reports_a_newer_checkpoint_in_one_line(tiny_checkpoint, tmp_path, capsys):
    ckpt = edit_checkpoint(tiny_checkpoint, tmp_path / "ckpt", version=CHECKPOINT_VERSION + 1)
    assert main(["generate", "--model", str(ckpt), "--prompt", "alpha", "--max-new-tokens", "2",
                 "--home", str(tmp_path / "home")]) == 2
    err = capsys.readouterr().err.strip()
    assert "upgrade longmem" in err and f"checkpoint format version {CHECKPOINT_VERSION + 1}" in err
    assert "\n" not in err and "Traceback" not in err
