"""Can the model copy text that only its memory holds? Made-up lines repeated beyond the window.

For pieces of held-out documents: ``lines`` made-up lines (``vokaru_ti = pelzo(nimaxe, 4172)``, text no model can
guess; :func:`longmem.data.recall.made_up_line`) are inserted at line starts in the first part of the piece, and the
same lines are repeated at its end, each at least ``min_back`` characters (several local windows) after its first
occurrence, so that only the memory holds it. Every piece is streamed segment by segment as in evaluation (``longmem
eval ppl``), with a fresh memory and without any memory. :func:`memory_copy_eval` reports:

    loss            mean next-token loss on the repeated lines after their first ``cue`` tokens
    retrieved       (with memory) share of the memory layer's heads whose retrieved chunks hold the token to copy
                    (the one after the original of the current token)
    attention       (with memory) the memory attention weight on that token, best head, mean over tokens
    greedy exact    the last ``context`` tokens before a repeat plus its first ``cue`` tokens as the prompt, the whole
                    piece before it in memory (as ``longmem memory add`` writes it): how often greedy generation
                    reproduces the rest of the line exactly
    greedy name     same prompts, only repeats whose cue ends inside the line's first name: how often the
                    generation completes that name exactly (the rest of it, then " =")
    greedy first 4  same prompts: how often the first 4 generated tokens are right
    cue_name        the cue of every repeat is its first name and " =" (``vokaru_ti =``) instead of ``cue`` tokens:
                    greedy exact is then how often what the name was set to comes back whole
"""

from __future__ import annotations

import random

import numpy as np
import torch

from longmem.data.recall import made_up_line
from longmem.stream_loss import stream_nll
from longmem.tokens import token_ids_and_offsets


def build_piece(text: str, rng: random.Random, lines: int, min_back: int) -> tuple[str, list[tuple[int, int, str]]]:
    """The piece with made-up lines inserted early and repeated at the end.

    Returns the text and [(offset of the original, offset of the repeat, line)]."""
    limit = len(text) - min_back
    invented = []
    for _ in range(lines):
        line = made_up_line(rng)
        a = text.rfind("\n", 0, rng.randrange(0, limit)) + 1
        text = text[:a] + line + "\n" + text[a:]
        invented = [(o + len(line) + 1 if o >= a else o, l) for o, l in invented] + [(a, line)]
    repeats = []
    for orig, line in invented:
        text += "\n\n"
        repeats.append((orig, len(text), line))
        text += line
    return text + "\n", repeats


def token_span(offsets, start: int, length: int) -> list[int]:
    """Indices of the tokens whose character span lies inside ``[start, start + length)``."""
    return [i for i, (s, t) in enumerate(offsets) if s >= start and t <= start + length]


