"""Can a causal LM copy from its own context? (an induction head, no memory involved)

Recall from memory needs a backbone that can copy at all: at a repeated token it must find where that token was seen
and read what followed. :func:`copy_in_context` measures it: for random passages of ``passage`` tokens of the given
texts, the window holds 100 tokens of lead, the passage, ``gap`` other tokens, then the passage again; reported is the
mean next-token loss on the first and on the second occurrence. A model that copies predicts the repeat almost
perfectly (loss well under 1 nat); one that does not barely improves on it.
"""

from __future__ import annotations

import random

import torch

from longmem.tokens import token_ids


@torch.no_grad()
def copy_in_context(model, tok, texts: list[str], passages: int = 4, passage: int = 64, gap: int = 60,
                    seed: int = 0, max_chars: int = 200000) -> dict:
    """Mean loss on the first and the repeated occurrence of ``passages`` random passages of each text.

    Args:
        model: an HF causal LM (``model(input_ids=...).logits``), in eval mode, on any device.
        tok: its tokenizer (a fast one: ``tok.backend_tokenizer``).
        texts: documents; each needs more than ``2 * passage + gap + 200`` tokens (shorter ones are skipped).
    Returns:
        ``{"passages", "loss_first", "loss_repeat"}`` (nats, rounded to 4 places).
    """
    rng = random.Random(seed)
    device = next(model.parameters()).device
    first, second = [], []
    for text in texts:
        ids = token_ids(tok, text[:max_chars])
        if len(ids) <= 2 * passage + gap + 200:
            continue
        for _ in range(passages):
            s = rng.randrange(0, len(ids) - 2 * passage - gap - 200)
            lead, piece = ids[s:s + 100], ids[s + 100:s + 100 + passage]
            between = ids[s + 200 + passage:s + 200 + passage + gap]
            x = torch.tensor([lead + piece + between + piece], device=device)
            logp = torch.log_softmax(model(input_ids=x).logits[0, :-1].float(), -1)
            nll = -logp.gather(1, x[0, 1:, None])[:, 0]  # nll[i]: loss of token i + 1
            at = 100 + passage + gap  # where the repeat starts
            first.append(nll[100:100 + passage - 1].mean().item())
            second.append(nll[at:at + passage - 1].mean().item())
    if not first:
        return {"passages": 0, "loss_first": float("nan"), "loss_repeat": float("nan")}
    return {"passages": len(first), "loss_first": round(sum(first) / len(first), 4),
            "loss_repeat": round(sum(second) / len(second), 4)}
