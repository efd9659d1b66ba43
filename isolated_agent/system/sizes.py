"""Sizes as users write them: 1048576, 512K, 100M, 1.5G (binary multiples)."""

from __future__ import annotations

import re

_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*([kmgt]?)i?b?", re.IGNORECASE)
_FACTORS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_size(text: str) -> int:
    """Bytes from e.g. 1048576, 512K, 100M, 1.5G (binary multiples)."""
    match = _SIZE.fullmatch(text.strip())
    if not match:
        raise ValueError(f"{text!r} is not a size (e.g. 500K, 100M, 2G)")
    return int(float(match.group(1)) * _FACTORS[match.group(2).lower()])
