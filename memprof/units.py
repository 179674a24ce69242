"""Parse and format sizes: the one place units live.

Binary units throughout (1 KiB = 1024 bytes). Parsing also accepts decimal
units (``GB`` = 10**9) because users type them, but nothing is printed in them.
"""

from __future__ import annotations

import math
import re

from memprof.errors import InputError

#: the CUDA caching allocator hands out multiples of this many bytes (kMinBlockSize):
#: the tracker's rounding on cuda and sim, and the allocator model's smallest block
CUDA_BLOCK_BYTES = 512

#: the largest size memprof reads (1 EiB): past any GPU's memory by a factor of millions, and
#: far inside the 2**63-1 bytes a baseline or profile may record
MAX_SIZE_BYTES = 2**60

_BINARY = {"b": 1, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
_DECIMAL = {"kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12}
_SIZE_RE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*$")


def parse_size(text: str) -> int:
    """Parse ``"24GiB"``, ``"512 MiB"``, ``"1.5GB"`` or ``"4096"`` into bytes.

    Raises:
        InputError: the text is not a size.
    """
    m = _SIZE_RE.match(str(text))
    if not m:
        raise InputError(f"not a size: {text!r} (expected e.g. 24GiB, 512MiB, 4096)")
    value, unit = float(m.group(1)), m.group(2).lower()
    if unit in ("", "b"):
        factor = 1
    elif unit in _BINARY:
        factor = _BINARY[unit]
    elif unit in _DECIMAL:
        factor = _DECIMAL[unit]
    elif unit in ("k", "m", "g", "t"):
        factor = _BINARY[unit + "ib"]
    else:
        raise InputError(f"unknown size unit {m.group(2)!r} in {text!r} (use B, KiB, MiB, GiB, TiB)")
    if not math.isfinite(value * factor):  # hundreds of digits: float() says inf
        raise InputError(f"not a size: {text!r} is too large")
    if value * factor > MAX_SIZE_BYTES:
        raise InputError(f"{text!r} is too large: memprof reads sizes up to 1 EiB (2**60 bytes)")
    return int(round(value * factor))


def parse_percent(text: str) -> float:
    """Parse ``"2%"`` into ``0.02``.

    Raises:
        InputError: the text is not a percentage.
    """
    t = str(text).strip()
    if not t.endswith("%"):
        raise InputError(f"not a percentage: {text!r} (expected e.g. 2%)")
    try:
        value = float(t[:-1])
    except ValueError:
        raise InputError(f"not a percentage: {text!r} (expected e.g. 2%)") from None
    # float() takes "nan", "inf" and "1e400" (inf): none of them is a percentage
    if not math.isfinite(value):
        raise InputError(f"not a percentage: {text!r} (expected a finite number, e.g. 2%)")
    return value / 100.0


def format_bytes(n: int | float | None, precision: int = 1) -> str:
    """Format bytes with binary units: ``1.5 GiB``, ``512.0 MiB``, ``300 B``."""
    if n is None:
        return "n/a"
    sign = "-" if n < 0 else ""
    n = abs(n)
    for unit, factor in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= factor:
            return f"{sign}{n / factor:.{precision}f} {unit}"
    return f"{sign}{int(n)} B"


def format_count(n: int) -> str:
    """Format a parameter count: ``124.4M``, ``8.03B``."""
    if n >= 10**9:
        return f"{n / 1e9:.2f}B"
    if n >= 10**6:
        return f"{n / 1e6:.1f}M"
    if n >= 10**3:
        return f"{n / 1e3:.1f}K"
    return str(n)
