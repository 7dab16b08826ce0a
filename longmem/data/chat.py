"""Chat turns in a tokenizer's own chat template, as token ids, for conversations that grow one turn at a time.

A chat template renders a whole conversation; a conversation with a memory is fed one turn at a time and
its earlier turns may live only in memory. ``user_turn`` renders one user message and the assistant's
prompt after it; the template's preamble (a default system message, say) comes only with the first turn.
"""

from __future__ import annotations

from longmem.tokens import token_ids


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def user_turn(tokenizer, text: str, first: bool) -> list[int]:
    """Token ids of a user message and the assistant's prompt. After the first turn, the preamble the template
    puts before every conversation is dropped: the turn starts at the template's turn marker before the message
    (the tokenizer's bos token where the template uses it, e.g. ``<|im_start|>``), after a newline."""
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True)
    if not first:
        marker = tokenizer.bos_token or ""
        at = rendered.rfind(marker, 0, rendered.index(text)) if marker else -1
        rendered = "\n" + rendered[at:] if at >= 0 else rendered
    return token_ids(tokenizer, rendered)
