"""A larger Python corpus from installed packages, for pretraining a backbone on a GPU (``longmem data pycode``).

Collects the ``.py`` files of at least ``min_bytes`` bytes of the named installed packages (from this interpreter's
site-packages, so the corpus is whatever versions are installed: they are recorded in the manifest), drops exact
duplicates and any file whose text equals a file of the standard library (the code splits of ``longmem data`` are
stdlib files, so nothing here equals a held-out file), and writes one document per file as JSONL, with
``manifest.json`` beside it.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import importlib.util
import json
import sys
import sysconfig
from pathlib import Path

from longmem.errors import LongMemError
from longmem.io import atomic_write

PACKAGES = ("torch", "transformers", "sympy", "numpy", "matplotlib", "networkx", "pip", "setuptools", "jinja2")


def package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise LongMemError(f"package {name} is not installed in this interpreter; install it or leave it out of "
                           "--packages")
    return Path(list(spec.submodule_search_locations)[0])


@functools.cache
def _distributions() -> dict:
    return importlib.metadata.packages_distributions()  # scans every installed distribution: once


def _version(name: str) -> str:
    """The installed distribution's version (module and distribution names differ for a few: _pytest, PIL)."""
    for dist in (name, *_distributions().get(name, [])):
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return "unknown"


def write_package_code(out: Path, packages=PACKAGES, min_bytes: int = 8192, skip_missing: bool = False) -> dict:
    """Write the corpus to ``out`` (JSONL) and ``manifest.json`` beside it; returns the manifest. With
    ``skip_missing``, packages that are not installed are left out (and listed in the manifest) instead of refused."""
    roots, missing = {}, []
    for name in packages:  # every package found before anything is written
        try:
            roots[name] = package_dir(name)
        except LongMemError:
            if not skip_missing:
                raise
            missing.append(name)
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    stdlib_hashes = {hashlib.sha1(f.read_bytes()).hexdigest() for f in stdlib.rglob("*.py")
                     if "site-packages" not in f.parts}
    seen: set[str] = set()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    manifest = {"packages": {}, "missing": missing, "min_bytes": min_bytes, "python": sys.version.split()[0]}
    counts = {"documents": 0, "characters": 0, "duplicates_dropped": 0}

    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            for name, root in roots.items():
                count = 0
                for path in sorted(root.rglob("*.py")):
                    if path.stat().st_size < min_bytes:
                        continue
                    raw = path.read_bytes()
                    h = hashlib.sha1(raw).hexdigest()
                    if h in seen or h in stdlib_hashes:
                        counts["duplicates_dropped"] += 1
                        continue
                    seen.add(h)
                    text = raw.decode("utf-8", errors="replace")
                    f.write(json.dumps({"id": f"{name}/{path.relative_to(root)}", "text": text}) + "\n")
                    counts["documents"] += 1
                    count += 1
                    counts["characters"] += len(text)
                manifest["packages"][name] = {"version": _version(name), "files": count}

    atomic_write(out, write)
    manifest.update(counts)
    atomic_write(out.with_name("manifest.json"), lambda tmp: Path(tmp).write_text(json.dumps(manifest, indent=1) + "\n"))
    return manifest
