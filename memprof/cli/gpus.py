"""``memprof gpus``: the GPU presets ``--gpu NAME`` knows, with their sources."""

from __future__ import annotations

import typer
from rich.table import Table

from memprof.cli.common import stdout_console
from memprof.gpus import PRESETS
from memprof.units import format_bytes


def gpus(
    sources: bool = typer.Option(False, "--sources", help="Also print each preset's source."),
) -> int:
    """List the GPU presets of --gpu: compute capability, memory, CUDA context estimate, bandwidth, host link."""
    t = Table(title="GPU presets (--gpu NAME; case, spaces and dashes do not matter)", title_justify="left")
    for col in (
        "name",
        "sm",
        "memory (nvidia-smi)",
        "context",
        "usable",
        "bandwidth",
        "host link",
    ):
        t.add_column(col, justify="right" if col not in ("name", "host link") else "left")
    for p in PRESETS:
        t.add_row(
            p.name,
            p.sm,
            f"{p.memory_bytes // 2**20} MiB",
            format_bytes(p.context_bytes, 0) + (" (measured)" if p.context_measured else ""),
            format_bytes(p.usable_bytes),
            f"{p.memory_bandwidth_gbps:g} GB/s",
            f"{p.host_link} ({p.host_link_gbps:g} GB/s)",
        )
    c = stdout_console()
    c.print(t)
    c.print(
        "[dim]memory: the total nvidia-smi reports; context: the CUDA context and libraries, memprof's estimate "
        "unless marked measured (memprof's cuda engine on that GPU; the H200 measured 758 MiB against an "
        "estimate of 512, so the estimates are likely low; --context-overhead overrides it, memprof analyze "
        "--engine cuda measures yours); "
        "host link: PCIe x16, theoretical per direction.[/dim]"
    )
    c.print(
        "[dim]also accepted: "
        + "; ".join(f"{p.name}: {', '.join(p.aliases)}" for p in PRESETS if p.aliases)
        + "[/dim]"
    )
    if sources:
        for p in PRESETS:
            c.print(f"{p.name}: {p.source}")
    return 0
