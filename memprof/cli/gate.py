"""``memprof baseline`` and ``memprof check``: the memory-regression gate for CI."""

from __future__ import annotations

import json
import os
from enum import Enum
from pathlib import Path

import typer

from memprof import gate
from memprof.cli import options as O
from memprof.cli.common import (
    check_outputs,
    model_input,
    on_stdout,
    recipe_input,
    spinner,
    stdout_console,
    write_output,
)
from memprof.cli.compare import RECIPE, STEP
from memprof.errors import EnvironmentProblem, ExitCode, InputError
from memprof.files import check_outputs_apart, write_error

#: exit code of `memprof check` when a workload's peak grew beyond the tolerance


def workload_inputs(workloads: list[gate.GateWorkload]) -> dict[str, Path]:
    """The model configs and recipes the workloads read, for :func:`memprof.files.check_outputs_apart`."""
    found: dict[str, Path] = {}
    for w in workloads:
        found.update(model_input(w.model, f"workload {w.name}"))
        found.update(recipe_input(w.recipe, f"workload {w.name}"))
    return found


class Format(str, Enum):
    text = "text"
    json = "json"
    junit = "junit"
    github = "github"


def baseline(
    model: str | None = typer.Argument(
        None, help="MODEL spec of one workload (or use --workloads / --update)."
    ),
    output: Path = typer.Option(
        ...,
        "--output",
        "-o",
        help="Baseline file to write (JSON); an existing one is refused unless --force (--update rewrites it: "
        "that is what it is for).",
    ),
    workloads: Path | None = typer.Option(
        None,
        "--workloads",
        exists=True,
        dir_okay=False,
        help="YAML or TOML file of workloads (or a pyproject.toml with [tool.memprof]).",
    ),
    update: bool = typer.Option(
        False, "--update", help="Re-profile the workloads of the existing --output file and rewrite it."
    ),
    name: str | None = typer.Option(
        None, "--name", help="Name of the one workload (default: model-mode-bB-sS)."
    ),
    recipe: str | None = RECIPE,
    step: list[str] | None = STEP,
    mode: O.Mode = O.MODE,
    batch_size: int = O.BATCH,
    seq_len: int = O.SEQ,
    dtype: O.DType = O.DTYPE,
    optimizer: O.Optim = O.OPTIM,
    attn: O.Attn = O.ATTN,
    engine: O.EngineName = typer.Option(
        O.EngineName.sim,
        "--engine",
        "-e",
        help="sim (deterministic, no GPU; the default here), cpu, cuda, auto.",
    ),
    task: O.Task | None = O.TASK,
    decode_tokens: int = O.DECODE,
    moe_routing: O.MoeRouting = O.MOE_ROUTING,
    experts: O.Experts = O.EXPERTS,
    gpu: str | None = O.GPU,
    force: bool = typer.Option(False, "--force", help="Replace an existing --output file."),
) -> int:
    """Profile workloads and record their memory as a baseline for `memprof check`."""
    preset = O.gpu(gpu)
    given = sum(x for x in (model is not None, workloads is not None, update))
    if given != 1:
        raise InputError("give exactly one of: a MODEL, --workloads FILE, or --update (with --output)")
    # --update rewrites the file it reads (atomically): overwriting is its purpose
    check_outputs(
        force or update,
        output=output,
        not_streams=["output"],  # a file check reads, and the lines below are stdout
        inputs={
            **model_input(model),
            **recipe_input(recipe),
            "the workloads file (--workloads)": workloads,
        },
    )
    if model is not None:
        wl = O.workload(
            mode,
            batch_size,
            seq_len,
            dtype,
            optimizer,
            attn,
            task,
            decode_tokens,
            moe_routing=moe_routing,
            experts=experts,
        )
        name = name or gate.default_name(model, wl)
        bad_name = gate.name_problem(name)
        if bad_name:
            raise InputError(f"--name: {bad_name}")
        ws = [
            gate.GateWorkload(
                name=name,
                model=model,
                workload=wl,
                engine=engine.value,
                recipe=recipe,
                steps=list(step or []),
                gpu=preset.name if preset is not None else None,
            )
        ]
    elif preset is not None:
        raise InputError(
            "--gpu applies to the one MODEL workload; in a --workloads file give each entry a 'gpu' key"
        )
    elif workloads is not None:
        ws = gate.read_workloads(workloads)
    else:
        ws = gate.load_baseline(output).workloads
    check_outputs_apart({"--output": output}, workload_inputs(ws))
    gate.check_models(ws, "workloads")  # before the library loads, where every MODEL names nothing
    with spinner() as progress:
        b = gate.record(ws, progress=progress)
    try:
        b.write(output)
    except OSError as e:  # checked before the run; a full disk is still possible
        raise write_error(output, e) from None
    c = stdout_console()
    for w, p in zip(b.workloads, b.profiles):
        c.print(f"{w.name:<32} peak {p.peak_bytes:>16,} B  ({p.engine} engine, peak in {p.peak_phase})")
    c.print(
        f"Wrote {output} ({len(b.workloads)} workload(s)); check it with: memprof check --baseline {output}"
    )
    return 0


