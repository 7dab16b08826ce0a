"""API keys: a file of ``KEY NAMESPACE`` lines; each key sees only its namespace's memories."""

from __future__ import annotations

import hmac
import os

from longmem.errors import LongMemError
from longmem.store import NAME_RE

MIN_KEY_LENGTH = 8  # a shorter key is a typo or a guessable secret


def read_api_keys(path: str | os.PathLike) -> dict[str, str]:
    """``{key: namespace}`` from a file of ``KEY NAMESPACE`` lines (whitespace between; ``#`` starts a comment)."""
    try:
        text = open(path, encoding="utf-8").read()
    except FileNotFoundError:
        raise LongMemError(f"--api-keys {path}: no such file") from None
    except UnicodeDecodeError:
        raise LongMemError(f"--api-keys {path} is not UTF-8 text") from None
    keys: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), 1):
        fields = line.split("#", 1)[0].split()
        if not fields:
            continue
        if len(fields) != 2:
            raise LongMemError(f"--api-keys {path}:{number}: expected 'KEY NAMESPACE', got {len(fields)} field(s)")
        key, namespace = fields
        if len(key) < MIN_KEY_LENGTH:
            raise LongMemError(f"--api-keys {path}:{number}: keys must be at least {MIN_KEY_LENGTH} characters")
        if not NAME_RE.fullmatch(namespace) or ".." in namespace:
            raise LongMemError(f"--api-keys {path}:{number}: namespace {namespace!r} must be 1-64 letters, digits, "
                               "'.', '_' or '-', starting with a letter or digit")
        if key in keys:
            raise LongMemError(f"--api-keys {path}:{number}: this key is listed twice")
        keys[key] = namespace
    if not keys:
        raise LongMemError(f"--api-keys {path} holds no keys; write one 'KEY NAMESPACE' pair per line")
    return keys


def namespace_for(keys: dict[str, str], presented: str) -> str | None:
    """The namespace of ``presented``, or None. Every key is compared, each in constant time, so the time
    taken says nothing about which key (or how much of one) matched."""
    found = None
    given = presented.encode()
    for key, namespace in keys.items():
        if hmac.compare_digest(key.encode(), given):
            found = namespace
    return found
