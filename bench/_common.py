"""Shared helpers for the benchmark scripts in ``bench/``.

Each script prints a Markdown section and writes it into ``docs/benchmarks.md``
between ``<!-- BEGIN name -->`` and ``<!-- END name -->`` markers, leaving the
other sections as they are.
"""

from __future__ import annotations

import datetime as _dt
import gc
import logging
import os
import platform
import re
import shlex
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "bench"
DOC = REPO / "docs" / "benchmarks.md"

# Import memprof from this checkout, whatever the virtualenv's editable install
# points at (another clone sharing the venv can re-point it).
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

DOC_HEADER = """# Benchmarks

Speed and agreement benchmarks of memprof's tracker (`memprof.tracking.Tracker`)
and engines, against untracked steps and against PyTorch's own
`torch.distributed._tools.mem_tracker.MemTracker`.

Every section below was written by the script named in it (each script prints
its section and replaces it here, leaving the others alone). Timed variants run
side by side in one process, interleaved repeat by repeat (the order rotates
each repeat), and the tables give the median of the repeats. The machine is a
shared 2-core VM, so timings are noisy: medians are reported with their min/max
spread, and wall-clock time is shown beside process CPU time (`time.process_time`),
which other processes on the machine disturb less.

Rerun a section with the command given in it (from the repository root).
"""

TECHNIQUES_DOC = REPO / "docs" / "techniques.md"
TECHNIQUES_HEADER = """# What each technique really does

Memory, compute and quality of each optimization, alone against its baseline,
measured by memprof itself (`memprof compare --separate`). The summary table
(written by `bench/summary.py`) gives every technique one row, with the command and
the real output each number came from; the section after it (`bench/techniques.py`)
measures chunking, pruning and sliding windows on a small Llama on the CPU and on the
TinyLlama-1.1B shape in sim side by side. Rerun a section with the command given in it.
"""


def quiet() -> None:
    """Silence transformers' advisory messages and Python warnings."""
    warnings.filterwarnings("ignore")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
    except ImportError:  # pragma: no cover
        pass
    logging.getLogger("transformers").setLevel(logging.ERROR)


def machine() -> str:
    """One line describing the machine and the library versions."""
    import torch
    import transformers

    cpu = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    cpu = cpu or platform.processor() or platform.machine()
    gpu = "CUDA available" if torch.cuda.is_available() else "CPU only, no GPU"
    return (
        f"{os.cpu_count()} cores ({cpu}), {gpu}; torch {torch.__version__} "
        f"({torch.get_num_threads()} intra-op thread{'s' if torch.get_num_threads() != 1 else ''}), transformers {transformers.__version__}, "
        f"Python {platform.python_version()}, {platform.system()} {platform.release()}"
    )


def source() -> str:
    """Where memprof was imported from, with the checkout's commit and whether memprof/ had local edits."""
    import subprocess

    import memprof

    where = Path(memprof.__file__).resolve().parent
    try:
        rel = where.relative_to(REPO)
    except ValueError:
        rel = where
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "memprof"],
            cwd=REPO,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        state = f"commit {commit}" + (
            ", with uncommitted changes in memprof/" if dirty else ", memprof/ unmodified"
        )
    except (OSError, subprocess.CalledProcessError):
        state = "commit unknown"
    return f"memprof {memprof.__version__} from `{rel}/` ({state})"


def today() -> str:
    return _dt.date.today().isoformat()


def command() -> str:
    """The command line that ran this script, relative to the repository root."""
    script = Path(sys.argv[0]).resolve()
    try:
        script_s = str(script.relative_to(REPO))
    except ValueError:
        script_s = str(script)
    return " ".join([".venv/bin/python", script_s, *(shlex.quote(a) for a in sys.argv[1:])])


