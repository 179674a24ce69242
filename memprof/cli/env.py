"""``memprof env``: what the measurement depends on, and which engines can run here."""

from __future__ import annotations

import platform

import typer
from rich.table import Table

from memprof.cli.common import check_outputs, stdout_console, write_output
from memprof.units import format_bytes


def collect() -> dict:
    import torch
    import transformers

    from memprof._version import __version__
    from memprof.engines.cuda import nvml_snapshot

    info: dict = {
        "memprof": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "gpus": [],
    }
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            free, total = torch.cuda.mem_get_info(i)
            nv = nvml_snapshot(i) or {}
            info["gpus"].append(
                {
                    "index": i,
                    "name": torch.cuda.get_device_name(i),
                    "total_bytes": int(total),
                    "free_bytes": int(free),
                    "driver_version": nv.get("driver_version"),
                    "capability": ".".join(map(str, torch.cuda.get_device_capability(i))),
                }
            )
    info["engines"] = (["cuda"] if info["gpus"] else []) + ["cpu", "sim"]
    return info


def env(
    json_path: str | None = typer.Option(None, "--json", help="Write as JSON to PATH ('-' for stdout)."),
    force: bool = typer.Option(False, "--force", help="Replace an existing --json file."),
) -> int:
    """Print torch, CUDA and driver versions, the GPUs and the engines available here."""
    import json

    check_outputs(force, json=json_path)  # before torch loads (2 s), like every command
    info = collect()
    if json_path:
        write_output(json_path, json.dumps(info, indent=2))
        if json_path == "-":
            return 0
    c = stdout_console()
    t = Table.grid(padding=(0, 2))
    t.add_column(style="bold")
    t.add_column()
    for k in ("memprof", "python", "torch", "transformers"):
        t.add_row(k, str(info[k]))
    t.add_row("CUDA (torch build)", str(info["torch_cuda"] or "none: CPU-only build"))
    c.print(t)
    if info["gpus"]:
        g = Table(title="GPUs")
        for col in ("#", "name", "capability", "total", "free", "driver"):
            g.add_column(col)
        for gpu in info["gpus"]:
            g.add_row(
                str(gpu["index"]),
                gpu["name"],
                gpu["capability"],
                format_bytes(gpu["total_bytes"]),
                format_bytes(gpu["free_bytes"]),
                str(gpu["driver_version"]),
            )
        c.print(g)
    else:
        c.print(
            "No GPU: the cuda engine is unavailable; cpu (a real CPU step) and sim (a projected GPU step) remain."
        )
    c.print("Engines available: " + ", ".join(info["engines"]))
    return 0
