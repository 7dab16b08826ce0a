"""Recall material for adaptation: every wording is well formed, the asked statement holds the answer, and no
distractor answers the same question."""

import random

import pytest

from longmem.data.needles import FACT_SETS, RELATIONS, episode


@pytest.mark.parametrize("facts", FACT_SETS)
@pytest.mark.parametrize("chat", [False, True])
def test_episodes_hold_their_answer_once(facts, chat):
    rng = random.Random(0)
    for _ in range(300):
        ep = episode(rng, distractors=rng.randint(0, 3), chat=chat, facts=facts)
        value = ep.answer.strip().rstrip(".").split()[-1]
        assert value in ep.statements[0], (ep.statements, ep.answer)
        assert not any(value in s for s in ep.statements[1:]), (ep.statements, ep.answer)
        assert "{" not in ep.question + ep.answer + "".join(ep.statements)
        if not chat:  # plain text continues the window: the leading space belongs to the token
            assert ep.answer.startswith(" ") and ep.question.startswith(" ")


def test_varied_uses_every_relation():
    rng = random.Random(1)
    questions = set()
    for _ in range(2000):
        ep = episode(rng, distractors=2, facts="varied")
        questions.add(ep.question)
    assert all(any(_matches(q, template) for q in questions) for _, template, _ in RELATIONS)


def _matches(question: str, template: str) -> bool:
    head = template.split("{")[0]
    tail = template.split("}")[-1]
    return question.startswith(head) and question.endswith(tail)
