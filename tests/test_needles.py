"""Recall material for adaptation: every wording is well formed, the asked statement holds the answer, and no
distractor answers the same question."""

import random
import re

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


def test_varied_distractors_mix_relations():
    """Distractors are sometimes in the asked relation's wording and sometimes in another's."""
    rng = random.Random(2)
    same = other = 0
    for _ in range(400):
        ep = episode(rng, distractors=3, facts="varied")
        asked = _relations_of(ep.statements[0])
        if not asked:  # one of the plain templates (half of the varied episodes)
            continue
        for s in ep.statements[1:]:
            if asked & _relations_of(s):
                same += 1
            else:
                other += 1
    assert same > 50 and other > 50, (same, other)


def _relations_of(statement: str) -> set[int]:
    """The RELATIONS whose statement wording ``statement`` fits."""
    return {i for i, (template, _, _) in enumerate(RELATIONS)
            if re.fullmatch(re.sub(r"\\\{\w+\\\}", ".+", re.escape(template)), statement)}
