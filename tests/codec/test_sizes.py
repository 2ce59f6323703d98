"""codec.sizes: the one byte-size parser (the CLI's shard sizes and the loader's budgets use it)."""

from __future__ import annotations

import pytest

from codec.sizes import SizeError, format_size, parse_size


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("8G", 8 << 30),
        ("8GiB", 8 << 30),
        ("5GB", 5 * 10**9),
        ("512MiB", 512 << 20),
        ("1.5G", 3 << 29),
        ("1024", 1024),
        (0, 0),
        (" 64 KiB ", 64 << 10),
    ],
)
def test_sizes_as_people_write_them(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("bad", ["8 parsecs", "", "GiB", -1, "1e3MB", True])
def test_anything_else_is_refused(bad):
    with pytest.raises(SizeError, match="not a size|must be >= 0"):
        parse_size(bad)


def test_format_size_reads_back():
    assert format_size(8 << 30) == "8.00 GiB" and parse_size(format_size(8 << 30).replace(" ", "")) == 8 << 30
