"""Derived RNG seeds from named parts."""

from __future__ import annotations

import hashlib


def stable_key(*parts: object) -> int:
    """A 63-bit seed from `parts` (ints and strings): the same in every process, run and Python
    version (unlike `hash`), and unrelated for any two different part lists, so every use names its
    own key space, e.g. `stable_key("critic", seed, iteration, fold)`."""
    text = "\x1f".join(f"{type(part).__name__}:{part}" for part in parts)
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little") >> 1