@torch.no_grad()
def mechanism(model, ids: list[int], pairs: dict[int, int]) -> tuple[list[float], list[float]]:
    """Stream one piece with memory; for each repeated token t whose original is j (``pairs``), whether the chunk of
    j + 1 is retrieved (share of heads) and the memory attention weight on j + 1 (best head)."""
    T, csz = model.segment_length, model.config.chunk_size
    device = model.device
    seen, retriever = {}, model.retriever

    def spying(memory, keys):  # the model's own retrieval, its query kept for the attention weights
        retrieve = retriever(memory, keys)

        def spy(q_raw):
            seen["q"], seen["r"] = q_raw, retrieve(q_raw)
            return seen["r"]

        return spy

    model.retriever = spying
    memory, hit, weight = model.new_memory(1), [], []
    try:
        for st in range(0, len(ids) - len(ids) % csz, T):
            seen.clear()
            model(torch.tensor([ids[st:st + T]], device=device), memory=memory)
            if "r" not in seen:
                continue
            q, r = seen["q"][0].float(), seen["r"]
            for t in range(st, min(st + T, len(ids))):
                if t not in pairs or pairs[t] + 1 >= st:
                    continue
                target = pairs[t] + 1
                chunks = r.chunks[0, :, t - st]  # (H, k_c)
                hit.append((chunks == target // csz).any(-1).float().mean().item())
                scores = torch.einsum("hd,hkd->hk", q[:, t - st], r.keys[0, :, t - st].float()) * model.backbone.scale
                probs = scores.masked_fill(~r.mask[0, :, t - st], float("-inf")).softmax(-1)
                where = (chunks.clamp_min(0)[:, :, None] * csz + torch.arange(csz, device=chunks.device)).flatten(1) \
                    == target
                weight.append((probs * where).sum(-1).max().item())
    finally:
        model.retriever = retriever
    return hit, weight


def make_pieces(texts: list[str], tok, rng: random.Random, piece_chars: int = 8000, pieces: int = 6, lines: int = 3,
                min_back: int = 3000, cue: int = 3, cue_name: bool = False):
    """[(token ids, [(first token of repeat, last token + 1, cue tokens)], {repeat token: original token})] for
    ``pieces`` random pieces of each text."""
    out = []
    for text in texts:
        for _ in range(pieces):
            start = rng.randrange(0, max(1, len(text) - piece_chars))
            piece, repeats = build_piece(text[start:start + piece_chars], rng, lines, min_back)
            ids, offsets = token_ids_and_offsets(tok, piece)
            spans, pairs = [], {}
            for orig, off, line_text in repeats:
                toks, first = token_span(offsets, off, len(line_text)), token_span(offsets, orig, len(line_text))
                c = cue
                if cue_name:  # the tokens up to and including " =" (a token never spans " = ")
                    c = len(token_span(offsets, off, line_text.index(" = ") + 2))
                spans.append((toks[0], toks[-1] + 1, c))
                if [ids[i] for i in toks] == [ids[i] for i in first]:  # same tokens: position by position
                    pairs.update(zip(toks[c - 1:-1], first[c - 1:-1]))
            out.append((ids, spans, pairs))
    return out


def memory_copy_eval(model, tok, texts: list[str], piece_chars: int = 8000, pieces: int = 6, lines: int = 3,
                     min_back: int = 3000, cue: int = 3, cue_name: bool = False, context: int = 32, seed: int = 0,
                     progress: bool = False, samples: int = 12) -> dict:
    """The measures of the module docstring on ``pieces`` random pieces of each of ``texts`` (model in eval mode, on
    its device). Returns a JSON-ready dict."""
    rng = random.Random(seed)
    device = model.device
    built = make_pieces(texts, tok, rng, piece_chars, pieces, lines, min_back, cue, cue_name)
    docs = [np.array(ids, dtype=np.int64) for ids, _, _ in built]
    result = {"config": model.config.to_dict(), "pieces": len(built), "lines": sum(len(s) for _, s, _ in built)}
    for mode in ("longmem", "no_memory"):
        table = stream_nll(model, docs, mode, keep_tokens=True, progress=progress, desc=mode).token_table()
        # position p in the table is the loss of predicting token p of the document
        losses = [table[(d, t)] for d, (_, spans, _) in enumerate(built) for s, e, c in spans for t in range(s + c, e)]
        result[f"loss_{mode}"] = float(np.mean(losses))
    hit, weight = [], []
    for ids, _, pairs in built:
        h, w = mechanism(model, ids, pairs)
        hit += h
        weight += w
    result.update(retrieved=float(np.mean(hit)) if hit else float("nan"),
                  attention=float(np.mean(weight)) if weight else float("nan"), tokens_paired=len(hit))

    exact, first4, name = {"memory": 0, "no_memory": 0}, {"memory": 0, "no_memory": 0}, {"memory": 0, "no_memory": 0}
    named, shown = 0, []
    T = model.segment_length
    for ids, spans, _ in built:
        for s, e, c in spans:
            cut = s + c
            prompt = ids[max(0, cut - context - c):cut]
            truth = ids[cut:e]
            memory = model.new_memory(1)
            before = ids[: max(0, cut - len(prompt))]
            for i in range(0, len(before) - len(before) % model.config.chunk_size, T):
                with torch.no_grad():
                    model(torch.tensor([before[i:i + T]], device=device), memory=memory)
            got, rest = {}, tok.decode(truth)
            in_name = rest.find(" = ") > 0  # the cue ends inside the first name: its rest, then " ="
            named += in_name
            for mode, mem in (("memory", memory), ("no_memory", None)):
                out = model.generate(torch.tensor([prompt], device=device), memory=mem,
                                     max_new_tokens=len(truth))[0, len(prompt):]
                got[mode] = out.tolist()
                exact[mode] += got[mode] == truth
                first4[mode] += got[mode][:4] == truth[:4]
                if in_name:
                    name[mode] += tok.decode(got[mode]).startswith(rest[: rest.index(" = ") + 3])
            if len(shown) < samples:
                shown.append({"prompt": tok.decode(prompt), "truth": tok.decode(truth),
                              **{k: tok.decode(v) for k, v in got.items()}})
    n = max(result["lines"], 1)
    result.update({f"greedy_exact_{k}": v / n for k, v in exact.items()},
                  **{f"greedy_first4_{k}": v / n for k, v in first4.items()},
                  **{f"greedy_name_{k}": v / max(named, 1) for k, v in name.items()}, names_cued=named,
                  samples=shown)
    return result
