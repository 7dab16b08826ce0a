"""The package's layers, read from its imports: no cycles, command-line code only in longmem/cli/,
transformers internals only in the backbone adapter, every longmem import at the top of its module,
no layer importing one above it (cli -> serve -> tasks -> model core -> io), training and the evaluations
sharing only what lies below both, one tokenize function, and every module reached by some test."""

import ast
import threading
from pathlib import Path

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from longmem.config import LongMemConfig
from longmem.model import LongMem

PKG = Path(__file__).resolve().parent.parent / "longmem"
TASKS = ("longmem.data", "longmem.training", "longmem.eval", "longmem.store", "longmem.stream_loss", "longmem.staleness")
CORE = ("longmem.attention", "longmem.backbone", "longmem.baselines", "longmem.cache", "longmem.generation",
        "longmem.gguf", "longmem.loading", "longmem.memory", "longmem.model", "longmem.sidenet")
BASE = ("longmem.config", "longmem.dtypes", "longmem.errors", "longmem.io", "longmem.malloc", "longmem.plots", "longmem.tokens")


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


INDEPENDENT = (("longmem.training", "longmem.eval"), ("longmem.eval", "longmem.training"), ("longmem.data", "longmem.training"),
               ("longmem.data", "longmem.eval"))  # tasks that share a layer but never import one another


@pytest.mark.parametrize("name", sorted(MODULES))
def test_training_and_evaluation_share_only_what_lies_below_both(name):
    """Training validates, measures staleness and plots with the pieces below both (``longmem.stream_loss``,
    ``longmem.staleness``, ``longmem.plots``), never by importing the evaluations; nor the other way round."""
    inside = lambda module, pkg: module == pkg or module.startswith(pkg + ".")  # noqa: E731
    for target, line, _ in OURS[name]:
        for importer, imported in INDEPENDENT:
            assert not (inside(name, importer) and inside(target, imported)), f"{name}:{line} imports {target}"


BY_NAME = {"longmem.cli.eval": "longmem.eval.harness", "longmem.cli.serve": "longmem.serve.app"}  # importlib, above


def imported_modules(tree: ast.Module) -> set[str]:
    """Every module an import statement names, ``from pkg import sub`` naming ``pkg.sub`` too, and every module
    named as a string (run with ``python -m``: its ``__main__``)."""
    out = {target for target, _, _ in imports(tree)}
    out |= {f"{n.module}.{a.name}" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module for a in n.names}
    out |= {f"{n.value}.__main__" for n in ast.walk(tree) if isinstance(n, ast.Constant) and n.value in MODULES}
    return out


def test_every_module_is_reached_by_the_tests():
    """tests/ is organised by behaviour, not one file per module (README, "Tests"); the floor it keeps: every module
    is imported by a test file, directly or through the modules it imports, or run by one (``python -m longmem.cli``)."""
    graph = {name: imported_modules(tree) | ({BY_NAME[name]} if name in BY_NAME else set()) for name, tree in MODULES.items()}
    todo = [m for path in (PKG.parent / "tests").glob("*.py") for m in imported_modules(ast.parse(path.read_text()))]
    reached = set()
    while todo:
        name = todo.pop()
        if name in MODULES and name not in reached:
            reached.add(name)
            todo += list(graph[name]) + [".".join(name.split(".")[:i]) for i in range(1, name.count(".") + 1)]  # its parents run first
    assert not sorted(set(MODULES) - reached), f"no test imports or runs {sorted(set(MODULES) - reached)}"


TOKENIZE = "longmem.tokens"  # the one module that runs a tokenizer on text


@pytest.mark.parametrize("name", sorted(MODULES))
def test_one_tokenize_function(name):
    """Text becomes token ids through ``longmem.tokens`` only: no other module reaches the tokenizer's backend."""
    if name != TOKENIZE:
        lines = [n.lineno for n in ast.walk(MODULES[name]) if isinstance(n, ast.Attribute) and n.attr == "backend_tokenizer"]
        assert not lines, f"{name}: tokenizes inline at line(s) {lines}; use longmem.tokens"


