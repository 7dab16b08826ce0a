"""`pip install .` (not editable) gives a working package: the wheel holds every subpackage and the shipped
default model, and the installed `longmem` finds that model from any folder (loading.DEFAULT_MODEL)."""

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
    model = ROOT / "longmem" / "models" / "longmem-tiny"
    shipped = {p.relative_to(ROOT).as_posix() for p in model.rglob("*") if p.is_file() and "history" not in p.parts}
    assert shipped <= names, sorted(shipped - names)
    assert not [n for n in names if "/history/" in n], "the model's lineage (history/) is not package data"
    page = {p.relative_to(ROOT).as_posix() for p in (ROOT / "longmem" / "serve" / "static").iterdir()}
    assert page and page <= names, sorted(page - names)  # `longmem serve`'s chat page ships as package data
    entry = next(n for n in names if n.endswith("entry_points.txt"))
    assert "longmem = longmem.cli:main" in zipfile.ZipFile(wheel).read(entry).decode()
