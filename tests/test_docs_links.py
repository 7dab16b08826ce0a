"""Every relative link in the repository's markdown resolves: the file exists, and a `#anchor` names a heading
of the target (GitHub's slugs). Web links are not fetched."""

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def markdown_files() -> list[Path]:
    out = subprocess.run(["git", "ls-files", "*.md"], cwd=ROOT, capture_output=True, text=True)
    if out.returncode == 0 and out.stdout.strip():
        return [ROOT / p for p in out.stdout.split()]
    return [p for p in ROOT.rglob("*.md") if ".venv" not in p.parts]  # not a git checkout (an sdist)


def prose(path: Path) -> str:
    """The file without its fenced code blocks (commands there are not links)."""
    return re.sub(r"^```.*?^```", "", path.read_text(), flags=re.S | re.M)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped (but - and _), spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    return {slug(m) for m in re.findall(r"^#+ (.*)$", prose(path), re.M)}


def test_every_relative_markdown_link_resolves():
    broken = []
    for md in markdown_files():
        for target in LINK.findall(prose(md)):
            if re.match(r"[a-z]+:", target):  # http:, https:, mailto:
                continue
            file, _, anchor = target.partition("#")
            dest = (md.parent / file).resolve() if file else md
            if not dest.exists():
                broken.append(f"{md.relative_to(ROOT)}: {target} (no such file)")
            elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
                broken.append(f"{md.relative_to(ROOT)}: {target} (no such heading)")
    assert not broken, "\n".join(broken)


def test_slugs_follow_github():
    assert slug("`longmem demo`") == "longmem-demo"
    assert slug("6. Copy training (CPU)") == "6-copy-training-cpu"
    assert slug("Results of the shipped default `longmem-tiny`") == "results-of-the-shipped-default-longmem-tiny"
