"""Argument checks shared by the data modules (bad input gets a clear error at the boundary)."""

from __future__ import annotations

import numbers
from typing import Any


def check_int(name: str, value: Any, low: int = 0, high: int | None = None) -> int:
    """`value` as an int if it is an integer (not a bool) in ``[low, high]`` (no upper bound
    when `high` is None); else a ValueError naming `name`, the bound and what came."""
    is_int = isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if not (is_int and low <= value and (high is None or value <= high)):
        bound = f">= {low}" if high is None else f"in [{low}, {high:,}]"
        raise ValueError(f"{name} must be an int {bound}, got {value!r}")
    return int(value)
