"""`pip install .` (not editable) gives a working package: the wheel holds every subpackage and the shipped
models (the default's trained part, at most 40 MB, and longmem-tiny), and the installed `longmem` finds that model from any folder (loading.DEFAULT_MODEL)."""

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_the_wheel_holds_every_module_and_the_shipped_default(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp_path)], check=True, capture_output=True)
    (wheel,) = tmp_path.glob("longmem-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    source = {p.relative_to(ROOT).as_posix() for p in (ROOT / "longmem").rglob("*.py")}
    assert source <= names, sorted(source - names)
    for model in (ROOT / "longmem" / "models").iterdir():  # the default (its trained part) and longmem-tiny
        shipped = {p.relative_to(ROOT).as_posix() for p in model.rglob("*") if p.is_file() and "history" not in p.parts}
        assert shipped and shipped <= names, sorted(shipped - names)
    default = [n for n in names if n.startswith("longmem/models/smollm2-135m-longmem/")]
    size = sum(zipfile.ZipFile(wheel).getinfo(n).file_size for n in default)
    assert 0 < size <= 40 * 2**20, f"the default's shipped part is {size / 2**20:.1f} MB (at most 40 MB)"
    assert not [n for n in names if "/history/" in n], "the model's lineage (history/) is not package data"
    page = {p.relative_to(ROOT).as_posix() for p in (ROOT / "longmem" / "serve" / "static").iterdir()}
    assert page and page <= names, sorted(page - names)  # `longmem serve`'s chat page ships as package data
    entry = next(n for n in names if n.endswith("entry_points.txt"))
    assert "longmem = longmem.cli:main" in zipfile.ZipFile(wheel).read(entry).decode()
