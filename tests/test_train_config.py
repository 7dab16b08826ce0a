"""TrainConfig: grouped settings, the model's taken from LongMemConfig, and the flat form that runs write to
OUT/train_config.json (older runs' files included) read back."""

import json
from pathlib import Path

import pytest

from longmem import LongMemConfig, LongMemError
from longmem.training.config import RETRIEVAL_FIELDS, TrainConfig

HISTORY = Path(__file__).resolve().parent.parent / "longmem" / "models" / "longmem-tiny" / "history"

# OUT/train_config.json as the flat TrainConfig (before the grouping) wrote it, for a memtrm run
OLD_FLAT = {
    "backbone": "bb", "data": ["train.jsonl"], "val_data": ["val.jsonl"], "out": "runs/x", "tokenizer": None,
    "max_steps": 50, "max_minutes": 3.5, "batch_size": 4, "grad_accum": 2, "segment_length": 64, "memory_size": 1024,
    "chunk_size": 2, "topk_chunks": 8, "memory_layer": 3, "lr": 0.001, "betas": [0.9, 0.95], "eps": 1e-08,
    "weight_decay": 0.0, "warmup_steps": 5, "grad_clip": 0.5, "precision": "fp32", "eval_every": 10, "eval_docs": 2,
    "eval_segments": 3, "save_every": 25, "seed": 7, "progress": False, "method": "memtrm", "train_layers": "upper",
    "staleness_every": 5, "retrieval_metric": "cosine", "retrieval_query": None, "retrieval_next": None,
    "init_from": None, "strategy": "ddp", "shard_backbone": False, "grad_checkpointing": False, "lora_rank": None,
    "lora_alpha": None, "dtype": "fp32",
}


def test_an_old_flat_config_loads_into_its_groups():
    cfg = TrainConfig.from_dict(OLD_FLAT)
    assert (cfg.method, cfg.train_layers, cfg.seed, cfg.progress) == ("memtrm", "upper", 7, False)
    assert cfg.corpus.data == ["train.jsonl"] and (cfg.corpus.batch_size, cfg.corpus.eval_segments) == (4, 3)
    assert (cfg.optim.lr, cfg.optim.betas, cfg.optim.grad_accum, cfg.optim.precision) == (0.001, (0.9, 0.95), 2, "fp32")
    assert (cfg.schedule.max_steps, cfg.schedule.max_minutes, cfg.schedule.staleness_every) == (50, 3.5, 5)
    assert cfg.model_config() == LongMemConfig(memory_size=1024, chunk_size=2, topk_chunks=8, memory_layer=3,
                                               segment_length=64, retrieval_metric="cosine")
    assert json.loads(json.dumps(cfg.to_dict())) == OLD_FLAT  # and is written back as it was


@pytest.mark.parametrize("path", sorted(HISTORY.glob("*/train_config.json")), ids=lambda p: p.parent.name)
def test_the_shipped_models_train_configs_load(path):
    """The files of the runs that made the shipped model (older than some of today's flags) load and keep every
    value; the flags they predate take their defaults."""
    old = json.loads(path.read_text())
    flat = json.loads(json.dumps(TrainConfig.from_dict(old).to_dict()))
    assert {k: flat[k] for k in old} == old
    assert set(flat) == TrainConfig.keys()
    assert TrainConfig.from_dict(flat).to_dict() == TrainConfig.from_dict(old).to_dict()


def test_retrieval_settings_not_given_are_left_to_the_init_from_model():
    cfg = TrainConfig.from_dict({"data": ["x"], "init_from": "saved"})
    assert cfg.retrieval_overrides() == {} and all(cfg.to_dict()[k] is None for k in RETRIEVAL_FIELDS)
    off = TrainConfig.from_dict({"data": ["x"], "init_from": "saved", "retrieval_next": False, "memory_size": 64})
    assert off.retrieval_overrides() == {"retrieval_next": False}  # --no-retrieval-next turns an inherited one off
    assert off.to_dict()["retrieval_next"] is False
    fresh = TrainConfig.from_dict({"data": ["x"]})
    assert fresh.model_config() == LongMemConfig() and fresh.to_dict()["memory_size"] == LongMemConfig().memory_size


def test_bad_settings_are_one_line_errors():
    with pytest.raises(LongMemError, match="memory_size must be a positive integer, got 0"):
        TrainConfig.from_dict({"data": ["x"], "memory_size": 0})
    with pytest.raises(LongMemError, match="unknown training setting 'learning_rate'"):
        TrainConfig.from_dict({"data": ["x"], "learning_rate": 1.0})
    with pytest.raises(LongMemError, match="--retrieval-next is a LongMem SideNet option"):
        TrainConfig.from_dict({"data": ["x"], "method": "finetune", "retrieval_next": True})
    with pytest.raises(LongMemError, match="must be positive"):
        TrainConfig.from_dict({"data": ["x"], "grad_accum": 0})
    with pytest.raises(LongMemError, match="--shard-backbone shards with FSDP"):
        TrainConfig.from_dict({"data": ["x"], "shard_backbone": True})