def check(
    baseline: Path = typer.Option(..., "--baseline", "-b", help="Baseline file written by memprof baseline."),
    tolerance: str = typer.Option(
        gate.DEFAULT_TOLERANCE,
        "--tolerance",
        help="Allowed growth of a peak: a percentage (2%) or a size (50MiB).",
    ),
    fmt: Format = typer.Option(
        Format.text, "--format", help="text, json, junit (XML) or github (annotations)."
    ),
    output: str | None = typer.Option(
        None, "--output", "-o", help="Write the json/junit report to this file (default: stdout)."
    ),
    junit_path: str | None = typer.Option(
        None, "--junit", help="Also write a JUnit XML report to this file (whatever --format says)."
    ),
    html_path: str | None = O.HTML,
    force: bool = O.FORCE,
    strict_versions: bool = typer.Option(
        False,
        "--strict-versions",
        help="Fail (exit 3) when torch/transformers/memprof differ from the baseline's.",
    ),
) -> int:
    """Profile the baseline's workloads again; exit 5 when a peak grew beyond the tolerance."""
    tol = gate.Tolerance.parse(tolerance)
    if output is not None and fmt not in (Format.json, Format.junit):
        # the text report and the annotations go to stdout: a file named here would never be written
        raise InputError(
            f"--output writes the json or junit report; give --format json or junit with it "
            f"(--format {fmt.value} prints to stdout)"
        )
    # the text report stays off stdout when --junit - or --html - takes it; the others are outputs
    report_out = fmt is Format.github or (fmt in (Format.json, Format.junit) and output is None)
    check_outputs(
        force,
        output=output,
        junit=junit_path,
        html=html_path,
        stdout=f"--format {fmt.value}" if report_out else None,
        inputs={"the baseline (--baseline)": baseline},
    )
    # the library (torch, transformers) loads once the arguments are known to be good
    from memprof.report import gate as render

    b = gate.load_baseline(baseline)
    check_outputs_apart(
        {"--output": output, "--junit": junit_path, "--html": html_path}, workload_inputs(b.workloads)
    )
    with spinner() as progress:
        rep = gate.check(b, tol, baseline_path=str(baseline), progress=progress)
    if fmt is Format.text:
        if not on_stdout(junit_path, html_path):
            render.render_text(rep, stdout_console())
    elif fmt is Format.json:
        write_output(output or "-", json.dumps(rep.to_dict(), indent=2))
    elif fmt is Format.junit:
        write_output(output or "-", render.junit(rep))
    else:
        annotations, summary = render.github(rep)
        print(annotations, end="")
        path = os.environ.get("GITHUB_STEP_SUMMARY")
        if path:
            with open(path, "a", encoding="utf-8") as f:
                f.write(summary)
        else:
            print(summary, end="")
    if junit_path:
        write_output(junit_path, render.junit(rep))
    if html_path:
        from memprof.report.html import check_html

        write_output(html_path, check_html(rep))
    if strict_versions and rep.version_changes:
        raise EnvironmentProblem(
            "versions differ from the baseline's: "
            + ", ".join(f"{k} {a} -> {b2}" for k, (a, b2) in rep.version_changes.items())
            + " (refresh the baseline, or drop --strict-versions)"
        )
    return ExitCode.REGRESSION if rep.regressions else ExitCode.OK
