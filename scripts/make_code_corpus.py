"""A larger Python corpus for pretraining a backbone on a GPU (RECIPE.md, section 7).

Collects the ``.py`` files of at least --min-bytes bytes of the named installed packages (from this interpreter's
site-packages, so the corpus is whatever versions are installed: they are recorded in the manifest), drops exact
duplicates and any file whose text equals a file of the standard library (the code splits of `longmem data` are
stdlib files, so nothing here can leak a held-out file), and writes one document per file as JSONL.

    .venv/bin/python scripts/make_code_corpus.py --out data/pycode/train.jsonl
"""
import argparse
import hashlib
import importlib.metadata
import importlib.util
import json
import sys
import sysconfig
from pathlib import Path

PACKAGES = ("torch", "transformers", "sympy", "numpy", "matplotlib", "networkx", "pip", "setuptools", "jinja2")


def package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        sys.exit(f"package {name} is not installed in this interpreter; install it or leave it out of --packages")
    return Path(list(spec.submodule_search_locations)[0])


def _version(name: str) -> str:
    """The installed distribution's version (module and distribution names differ for a few: _pytest, PIL)."""
    for dist in (name, *importlib.metadata.packages_distributions().get(name, [])):
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return "unknown"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--packages", nargs="+", default=list(PACKAGES))
    p.add_argument("--min-bytes", type=int, default=8192)
    a = p.parse_args()
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    stdlib_hashes = {hashlib.sha1(f.read_bytes()).hexdigest() for f in stdlib.rglob("*.py")
                     if "site-packages" not in f.parts}
    seen: set[str] = set()
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    manifest = {"packages": {}, "min_bytes": a.min_bytes, "python": sys.version.split()[0]}
    n = chars = dropped = 0
    with open(out, "w") as f:
        for name in a.packages:
            root = package_dir(name)
            count = 0
            for path in sorted(root.rglob("*.py")):
                if path.stat().st_size < a.min_bytes:
                    continue
                raw = path.read_bytes()
                h = hashlib.sha1(raw).hexdigest()
                if h in seen or h in stdlib_hashes:
                    dropped += 1
                    continue
                seen.add(h)
                text = raw.decode("utf-8", errors="replace")
                f.write(json.dumps({"id": f"{name}/{path.relative_to(root)}", "text": text}) + "\n")
                n += 1
                count += 1
                chars += len(text)
            manifest["packages"][name] = {"version": _version(name), "files": count}
    manifest.update(documents=n, characters=chars, duplicates_dropped=dropped)
    out.with_name("manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    print(f"{n} files, {chars:,} characters ({dropped} duplicates dropped) -> {out}")


if __name__ == "__main__":
    main()
