"""Memory sizes as the loader's budget options take them: parsed with binary and decimal units,
nonsense refused, printed back in binary units."""

from __future__ import annotations

import pytest

from gpu_loader import BudgetError, format_size, parse_size


@pytest.mark.parametrize(
    "text,expected",
    [
        ("8GiB", 8 << 30),
        ("512MiB", 512 << 20),
        ("2GB", 2 * 10**9),
        ("1.5G", 3 << 29),
        ("100", 100),
        (4096, 4096),
        (" 64 KiB ", 64 << 10),
    ],
)
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("bad", ["8 parsecs", "", "GiB", -1, "1e3MB"])
def test_parse_size_rejects_nonsense(bad):
    with pytest.raises(BudgetError):
        parse_size(bad)


def test_format_size():
    assert format_size(3 << 30) == "3.00 GiB" and format_size(10) == "10 B"
