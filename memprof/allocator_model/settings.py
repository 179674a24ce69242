"""The caching allocator's settings: its constants, ``PYTORCH_CUDA_ALLOC_CONF`` and the settings memprof models.

:class:`AllocatorSettings` holds what the model of :mod:`memprof.allocator_model`
follows; :func:`alloc_conf_string` writes it as the environment variable's value,
:func:`settings_from_conf` reads it back.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from memprof.errors import InputError
from memprof.units import CUDA_BLOCK_BYTES

MiB = 2**20
#: every block is a multiple of this (kMinBlockSize)
MIN_BLOCK = CUDA_BLOCK_BYTES
#: largest request served from the small pool (kSmallSize)
SMALL_SIZE = 1 * MiB
#: segment size of the small pool (kSmallBuffer)
SMALL_BUFFER = 2 * MiB
#: segment size for requests below MIN_LARGE_ALLOC (kLargeBuffer)
LARGE_BUFFER = 20 * MiB
#: from this size on a request gets its own segment (kMinLargeAlloc)
MIN_LARGE_ALLOC = 10 * MiB
#: own segments are rounded up to this (kRoundLarge)
ROUND_LARGE = 2 * MiB
#: how much larger than an oversize request a cached oversize block may be
MAX_NON_SPLIT_ROUNDING = LARGE_BUFFER

#: the environment variable the settings go into (read when CUDA initialises)
ENV_VAR = "PYTORCH_CUDA_ALLOC_CONF"
#: its device-generic successor (PyTorch 2.8+), read first when set
GENERIC_ENV_VAR = "PYTORCH_ALLOC_CONF"


@dataclass(frozen=True)
class AllocatorSettings:
    """The caching allocator's settings memprof models (``PYTORCH_CUDA_ALLOC_CONF``).

    The defaults are PyTorch's: no expandable segments, no split limit, no
    garbage collection.
    """

    expandable_segments: bool = False
    #: blocks this large or larger are never split (0: unset; PyTorch requires > 20)
    max_split_size_mb: int = 0
    #: reclaim cached segments above this fraction of the capacity (0: off; 0 < t < 1)
    garbage_collection_threshold: float = 0.0

    def problems(self) -> list[str]:
        """What PyTorch would reject in these settings (it refuses them at CUDA init)."""
        out = []
        mb = self.max_split_size_mb
        if isinstance(mb, bool) or not isinstance(mb, int):
            out.append(f"max_split_size_mb must be an integer, got {mb!r}")
        elif mb != 0 and mb <= LARGE_BUFFER // MiB:
            out.append(f"max_split_size_mb must be 0 (unset) or more than {LARGE_BUFFER // MiB}, got {mb}")
        t = self.garbage_collection_threshold
        if isinstance(t, bool) or not isinstance(t, (int, float)):
            out.append(f"garbage_collection_threshold must be a number, got {t!r}")
        elif t != 0 and not 0 < t < 1:
            out.append(f"garbage_collection_threshold must be 0 (off) or between 0 and 1, got {t}")
        if not isinstance(self.expandable_segments, bool):
            out.append(f"expandable_segments must be a boolean, got {self.expandable_segments!r}")
        return out

    @property
    def is_default(self) -> bool:
        return self == AllocatorSettings()

    @property
    def max_split_bytes(self) -> int | None:
        return self.max_split_size_mb * MiB if self.max_split_size_mb else None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> AllocatorSettings:
        """Settings from plain data (``StepSetup.alloc_conf``); empty or None: the defaults.

        Raises:
            InputError: an unknown key or a value PyTorch would reject.
        """
        d = dict(d or {})
        known = {f for f in cls.__dataclass_fields__}
        unknown = sorted(set(d) - known)
        if unknown:
            raise InputError(f"unknown allocator settings {unknown}; known: {', '.join(sorted(known))}")
        settings = cls(**d)
        problems = settings.problems()
        if problems:
            raise InputError("allocator settings: " + "; ".join(problems))
        return settings


def alloc_conf_string(settings: AllocatorSettings | Mapping[str, Any] | None) -> str:
    """The ``PYTORCH_CUDA_ALLOC_CONF`` value of the settings ('' for PyTorch's defaults).

    >>> alloc_conf_string({"expandable_segments": True, "max_split_size_mb": 128})
    'expandable_segments:True,max_split_size_mb:128'

    Raises:
        InputError: invalid settings.
    """
    s = settings if isinstance(settings, AllocatorSettings) else AllocatorSettings.from_dict(settings)
    parts = []
    if s.expandable_segments:
        parts.append("expandable_segments:True")
    if s.max_split_size_mb:
        parts.append(f"max_split_size_mb:{s.max_split_size_mb}")
    if s.garbage_collection_threshold:
        parts.append(f"garbage_collection_threshold:{s.garbage_collection_threshold:g}")
    return ",".join(parts)


def settings_from_conf(conf: str) -> tuple[AllocatorSettings, list[str]]:
    """The modelled settings in a ``PYTORCH_CUDA_ALLOC_CONF`` value, and the options not modelled.

    >>> settings_from_conf("expandable_segments:True,roundup_power2_divisions:4")
    (AllocatorSettings(expandable_segments=True, max_split_size_mb=0, garbage_collection_threshold=0.0), ['roundup_power2_divisions'])

    Args:
        conf: the variable's value ('' or unset: PyTorch's defaults).

    Returns:
        The settings, and the names of the options it does not model (ignored).

    Raises:
        InputError: a modelled option with a value PyTorch would reject.
    """
    d: dict[str, Any] = {}
    ignored: list[str] = []
    for part in (conf or "").split(","):
        if not part.strip():
            continue
        key, _, value = part.partition(":")
        key, value = key.strip(), value.strip()
        try:
            if key == "expandable_segments":
                if value not in ("True", "False"):
                    raise ValueError(value)
                d[key] = value == "True"
            elif key == "max_split_size_mb":
                d[key] = int(value)
            elif key == "garbage_collection_threshold":
                d[key] = float(value)
            else:
                ignored.append(key)
        except ValueError:
            raise InputError(f"{ENV_VAR}: bad value {value!r} for {key}") from None
    return AllocatorSettings.from_dict(d), ignored