# --------------------------------------------------------------------------- one protocol, one decode loop

DECODER = "longmem.generation"  # the one module that decodes token by token
PROTOCOL = "longmem.model"  # the model protocol (MemoryLM) and LongMem
PICKS = {"sample_next", "argmax", "multinomial", "topk"}  # ways to choose tokens from logits
SINKS = {"feed", "feed_all", "forward", "generate", "window_logits", "backbone_logits", "score_continuations"}


def _name(func: ast.expr) -> str:
    return func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""


def _model_call(call: ast.Call) -> bool:
    """A call that runs a model: a forward-like method, or a call of something named model/net."""
    name = _name(call.func)
    return name in SINKS or "model" in name.lower() or name == "net"


def _scope(node: ast.AST):
    """The nodes of a loop body, not descending into functions or classes defined in it."""
    for child in ast.iter_child_nodes(node):
        if not isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.ClassDef)):
            yield child
            yield from _scope(child)


def _stored(target: ast.expr):
    """The names an assignment target stores into: ``x``, ``a, b``; ``x[i]`` and ``x.f`` store into ``x``, not ``i``."""
    if isinstance(target, (ast.Tuple, ast.List)):
        for t in target.elts:
            yield from _stored(t)
    elif isinstance(target, ast.Starred):
        yield from _stored(target.value)
    else:
        while isinstance(target, (ast.Subscript, ast.Attribute)):
            target = target.value
        if isinstance(target, ast.Name):
            yield target.id


def decode_loops(tree: ast.Module) -> list[int]:
    """Lines of loops that feed a token chosen from logits back into a model (a token-by-token decode loop).

    Within one loop body, a name is tainted when it is assigned (or appended) from an expression that picks
    tokens (``PICKS``) or mentions a tainted name; the loop decodes when a tainted name reaches a model call."""
    found = []
    for loop in ast.walk(tree):
        if not isinstance(loop, (ast.For, ast.While)):
            continue
        body = list(_scope(loop))
        tainted: set[str] = set()

        def dirty(expr) -> bool:
            return any(isinstance(n, ast.Call) and _name(n.func) in PICKS for n in ast.walk(expr)) or \
                any(isinstance(n, ast.Name) and n.id in tainted for n in ast.walk(expr))

        for _ in range(len(body)):  # to a fixed point: taint flows through any chain of assignments
            before = len(tainted)
            for node in body:
                if isinstance(node, (ast.Assign, ast.AugAssign, ast.AnnAssign)) and node.value is not None and dirty(node.value):
                    targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                    tainted |= {n for t in targets for n in _stored(t)}
                elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and isinstance(node.func.value, ast.Name) \
                        and node.func.attr in ("append", "extend", "insert") and any(dirty(a) for a in node.args):
                    tainted.add(node.func.value.id)
            if len(tainted) == before:
                break
        for node in body:
            if isinstance(node, ast.Call) and _model_call(node) and any(dirty(a) for a in [*node.args, *(k.value for k in node.keywords)]):
                found.append(loop.lineno)
                break
    return found


OLD_RECOMPUTE = '''
def generate(self, ids, memory, cfg):
    new = []
    for _ in range(cfg.max_new_tokens):
        logits = window_logits(self.model, mode, ids[:, -T:], memory)[:, -1].float()
        token = int(sample_next(logits, cfg)[0])
        new.append(token)
        ids = torch.cat([ids, torch.tensor([[token]], device=ids.device)], dim=1)
    return new
'''
OLD_CHAT = '''
while True:
    logits = dec.feed(prompt)
    for _ in range(cfg.max_new_tokens):
        t = logits.argmax(-1)
        reply.append(int(t[0]))
        logits = dec.feed(t.view(1, 1), check=False)
'''
TEACHER_FORCED = '''
for start in range(0, n, T):
    logits = self.model(x, memory=memory).logits
    greedy &= bool((logits.argmax(-1) == y).all())
'''


