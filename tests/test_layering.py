"""The package's layers, read from its imports: no cycles, command-line code only in longmem/cli/,
transformers internals only in the backbone adapter, every longmem import at the top of its module, and
no layer importing one above it (cli -> serve -> tasks -> model core -> io)."""

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parent.parent / "longmem"
TASKS = ("longmem.data", "longmem.training", "longmem.eval", "longmem.store")
CORE = ("longmem.attention", "longmem.backbone", "longmem.baselines", "longmem.cache", "longmem.generation",
        "longmem.gguf", "longmem.loading", "longmem.memory", "longmem.model", "longmem.sidenet")
BASE = ("longmem.config", "longmem.errors", "longmem.io")


def layer(module: str) -> int:
    """0 base (io, config, errors), 1 model core, 2 tasks, 3 the server, 4 cli; the package's __init__ re-exports
    the core."""
    for rank, prefixes in ((4, ("longmem.cli",)), (3, ("longmem.serve",)), (2, TASKS), (1, CORE + ("longmem",)), (0, BASE)):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return rank
    raise AssertionError(f"{module} belongs to no layer: add it to tests/test_layering.py")


def modules() -> dict[str, ast.Module]:
    out = {}
    for path in PKG.rglob("*.py"):
        parts = path.relative_to(PKG.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = ast.parse(path.read_text(), filename=str(path))
    return out


def imports(tree: ast.Module):
    """(imported module, line, at module level?) for every import statement; module level includes a
    module-level ``try`` (an optional dependency), never a function or class body."""
    local = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
             for n in ast.walk(f) if n is not f}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from ((a.name, node.lineno, id(node) not in local) for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            yield node.module, node.lineno, id(node) not in local


MODULES = modules()
OURS = {name: [(m, line, at_top) for m, line, at_top in imports(tree) if m == "longmem" or m.startswith("longmem.")]
        for name, tree in MODULES.items()}


@pytest.mark.parametrize("name", sorted(MODULES))
def test_imports_point_down_and_stay_at_the_top(name):
    for target, line, at_top in OURS[name]:
        assert at_top, f"{name}:{line} imports {target} inside a function: move the shared piece down a layer"
        if name != "longmem" and target != "longmem":
            assert layer(target) <= layer(name), f"{name} (layer {layer(name)}) imports {target} (layer {layer(target)})"
        assert target != "longmem" or name.startswith("longmem.cli"), f"{name}:{line} imports the package root"


@pytest.mark.parametrize("name", sorted(MODULES))
def test_argparse_only_in_cli_and_hf_internals_only_in_the_backbone(name):
    for target, line, _ in imports(MODULES[name]):
        if target == "argparse":
            assert name.startswith("longmem.cli"), f"{name}:{line} imports argparse outside longmem/cli/"
        if target.startswith("transformers.models"):
            assert name == "longmem.backbone", f"{name}:{line} imports transformers internals ({target})"


def test_no_import_cycles():
    graph = {name: {t for t, _, _ in OURS[name] if t in MODULES and t != name} for name in MODULES}
    state: dict[str, int] = {}

    def visit(node, path):
        state[node] = 1
        for nxt in graph[node]:
            if state.get(nxt) == 1:
                cycle = path[path.index(nxt):] + [nxt]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for name in graph:
        if name not in state:
            visit(name, [name])


def test_modules_are_imported_by_name_only_where_allowed():
    """``importlib.import_module`` would hide a dependency from the tests above: the uses are the CLI loading
    the optional lm-evaluation-harness model when `longmem eval harness` runs (seconds of imports otherwise paid
    by every command) and the optional server (FastAPI, uvicorn) when `longmem serve` runs."""
    allowed = {("longmem.cli.eval", "importlib"), ("longmem.cli.serve", "importlib")}
    for name, tree in MODULES.items():
        for target, line, _ in imports(tree):
            if target in ("importlib", "__import__"):
                assert (name, target) in allowed, f"{name}:{line} imports modules by name"
    assert layer("longmem.eval.harness") <= layer("longmem.cli.eval")
    assert layer("longmem.serve") <= layer("longmem.cli.serve")
