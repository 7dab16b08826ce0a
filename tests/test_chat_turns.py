"""Chat turns in a tokenizer's template: the first turn carries the template's preamble, later ones do not."""

import copy

from longmem.data.chat import has_chat_template, user_turn

CHATML = ("{% if messages[0]['role'] != 'system' %}<|im_start|>system\nYou are helpful.<|im_end|>\n{% endif %}"
          "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def chat_tokenizer(tiny_assets):
    tok = copy.deepcopy(tiny_assets["tokenizer"])
    tok.add_special_tokens({"bos_token": "<|im_start|>", "additional_special_tokens": ["<|im_end|>"]})
    tok.chat_template = CHATML
    return tok


def test_first_turn_has_the_preamble_and_later_turns_only_their_own(tiny_assets):
    tok = chat_tokenizer(tiny_assets)
    assert has_chat_template(tok) and not has_chat_template(tiny_assets["tokenizer"])
    first = tok.decode(user_turn(tok, "my dog is Rex", first=True))
    later = tok.decode(user_turn(tok, "what is my dog called?", first=False))
    assert first == "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\nmy dog is Rex<|im_end|>\n<|im_start|>assistant\n"
    assert later == "\n<|im_start|>user\nwhat is my dog called?<|im_end|>\n<|im_start|>assistant\n"
