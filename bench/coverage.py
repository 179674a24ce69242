"""Coverage: which model families memprof profiles, on which engines, and how close the sim is.

Runs the matrix of ``tests/test_coverage.py`` (the families of ``tests/families.py``,
float32, eager attention, AdamW, a tiny batch) and writes ``docs/coverage.md``:
per family the model type, the transformers class built, whether sim training,
sim inference and cpu training run, the sim's peak against the cpu engine's (as
shipped, and with CPU semantics: the trace-fidelity check), the seconds taken, and
what is not supported and why.

Usage::

    .venv/bin/python bench/coverage.py [--only NAME ...] [--no-write] [--json PATH]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import _common as C

DOC = C.REPO / "docs" / "coverage.md"
HEADER = """# Coverage: model families and engines

`bench/coverage.py` runs one tiny config per model family (`tests/families.py`)
through the engines, as `tests/test_coverage.py` checks them, and writes the
section below. Rerun with the command given in it (from the repository root).
"""


def load_families() -> ModuleType:
    """tests/families.py as a module (the matrix the tests check)."""
    spec = importlib.util.spec_from_file_location("coverage_families", C.REPO / "tests" / "families.py")
    if spec is None or spec.loader is None:
        raise RuntimeError("tests/families.py not found")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _error(e: BaseException) -> str:
    first = str(e).splitlines()[0] if str(e) else ""
    return f"{type(e).__name__}: {first[:160]}"


def run_family(fam: ModuleType, name: str, tmp: Path, log: Callable[[str], None] = C.log) -> dict[str, Any]:
    """Every variant of one family: peaks, errors, seconds, and the differences from the cpu engine."""
    from memprof.api import fake_model
    from memprof.models import resolve
    from memprof.workload import Workload

    t0 = time.perf_counter()
    cfg = fam.FAMILIES[name]
    row: dict[str, Any] = {
        "family": name,
        "model_type": cfg["model_type"],
        "pending": fam.PENDING.get(name),
        "runs": {},
    }
    try:
        rm = resolve(str(fam.write_config(name, tmp)))
        row["model_type"] = rm.model_type
        wl = Workload(mode="infer", batch_size=fam.BATCH_SIZE, seq_len=fam.SEQ_LEN, attn="eager")
        row["class"] = type(fake_model(rm, wl)).__name__
    except Exception as e:
        row["error"] = _error(e)
        row["seconds"] = time.perf_counter() - t0
        return row
    for variant in fam.VARIANTS:
        t = time.perf_counter()
        try:
            p = fam.run(rm, variant)
            run = {"ok": True, "peak_bytes": p.peak_bytes}
        except Exception as e:
            run = {"ok": False, "error": _error(e)}
        run["seconds"] = round(time.perf_counter() - t, 2)
        row["runs"][variant] = run
        log(f"  {name} {variant}: {run.get('peak_bytes', run.get('error'))} ({run['seconds']} s)")
    cpu = row["runs"]["cpu_train"].get("peak_bytes")
    for variant, key in (
        ("sim_train", "sim_vs_cpu_pct"),
        ("sim_cpu_semantics_train", "sim_cpu_semantics_vs_cpu_pct"),
    ):
        sim = row["runs"][variant].get("peak_bytes")
        row[key] = 100.0 * (sim - cpu) / cpu if cpu and sim else None
    row["seconds"] = round(time.perf_counter() - t0, 2)
    return row


def _mark(run: dict[str, Any] | None) -> str:
    if run is None:
        return "n/a"
    return "yes" if run["ok"] else "**no**"


def _pct(v: float | None) -> str:
    return "n/a" if v is None else f"{v:+.2f}%"


def render(
    rows: Sequence[dict[str, Any]], missing: Sequence[str], agreement_pct: float, seconds: float
) -> str:
    """The section's body: the table, then what is not supported and why."""
    table = []
    for r in rows:
        runs = r["runs"]
        table.append(
            [
                f"`{r['family']}`",
                f"`{r['model_type']}`",
                f"`{r.get('class', 'n/a')}`",
                _mark(runs.get("sim_train")),
                _mark(runs.get("sim_infer")),
                _mark(runs.get("cpu_train")),
                _pct(r.get("sim_vs_cpu_pct")),
                _pct(r.get("sim_cpu_semantics_vs_cpu_pct")),
                f"{r['seconds']:.1f}",
            ]
        )
    ok = [
        r["family"]
        for r in rows
        if r.get("sim_cpu_semantics_vs_cpu_pct") is not None
        and abs(r["sim_cpu_semantics_vs_cpu_pct"]) < agreement_pct
    ]
    lines = [
        C.header_lines(),
        "",
        "Each family: a tiny config (`tests/families.py`: 2 layers, hidden size 64, a 256-token vocabulary, "
        "32-pixel images), float32, eager attention, AdamW, batch 2 x 16 tokens. *sim train / sim infer*: the "
        "sim engine as shipped runs the step; *cpu train*: the cpu engine (a real CPU step) runs it. *sim vs "
        "cpu*: the shipped sim's peak against the cpu engine's; it projects a CUDA GPU (512-byte allocator "
        "blocks, foreach AdamW, CUDA's SDPA kernels), so it is higher by design, most where tiny models have "
        "many small tensors and the optimizer step holds the peak (foreach AdamW's one parameter-sized "
        "temporary). *sim, CPU semantics vs cpu*: the sim with exact bytes, the CPU's AdamW loop and SDPA as "
        "the CPU dispatches it, against the cpu engine: how faithfully the fake-tensor trace follows the real "
        f"step (the test's bound: {agreement_pct:g}%).",
        "",
        C.md_table(
            [
                "family",
                "model_type",
                "transformers class",
                "sim train",
                "sim infer",
                "cpu train",
                "sim vs cpu",
                "sim, CPU semantics vs cpu",
                "seconds",
            ],
            table,
            "llllllrrr",
        ),
        "",
        f"Trace fidelity: {len(ok)} of {len(rows)} families within {agreement_pct:g}% with CPU semantics.",
        "",
        "### Not supported, and why",
        "",
    ]
    gaps = []
    for r in rows:
        if "error" in r:
            gaps.append(f"- `{r['family']}`: the config does not resolve or build: {r['error']}")
            continue
        failed = {v: run["error"] for v, run in r["runs"].items() if not run["ok"]}
        if failed:
            why = "; ".join(f"{v}: `{e}`" for v, e in failed.items())
            pending = f" ({r['pending']})" if r.get("pending") else ""
            gaps.append(f"- `{r['family']}`{pending}: {why}")
        elif r["family"] not in ok:
            gaps.append(
                f"- `{r['family']}`: every step runs, but the sim with CPU semantics differs from the cpu engine "
                f"by {_pct(r.get('sim_cpu_semantics_vs_cpu_pct'))} (a trace-fidelity gap)"
            )
    for name in missing:
        gaps.append(f"- `{name}`: the installed transformers has no such model type")
    lines += gaps or ["- nothing: every family runs on every engine."]
    lines += [
        "",
        "Not covered by this matrix: GPU measurements (no GPU here; `bench/validate.py --engine cuda` on a GPU), "
        "bfloat16 and autocast steps, SDPA and flash attention, and families not in `tests/families.py`.",
        "",
        f"Whole script: {seconds:.0f} s.",
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--only", nargs="+", metavar="NAME", help="run these families only (the doc is not written)"
    )
    ap.add_argument("--no-write", action="store_true", help=f"do not write {DOC.relative_to(C.REPO)}")
    ap.add_argument("--json", metavar="PATH", help="also write the rows as JSON")
    args = ap.parse_args(argv)
    C.quiet()
    from memprof.cli.common import quiet_libraries

    quiet_libraries()
    fam = load_families()
    names = list(fam.available())
    if args.only:
        unknown = set(args.only) - set(fam.FAMILIES)
        if unknown:
            ap.error(f"unknown famil{'y' if len(unknown) == 1 else 'ies'}: {', '.join(sorted(unknown))}")
        names = [n for n in names if n in args.only]
    agreement = fam.AGREEMENT_PCT
    t0 = time.perf_counter()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            C.log(f"{name}")
            rows.append(run_family(fam, name, Path(tmp)))
    seconds = time.perf_counter() - t0
    body = render(rows, fam.missing(), agreement, seconds)
    C.publish(
        "coverage",
        "Coverage: families x engines",
        body,
        write=not args.no_write and not args.only,
        doc=DOC,
        header=HEADER,
    )
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
        C.log(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