def test_the_decode_loop_check_finds_decode_loops_and_only_them():
    assert decode_loops(ast.parse(OLD_RECOMPUTE)) and decode_loops(ast.parse(OLD_CHAT))
    assert not decode_loops(ast.parse(TEACHER_FORCED))  # scoring a given text picks nothing to feed back


@pytest.mark.parametrize("name", sorted(MODULES))
def test_one_decode_loop(name):
    """Every caller (CLI, harness, evaluations, server) decodes through ``generation.Decoder`` / ``generate_stream``."""
    if name != DECODER:
        assert not decode_loops(MODULES[name]), f"{name}: a token-by-token loop at line(s) {decode_loops(MODULES[name])}; decode with longmem.generation"


def model_classes() -> set[str]:
    return {n.name for mod in (PROTOCOL, "longmem.baselines") for n in ast.walk(MODULES[mod]) if isinstance(n, ast.ClassDef)}


@pytest.mark.parametrize("name", sorted(MODULES))
def test_callers_ask_the_protocol_not_the_class(name):
    """No ``isinstance`` / ``issubclass`` on a model class, nor ``hasattr(model, ...)``, outside the protocol's module."""
    if name == PROTOCOL:
        return
    classes = model_classes()
    for node in ast.walk(MODULES[name]):
        if isinstance(node, ast.Call) and _name(node.func) in ("isinstance", "issubclass") and len(node.args) == 2:
            named = {_name(n) for n in ast.walk(node.args[1]) if isinstance(n, (ast.Name, ast.Attribute))}
            assert not named & classes, f"{name}:{node.lineno} asks a model's class ({', '.join(named & classes)}); use the protocol (longmem.model.MemoryLM)"
        if isinstance(node, ast.Call) and _name(node.func) in ("hasattr", "getattr") and len(node.args) >= 2 \
                and isinstance(node.args[1], ast.Constant) and node.args[1].value in ("sidenet", "gate", "_reference"):
            raise AssertionError(f"{name}:{node.lineno} asks whether a model has {node.args[1].value!r}; use the protocol")


def test_no_hooks_or_state_left_on_the_callers_model():
    """The backbone adapter's hooks live for one pass: after building LongMem and running it (a forward, a memory
    write, a cached decoding step), the caller's HF model carries no hook; called directly it is the HF model."""
    torch.manual_seed(0)
    hf = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=64, n_embd=32, n_layer=4, n_head=4,
                                    bos_token_id=0, eos_token_id=0)).eval()
    ids = torch.randint(0, 64, (1, 12))
    with torch.no_grad():
        before = hf(ids).logits

    def hooks():
        return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in hf.modules())

    assert hooks() == 0
    model = LongMem.from_backbone(hf, LongMemConfig(chunk_size=2, memory_size=32, topk_chunks=2, segment_length=16))
    memory = model.new_memory(1)
    with torch.no_grad():
        model(ids, memory=memory)
        model.write_memory(ids, memory)
        cache = model.new_cache()
        model(ids[:, :6], memory=memory, cache=cache, update_memory=False)
        model(ids[:, 6:7], memory=memory, cache=cache, update_memory=False)
        after = hf(ids).logits
    assert hooks() == 0
    torch.testing.assert_close(after, before)


def test_passes_in_two_threads_at_once_stay_apart():
    """The server runs requests side by side on one model: each pass's hooks serve only its own thread."""
    torch.manual_seed(0)
    hf = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=64, n_embd=32, n_layer=4, n_head=4,
                                    bos_token_id=0, eos_token_id=0)).eval()
    model = LongMem.from_backbone(hf, LongMemConfig(chunk_size=2, memory_size=32, topk_chunks=2, segment_length=16))
    inputs = [torch.randint(0, 64, (1, 16)) for _ in range(2)]
    with torch.no_grad():
        alone = [model(ids).logits for ids in inputs]
    together, errors = [[] for _ in inputs], []

    def run(i):
        try:
            with torch.no_grad():
                for _ in range(20):
                    together[i].append(model(inputs[i]).logits)
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for i in range(2):
        for logits in together[i]:
            torch.testing.assert_close(logits, alone[i])
