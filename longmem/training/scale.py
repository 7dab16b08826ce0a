"""Scaling the SideNet's training with what PyTorch (and peft) ship: DDP or FSDP2, low-rank adapters.

- ``ddp``: every process holds the whole model; DistributedDataParallel averages the SideNet's gradients.
- ``fsdp``: FSDP2 (``torch.distributed.fsdp.fully_shard``) shards the SideNet's parameters, gradients
  and optimizer state across processes. The unit of sharding is every module that directly owns
  parameters (the linear layers and norms of each SideNet block, the final norm): the backbone adapter
  runs a block through its submodules, never through the block's own ``forward``, so these are the
  modules whose calls FSDP sees. The model is the root unit (it holds the gate). The frozen backbone is
  replicated unless ``shard_backbone``.
- LoRA (``add_lora``): peft's low-rank adapters on the linear layers of the SideNet blocks; the gate and
  all norms still train fully. Saved models hold the merged weights (W + scale * B A), so
  ``LongMem.from_pretrained`` loads them as any other.

Checkpoint state that depends on the layout (sharded tensors, optimizer slots) is saved in full and
keyed by parameter name, so a run resumes under either strategy.

torch.distributed's FSDP, DTensor and checkpoint modules are imported where they are used: they take
seconds to import, and every ``longmem`` command would pay for them otherwise.
"""

from __future__ import annotations

import os
import warnings

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from longmem.errors import LongMemError


def linear_layer_names(module: nn.Module) -> list[str]:
    """Names of the linear projections inside ``module``: ``nn.Linear``, and GPT-2's ``Conv1D`` (a linear
    layer that stores its weight as (in, out)); LoRA wraps them."""
    return [name for name, m in module.named_modules() if isinstance(m, (nn.Linear, Conv1D))]


STRATEGIES = ("ddp", "fsdp")
OPTIMIZER_FORMAT = "full-by-name"  # trainer.pt "optimizer_format": the optimizer state keyed by parameter name


def init_distributed() -> tuple[int, int, torch.device]:
    """(rank, world_size, device); initialises the process group under torchrun (gloo on CPU, nccl on GPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world, device


# -- FSDP ------------------------------------------------------------------------------------------


def shard(model: nn.Module, device: torch.device, shard_backbone: bool = False) -> nn.Module:
    """Apply FSDP2 to a LongMem model in place (every process, same call); returns it.

    Units: each SideNet module that owns parameters directly (and each backbone one with
    ``shard_backbone``; a parameter tied between two modules, like GPT-2's embeddings and LM head, stays
    with the root). The root is ``model``; without ``shard_backbone`` the backbone is left replicated.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (torch.distributed.get_world_size(),))
    parts = [model.trainable_module] + ([model.backbone.model] if shard_backbone else [])
    owners = {}
    for part in parts:
        for module in part.modules():
            for p in module.parameters(recurse=False):
                owners.setdefault(p, set()).add(module)
    for part in parts:
        for module in part.modules():
            own = list(module.parameters(recurse=False))
            if own and module is not part and all(owners[p] == {module} for p in own):
                fully_shard(module, mesh=mesh)
    ignored = None if shard_backbone else set(model.backbone.parameters())
    fully_shard(model, mesh=mesh, ignored_params=ignored)
    return model


def full_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """``module.state_dict()`` with sharded tensors gathered, on the CPU. Every process must call it."""
    out = {}
    for k, v in module.state_dict().items():
        v = full_tensor(v)
        out[k] = v.detach().cpu().contiguous()
    return out


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """A sharded tensor (DTensor) gathered whole; any other tensor as it is."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """The optimizer's state in full, keyed by parameter name (layout-free). Every process must call it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Load what ``optimizer_state`` saved, under any strategy and sharding."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(model, optimizer, optim_state_dict=state, options=StateDictOptions(full_state_dict=True))


# -- LoRA ------------------------------------------------------------------------------------------


def add_lora(sidenet: nn.Module, rank: int, alpha: float) -> None:
    """Low-rank adapters (peft) on every linear layer of the SideNet blocks, in place. The adapters, the gate
    and every other parameter that is not a linear layer's (the norms) train; the linear weights and biases
    stay as initialised."""
    try:
        from peft import LoraConfig, inject_adapter_in_model
    except ImportError:
        raise LongMemError("--lora-rank needs peft: pip install 'longmem[lora]' (or pip install peft)") from None
    targets = [name for name in linear_layer_names(sidenet) if name.startswith("blocks.")]
    with warnings.catch_warnings():  # peft notes that GPT-2's Conv1D stores W transposed, and handles it
        warnings.filterwarnings("ignore", message="fan_in_fan_out is set to False")
        inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules=targets), sidenet)
    for name, p in sidenet.named_parameters():
        p.requires_grad_("lora_" in name or ".base_layer." not in name)


def lora_layers(sidenet: nn.Module) -> dict[str, tuple[float, bool]]:
    """{layer name: (scaling, fan_in_fan_out)} of the SideNet's LoRA layers (empty without LoRA)."""
    return {name: (m.scaling["default"], bool(m.fan_in_fan_out)) for name, m in sidenet.named_modules()
            if hasattr(m, "lora_A") and hasattr(m, "base_layer")}


def merge_lora(state: dict[str, torch.Tensor], layers: dict[str, tuple[float, bool]]) -> dict[str, torch.Tensor]:
    """A SideNet state with LoRA adapters turned into the plain one: W + scaling * B A (transposed for GPT-2's
    Conv1D, which stores W as (in, out)), the base layer's names restored (as peft's merge_and_unload)."""
    out = dict(state)
    for name, (scaling, fan_in_fan_out) in layers.items():
        a = out.pop(f"{name}.lora_A.default.weight").float()  # (r, in)
        b = out.pop(f"{name}.lora_B.default.weight").float()  # (out, r)
        delta = (b @ a) * scaling  # (out, in)
        w = out.pop(f"{name}.base_layer.weight")
        out[f"{name}.weight"] = (w.float() + (delta.T if fan_in_fan_out else delta)).to(w.dtype)
        if f"{name}.base_layer.bias" in out:
            out[f"{name}.bias"] = out.pop(f"{name}.base_layer.bias")
    return out
