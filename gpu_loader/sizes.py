"""Byte sizes for memory budgets: codec.sizes' one parser, its error raised as a BudgetError."""

from __future__ import annotations

from codec import sizes
from codec.sizes import format_size

from .errors import BudgetError


def parse_size(value: int | str) -> int:
    """`"8GiB"` -> 8589934592 (see codec.sizes.parse_size); a bad size raises BudgetError."""
    try:
        return sizes.parse_size(value)
    except sizes.SizeError as exc:
        raise BudgetError(str(exc)) from None


__all__ = ["format_size", "parse_size"]
