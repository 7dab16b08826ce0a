"""Recall material: facts to plant in a long text and questions that ask for them, as plain text.

An *episode* is what one adaptation example is made of: one or more statements (the asked one and
distractors) to be written somewhere in a memory, a question asked at the end of the local window, and
the answer whose tokens are scored. Statements come in several wordings, keys and values are drawn
at random (numbers of 4-7 digits, made-up words, names), and some episodes are chat turns: a user tells
the assistant a fact, and a later turn asks for it.

Nothing here is drawn from an evaluation set: the evaluations (pass key, RULER's needle tasks, the
planted facts, the chat) use their own wordings, haystacks and keys.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

_CONSONANTS, _VOWELS = "bcdfghjklmnprstvwxz", "aeiou"

FILLER = " The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."

NAMES = ("Alice", "Bruno", "Chiara", "Dmitri", "Esther", "Farid", "Greta", "Hiro", "Ines", "Jonas", "Kemal",
         "Leila", "Marek", "Nadia", "Oscar", "Priya", "Quentin", "Rosa", "Soren", "Tamsin", "Ugo", "Vera",
         "Wendell", "Ximena", "Yusuf", "Zofia")
THINGS = ("colour", "fruit", "city", "animal", "flower", "instrument", "river", "mountain", "planet", "dessert",
          "tree", "gemstone", "song", "sport", "spice")
ADJECTIVES = ("silent", "amber", "crooked", "golden", "hollow", "lucky", "frozen", "scarlet", "gentle", "rusty",
              "bitter", "hidden", "northern", "velvet", "brave", "copper", "misty", "wooden", "quiet", "rapid")
NOUNS = ("harbor", "lantern", "orchard", "falcon", "compass", "meadow", "anchor", "violin", "glacier", "tunnel",
         "garden", "beacon", "window", "ladder", "feather", "canyon", "kettle", "saddle", "pebble", "comet")

# (statement, question, answer): {k} the key, {v} the value. The answer's leading space matters (tokenizers).
NUMBER_FACTS = (
    ("The pass key is {v}. Remember it. {v} is the pass key.", " What is the pass key? The pass key is", " {v}."),
    ("The secret code of the {k} is {v}.", " What is the secret code of the {k}? The secret code of the {k} is", " {v}."),
    ("Remember this: the number for {k} is {v}.", " What is the number for {k}? The number for {k} is", " {v}."),
    ("One of the special numbers for {k} is: {v}.",
     " What is the special number for {k} given in the text? The special number for {k} given in the text is", " {v}."),
    ("The combination of the {k} lock is {v}.", " What is the combination of the {k} lock? It is", " {v}."),
    ("Note: {k} = {v}.", " What is the value of {k}? The value of {k} is", " {v}."),
)
WORD_FACTS = (
    ("{name}'s favourite {thing} is {v}.", " What is {name}'s favourite {thing}? {name}'s favourite {thing} is", " {v}."),
    ("The password for the {k} is {v}.", " What is the password for the {k}? The password for the {k} is", " {v}."),
    ("{name} keeps a pet called {v}.", " What is the name of {name}'s pet? {name}'s pet is called", " {v}."),
)
# Relations: (statement, question, answer) over a person ({name}), an object ({noun}, {adj}) and a value that is
# a number ({n}) or a word ({w}: made up, or a real name or noun). Many verbs and question shapes, so that what is
# learned is "answer from the stated fact", not one sentence pattern.
RELATIONS = (
    ("{name}'s {noun} was named {w}.", " What was {name}'s {noun} named? {name}'s {noun} was named", " {w}."),
    ("{name} called the {adj} {noun} {w}.", " What did {name} call the {adj} {noun}? {name} called it", " {w}."),
    ("{name} owned exactly {n} coins.", " How many coins did {name} own? {name} owned exactly", " {n}."),
    ("{name} was born in the village of {w}.", " In which village was {name} born? {name} was born in", " {w}."),
    ("The {noun} in {name}'s house was called {w}.", " What was the {noun} in {name}'s house called? That {noun} was called",
     " {w}."),
    ("{name} paid {n} pounds for the {adj} {noun}.", " How much did {name} pay for the {adj} {noun}? {name} paid", " {n}."),
    ("The {adj} {noun} belonged to a man named {w}.", " Who owned the {adj} {noun}? It belonged to a man named", " {w}."),
    ("{name}'s locker number was {n}.", " What was {name}'s locker number? The locker number was", " {n}."),
    ("Last spring {name} travelled to {w}.", " Where did {name} travel last spring? {name} travelled to", " {w}."),
    ("{name} sailed on a ship called the {w}.", " On which ship did {name} sail? The ship was called the", " {w}."),
    ("On the {noun} {name} wrote the number {n}.", " What number did {name} write on the {noun}? {name} wrote", " {n}."),
    ("{name}'s teacher was a woman called {w}.", " Who was {name}'s teacher? {name}'s teacher was called", " {w}."),
    ("The {adj} {noun} weighed {n} grams.", " How much did the {adj} {noun} weigh? It weighed", " {n}."),
    ("{name} named the new horse {w}.", " What name did {name} give the new horse? The horse was named", " {w}."),
    ("There were {n} steps up to {name}'s {noun}.", " How many steps led up to {name}'s {noun}? There were", " {n}."),
    ("{name} hid the key under the {noun}.", " Where did {name} hide the key? Under the", " {noun}."),
    ("{name}'s dog answered to the name {w}.", " What was the name of {name}'s dog? The dog was called", " {w}."),
    ("The {noun} at {w} was painted {adj}.", " What colour was the {noun} at {w} painted? It was painted", " {adj}."),
    ("{name} married a sailor called {w}.", " Whom did {name} marry? {name} married", " {w}."),
    ("{name} lived at number {n} on the high street.", " At what number did {name} live? {name} lived at number", " {n}."),
)
REAL_WORDS = NAMES + tuple(n.capitalize() for n in NOUNS) + ("Albion", "Meridian", "Harrow", "Linden", "Bramble",
                                                              "Corvin", "Thistle", "Marlow", "Fennick", "Ashby")
CHAT_FACTS = (
    ("Please remember that my {thing} code is {v}.", "What is my {thing} code?", "Your {thing} code is {v}."),
    ("My favourite {thing} is {v}. Keep that in mind.", "What is my favourite {thing}?", "Your favourite {thing} is {v}."),
    ("I am going to tell you something to remember: the {k} number is {v}.", "What was the {k} number?",
     "The {k} number is {v}."),
)
CHAT_ACKS = ("I will remember that.", "Noted, I will keep it in mind.", "Got it.", "Understood.")


@dataclass
class Episode:
    """One recall example, as text. ``statements[0]`` holds the answer; the others are distractors."""

    statements: list[str]
    question: str  # follows the local window's text (plain), or the user's last turn (chat)
    answer: str  # the scored continuation
    chat: bool = False  # statements and question are chat turns (render them with the chat template)
    acks: list[str] = field(default_factory=list)  # chat: the assistant's reply after each statement


def made_up_word(rng: random.Random) -> str:
    return "".join(rng.choice(_CONSONANTS) + rng.choice(_VOWELS) for _ in range(rng.randint(2, 3)))


def _key(rng: random.Random) -> str:
    return f"{rng.choice(ADJECTIVES)}-{rng.choice(NOUNS)}" if rng.random() < 0.7 else made_up_word(rng)


def _number(rng: random.Random) -> str:
    return str(rng.randrange(10 ** (n := rng.randint(4, 7)) // 10, 10 ** n))


FACT_SETS = ("passkey", "numbers", "all", "varied")  # the pass-key wording; the numeric ones; the 9 templates; + RELATIONS


def episode(rng: random.Random, distractors: int = 0, chat: bool = False, facts: str = "all") -> Episode:
    """A random episode with ``distractors`` other statements of the same wording and different keys and values.
    ``facts`` narrows the wordings (``FACT_SETS``); chat episodes always use the chat wordings."""
    if facts == "varied" and not chat and rng.random() < 0.5:
        return _relation(rng, distractors)
    if chat:
        statement, question, answer = rng.choice(CHAT_FACTS)
        numeric = True
    elif facts == "passkey":
        (statement, question, answer), numeric = NUMBER_FACTS[0], True
    elif facts == "numbers" or rng.random() < 0.7:
        (statement, question, answer), numeric = rng.choice(NUMBER_FACTS), True
    else:
        (statement, question, answer), numeric = rng.choice(WORD_FACTS), False
    name, thing = rng.choice(NAMES), rng.choice(THINGS)
    keys, values = set(), set()
    filled = []
    for _ in range(1 + distractors):
        k = _key(rng)
        while k in keys:
            k = _key(rng)
        v = _number(rng) if numeric else made_up_word(rng).capitalize()
        while v in values:
            v = _number(rng) if numeric else made_up_word(rng).capitalize()
        keys.add(k)
        values.add(v)
        if "{k}" not in statement and filled:  # a keyless wording (the pass key, "my favourite"): vary the owner
            name, thing = rng.choice(NAMES), rng.choice(THINGS)
        filled.append(dict(k=k, v=v, name=name, thing=thing))
    asked = filled[0]
    if "{k}" not in statement and "{name}" not in statement and "{thing}" not in statement:
        filled = filled[:1]  # the pass key has no key: a distractor would be a second answer
    return Episode(statements=[statement.format(**f) for f in filled], question=question.format(**asked),
                   answer=answer.format(**asked), chat=chat,
                   acks=[rng.choice(CHAT_ACKS) for _ in filled] if chat else [])


def _relation(rng: random.Random, distractors: int) -> Episode:
    """An episode over one of the ``RELATIONS``. Each distractor is about something else, in the same wording or
    (half of them) in another relation's, as facts in a real text differ in what they relate; no statement holds
    another's answer, and no two ask the same question."""
    seen, filled = set(), []  # filled: (relation, its fields)
    while len(filled) < 1 + distractors:
        relation = filled[0][0] if filled and rng.random() < 0.5 else rng.choice(RELATIONS)
        statement, question, answer = relation
        w = made_up_word(rng).capitalize() if rng.random() < 0.5 else rng.choice(REAL_WORDS)
        f = dict(name=rng.choice(NAMES), noun=rng.choice(NOUNS), adj=rng.choice(ADJECTIVES), n=_number(rng), w=w)
        ident, value = question.format(**f), answer.format(**f).strip().rstrip(".")
        text = statement.format(**f)
        if ident in seen or any(value in s.format(**g) or a.format(**g).strip().rstrip(".") in text
                                for (s, _, a), g in filled):
            continue
        seen.add(ident)
        filled.append((relation, f))
    (_, question, answer), asked = filled[0]
    return Episode(statements=[s.format(**f) for (s, _, _), f in filled], question=question.format(**asked),
                   answer=answer.format(**asked))
