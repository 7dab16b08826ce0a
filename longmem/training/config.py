"""The settings of one ``longmem train`` run, in groups: the model (``LongMemConfig``'s own fields, declared there
once), the corpus, the optimisation, the schedule and the scale (how processes share the work).

A run's settings are written to OUT/train_config.json in their flat form (``TrainConfig.to_dict``), one key per
command-line flag, as every run has written them; ``TrainConfig.from_dict`` reads that form back, the files of
older runs included, and builds the config of the command line.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from longmem.config import LongMemConfig
from longmem.errors import LongMemError
from longmem.loading import TINY_MODEL
from longmem.training.scale import STRATEGIES

# The LongMemConfig fields that --init-from's saved model takes from the command line (when given) on top of its own
# settings; its sizes (memory, chunk, top-k, memory layer, segment length) are always its own.
RETRIEVAL_FIELDS = ("retrieval_metric", "retrieval_query", "retrieval_next")
# The LongMemConfig fields that `longmem train` has flags for: train_config.json always holds them (the retrieval
# ones as null when not given: --init-from's model then keeps its own).
TRAIN_MODEL_FIELDS = ("memory_size", "chunk_size", "topk_chunks", "memory_layer", "segment_length") + RETRIEVAL_FIELDS


@dataclass
class CorpusConfig:
    """What the run reads, and how many documents at a time."""

    data: list = field(default_factory=list)  # training documents (files, folders, .jsonl, hf:NAME)
    val_data: list = field(default_factory=list)  # validation documents (periodic loss with/without memory)
    batch_size: int = 8  # rows (document streams) per process
    eval_docs: int = 4  # validation documents per evaluation
    eval_segments: int = 8  # segments read per validation document (the first ones)


@dataclass
class OptimConfig:
    """AdamW with a linear warmup, then linear decay to 0 at the last step (``training.step``)."""

    lr: float = 2e-4  # paper: 2e-4, linear decay to 0
    betas: tuple = (0.9, 0.98)  # paper: Adam(0.9, 0.98, eps 1e-6), weight decay 0.01
    eps: float = 1e-6
    weight_decay: float = 0.01  # on matrices only (not on the gate, norms, biases)
    warmup_steps: int = 0
    grad_clip: float = 1.0
    grad_accum: int = 1  # micro-batches per step
    precision: str = "auto"  # auto | bf16 | fp16 | fp32 (autocast; weights stay fp32)

    def __post_init__(self):
        if self.precision not in ("auto", "bf16", "fp16", "fp32"):
            raise LongMemError(f"precision must be auto, bf16, fp16 or fp32, got {self.precision!r}")
        self.betas = tuple(self.betas)


@dataclass
class ScheduleConfig:
    """When the loop stops, validates, checkpoints and measures."""

    max_steps: int = 1000
    max_minutes: float | None = None  # stop cleanly (and checkpoint) after this wall time
    eval_every: int = 100
    save_every: int = 100
    staleness_every: int = 0  # measure stored-vs-fresh key similarity every N steps (0: never)


@dataclass
class ScaleConfig:
    """How the SideNet is spread over processes and memory (``training.scale``)."""

    strategy: str = "ddp"  # ddp (replicate) | fsdp (FSDP2: shard the SideNet's parameters, gradients, optimizer state)
    shard_backbone: bool = False  # fsdp: shard the frozen backbone too (default: replicated)
    grad_checkpointing: bool = False  # recompute SideNet block activations in the backward pass
    lora_rank: int | None = None  # LoRA adapters of this rank on the SideNet blocks' linear layers (None: train them fully)
    lora_alpha: float | None = None  # LoRA scale numerator (default 2 * rank: scaling 2)
    dtype: str = "fp32"  # the frozen backbone's weights: fp32 | bf16 (the SideNet stays fp32 under autocast)

    def __post_init__(self):
        if self.strategy not in STRATEGIES:
            raise LongMemError(f"--strategy must be one of {', '.join(STRATEGIES)}, got {self.strategy!r}")
        if self.lora_rank is not None and self.lora_rank < 1:
            raise LongMemError(f"--lora-rank must be a positive rank, got {self.lora_rank}; leave it out to train the whole SideNet")
        if self.dtype not in ("fp32", "bf16"):
            raise LongMemError(f"--dtype must be fp32 or bf16, got {self.dtype!r}")
        if self.shard_backbone and self.strategy != "fsdp":
            raise LongMemError("--shard-backbone shards with FSDP: add --strategy fsdp")

    @property
    def lora(self) -> dict | None:
        """{"rank", "alpha"} of the LoRA adapters, or None (the SideNet trains fully)."""
        if self.lora_rank is None:
            return None
        return {"rank": self.lora_rank, "alpha": self.lora_alpha if self.lora_alpha is not None else 2.0 * self.lora_rank}


GROUPS = {"corpus": CorpusConfig, "optim": OptimConfig, "schedule": ScheduleConfig, "scale": ScaleConfig}


@dataclass
class TrainConfig:
    backbone: str = str(TINY_MODEL / "backbone")
    tokenizer: str | None = None  # default: the backbone's folder
    out: str = "runs/longmem"
    method: str = "longmem"  # longmem | memtrm (coupled memory, backbone trains) | finetune (no memory)
    train_layers: str = "all"  # baselines: train all backbone blocks or the upper half
    init_from: str | None = None  # longmem: start the SideNet (and memory settings) from this saved LongMem model
    seed: int = 0
    progress: bool = True
    # LongMemConfig fields given (--memory-size ...): a fresh model takes them, and LongMemConfig's defaults for the
    # rest; a model --init-from a saved one keeps the saved settings but for the RETRIEVAL_FIELDS given
    model: dict = field(default_factory=dict)
    corpus: CorpusConfig = field(default_factory=CorpusConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    scale: ScaleConfig = field(default_factory=ScaleConfig)

    def __post_init__(self):
        if self.schedule.max_steps < 1 or self.corpus.batch_size < 1 or self.optim.grad_accum < 1:
            raise LongMemError(f"max_steps, batch_size and grad_accum must be positive (got {self.schedule.max_steps}, "
                               f"{self.corpus.batch_size}, {self.optim.grad_accum})")
        if not self.corpus.data:
            raise LongMemError("no training data: pass --data FILE|DIR|JSONL (see `longmem data`)")
        unknown = set(self.model) - {f.name for f in dataclasses.fields(LongMemConfig)}
        if unknown:
            raise LongMemError(f"unknown LongMem config fields {sorted(unknown)}")
        if self.init_from is not None and self.method != "longmem":
            raise LongMemError("--init-from starts a LongMem SideNet; it cannot be combined with --method " + self.method)
        if self.model.get("retrieval_next") and self.method != "longmem":
            raise LongMemError(f"--retrieval-next is a LongMem SideNet option; --method {self.method} does not use it")
        if self.model.get("retrieval_query") not in (None, "query") and self.method != "longmem":
            raise LongMemError(f"--retrieval-query {self.model['retrieval_query']} is a LongMem SideNet option; "
                               f"--method {self.method} searches with its query")
        if self.method not in ("longmem", "memtrm", "finetune"):
            raise LongMemError(f"method must be longmem, memtrm or finetune, got {self.method!r}")
        scale = self.scale
        scale_flags = [flag for flag, on in (("--strategy fsdp", scale.strategy == "fsdp"), ("--lora-rank", scale.lora_rank),
                                             ("--grad-checkpointing", scale.grad_checkpointing), ("--dtype bf16", scale.dtype == "bf16"))
                       if on]
        if scale_flags and self.method != "longmem":
            raise LongMemError(f"{scale_flags[0]} scales the LongMem SideNet; --method {self.method} trains the backbone (use --strategy ddp, no LoRA)")
        if scale.dtype == "bf16" and self.optim.precision == "fp32":
            raise LongMemError("--dtype bf16 runs the fp32 SideNet on a bf16 backbone under autocast; use --precision bf16 (or auto)")
        if scale.shard_backbone and self.schedule.staleness_every:
            raise LongMemError("--staleness-every reads the backbone on one process, which --shard-backbone does not allow; drop one of them")
        if self.init_from is None:
            self.model_config()  # a fresh model's settings are checked now, before any data is read

    def model_config(self) -> LongMemConfig:
        """The settings of a fresh model (the baselines' too): those given, LongMemConfig's defaults for the rest."""
        return LongMemConfig(**self.model)

    def retrieval_overrides(self) -> dict:
        """The retrieval settings given, which --init-from's saved model takes over its own."""
        return {k: v for k, v in self.model.items() if k in RETRIEVAL_FIELDS}

    # -- the flat form: one key per flag ----------------------------------------------------------------

    @classmethod
    def keys(cls) -> set[str]:
        """The keys of the flat form (``to_dict``, ``from_dict``): the command line's flags."""
        top = {f.name for f in dataclasses.fields(cls) if f.name not in ("model", *GROUPS)}
        return top | set(TRAIN_MODEL_FIELDS) | {f.name for group in GROUPS.values() for f in dataclasses.fields(group)}

    def to_dict(self) -> dict:
        """The flat form written to OUT/train_config.json: every setting by its flag's name; the model's as given,
        else LongMemConfig's default (the retrieval settings: None, so that --init-from's model keeps its own)."""
        defaults = LongMemConfig()
        flat = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in ("model", *GROUPS)}
        for name in TRAIN_MODEL_FIELDS:
            flat[name] = self.model.get(name, None if name in RETRIEVAL_FIELDS else getattr(defaults, name))
        flat.update({k: v for k, v in self.model.items() if k not in flat})  # fields no flag sets (API callers)
        for name in GROUPS:
            flat.update(dataclasses.asdict(getattr(self, name)))
        return flat

    @classmethod
    def from_dict(cls, flat: dict) -> "TrainConfig":
        """The config of a flat dict (``to_dict``'s form: train_config.json of this and older runs, or the command
        line's flags). A None value is a setting not given: its default applies."""
        owner = {f.name: name for name, group in GROUPS.items() for f in dataclasses.fields(group)}
        model_fields = {f.name for f in dataclasses.fields(LongMemConfig)}
        top = {f.name for f in dataclasses.fields(cls) if f.name not in ("model", *GROUPS)}
        kwargs, model, groups = {}, {}, {name: {} for name in GROUPS}
        for key, value in flat.items():
            if value is None:
                continue
            if key in owner:
                groups[owner[key]][key] = value
            elif key in model_fields:
                model[key] = value
            elif key in top:
                kwargs[key] = value
            else:
                raise LongMemError(f"unknown training setting {key!r}; is this file from a newer longmem?")
        return cls(**kwargs, model=model, **{name: GROUPS[name](**groups[name]) for name in GROUPS})