class Timing:
    """Wall and process-CPU seconds of repeated runs of one variant."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.wall: list[float] = []
        self.cpu: list[float] = []

    def run(self, fn: Callable[[], Any]) -> Any:
        gc.collect()
        w0, c0 = time.perf_counter(), time.process_time()
        out = fn()
        c1, w1 = time.process_time(), time.perf_counter()
        self.wall.append(w1 - w0)
        self.cpu.append(c1 - c0)
        return out

    @property
    def wall_median(self) -> float:
        return statistics.median(self.wall)

    @property
    def cpu_median(self) -> float:
        return statistics.median(self.cpu)

    def spread(self) -> str:
        return f"{min(self.wall):.2f} - {max(self.wall):.2f}"


def interleave(
    variants: Sequence[tuple[Timing, Callable[[], Any]]], repeats: int, log: Callable[[str], None]
) -> list[list[Any]]:
    """Run every variant ``repeats`` times, interleaved; the order rotates each repeat.

    Returns the outputs, ``outs[variant_index][repeat]``.
    """
    outs: list[list[Any]] = [[] for _ in variants]
    n = len(variants)
    for r in range(repeats):
        order = [(r + k) % n for k in range(n)]
        for i in order:
            timing, fn = variants[i]
            outs[i].append(timing.run(fn))
            log(
                f"  repeat {r + 1}/{repeats} {timing.name}: {timing.wall[-1]:.2f} s wall, {timing.cpu[-1]:.2f} s cpu"
            )
    return outs


def pair_ratios(num: Timing, den: Timing) -> tuple[float, float]:
    """Median over repeats of the per-repeat ratios num/den (wall, cpu)."""
    w = statistics.median(a / b for a, b in zip(num.wall, den.wall))
    c = statistics.median(a / b for a, b in zip(num.cpu, den.cpu))
    return w, c


def sim_engine(**semantics: Any) -> Any:
    """The sim engine, optionally with some of its CUDA semantics switched off (``memprof.engines.sim.sim_engine``)."""
    from memprof.engines.sim import sim_engine

    return sim_engine(**semantics)


def md_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], align: str | None = None) -> str:
    """A Markdown table; ``align`` is one char per column (l, r)."""
    align = align or ("l" + "r" * (len(headers) - 1))
    sep = ["---:" if a == "r" else ":---" for a in align]
    lines = ["| " + " | ".join(str(h) for h in headers) + " |", "| " + " | ".join(sep) + " |"]
    for row in rows:
        lines.append("| " + " | ".join(str(c) for c in row) + " |")
    return "\n".join(lines)


def gib(n: int | float | None) -> str:
    if n is None:
        return "n/a"
    return f"{n / 2**30:.3f} GiB"


def mib(n: int | float | None) -> str:
    if n is None:
        return "n/a"
    return f"{n / 2**20:.2f} MiB"


def fmt_bytes(n: int | None) -> str:
    """``1,234,567 (1.18 MiB)``: exact bytes with a readable size."""
    if n is None:
        return "n/a"
    human = gib(n) if abs(n) >= 2**30 else mib(n)
    return f"{n:,} ({human})"


def pct(a: float, b: float) -> str:
    """Relative difference of a from b, in percent with sign."""
    if b == 0:
        return "n/a"
    return f"{100.0 * (a - b) / b:+.3f}%"


def section(name: str, title: str, body: str) -> str:
    return f"<!-- BEGIN {name} -->\n## {title}\n\n{body.strip()}\n<!-- END {name} -->"


def header_lines(extra: Sequence[str] = ()) -> str:
    lines = [
        f"- Command: `{command()}`",
        f"- Date: {today()}",
        f"- Machine: {machine()}",
        f"- Code: {source()}",
        *extra,
    ]
    return "\n".join(lines)


_ORDER = (
    "summary",
    "sim_speed",
    "cpu_overhead",
    "cpu_overhead_threads1",
    "cpu_overhead_b4_s256",
    "agreement",
    "fsdp_scale",
    "fsdp_agreement",
    "plan_speed",
)


def write_section(name: str, text: str, doc: Path = DOC) -> None:
    """Replace (or add) the section ``name`` in ``doc`` (``docs/benchmarks.md`` by default).

    Every byte outside that section stays as it was: text between or after the marked
    sections (a hand-written section) is kept. A new section goes before the first
    section that :data:`_ORDER` puts after it, else at the end.
    """
    doc.parent.mkdir(parents=True, exist_ok=True)
    current = doc.read_text() if doc.exists() else DOC_HEADER
    # names may hold hyphens (speed-commands): a \w+ pattern dropped those sections on every write
    pat = re.compile(r"<!-- BEGIN ([\w-]+) -->.*?<!-- END \1 -->", re.S)
    found = {m.group(1): m for m in pat.finditer(current)}
    if name in found:
        m = found[name]
        out = current[: m.start()] + text + current[m.end() :]
    else:
        later = [found[n] for n in _ORDER[_ORDER.index(name) + 1 :] if n in found] if name in _ORDER else []
        if later:
            at = min(m.start() for m in later)
            out = current[:at] + text + "\n\n" + current[at:]
        else:
            out = current.rstrip() + "\n\n" + text + "\n"
    doc.write_text(out)


def publish(
    name: str, title: str, body: str, *, write: bool, doc: Path = DOC, header: str = DOC_HEADER
) -> str:
    """Print a section; with ``write``, put it in ``doc`` (created with ``header`` when missing)."""
    text = section(name, title, body)
    print(text)
    if write:
        if not doc.exists():
            doc.parent.mkdir(parents=True, exist_ok=True)
            doc.write_text(header)
        write_section(name, text, doc=doc)
        log(f"wrote section {name} to {doc}")
    return text


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)
