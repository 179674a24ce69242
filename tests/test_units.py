import pytest

from memprof.errors import InputError
from memprof.units import format_bytes, format_count, parse_percent, parse_size


@pytest.mark.parametrize(
    "text,expected",
    [
        ("24GiB", 24 * 2**30),
        ("512 MiB", 512 * 2**20),
        ("1.5GB", 1_500_000_000),
        ("4096", 4096),
        ("2k", 2048),
        ("10B", 10),
    ],
)
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("bad", ["", "GiB", "12 parsecs", "-3MiB", "1e3"])
def test_parse_size_rejects(bad):
    with pytest.raises(InputError):
        parse_size(bad)


def test_parse_percent():
    assert parse_percent("2%") == pytest.approx(0.02)
    with pytest.raises(InputError):
        parse_percent("2")


def test_format_bytes_binary_units():
    assert format_bytes(0) == "0 B"
    assert format_bytes(1023) == "1023 B"
    assert format_bytes(1536) == "1.5 KiB"
    assert format_bytes(3 * 2**30, 2) == "3.00 GiB"
    assert format_bytes(-(2**20)) == "-1.0 MiB"
    assert format_bytes(None) == "n/a"


def test_format_count():
    assert format_count(124_439_808) == "124.4M"
    assert format_count(8_030_261_248) == "8.03B"
