"""Startup cost: what memprof adds to a pytest run that never uses it, and how long ``memprof --help`` takes.

Two measurements, each a set of whole processes run side by side, interleaved
repeat by repeat (the order rotates each repeat), after one untimed warm-up run
of each:

- ``pytest -q`` on a one-test project that does not use memprof, with memprof's
  pytest plugin loaded (it is installed: entry point ``pytest11``) and with it
  blocked (``-p no:memprof``). The difference is what a project pays for having
  memprof installed. With ``--before REV``, the plugin of this checkout at ``REV``
  (``git archive``) is run beside it.
- ``memprof --help`` (``python -m memprof --help``), beside ``python -c pass``,
  ``python -c "import memprof"`` and ``python -c "import torch"`` for scale.

Every process runs with ``PYTHONPATH`` set to this checkout, so the memprof timed
is this one whatever the virtualenv's editable install points at; a check run
first confirms the plugin came from here and the project's test saw no torch.
Times are wall clock and the child's CPU time (user + system, from
``getrusage``), in milliseconds.

Usage::

    .venv/bin/python bench/startup.py [--repeats 20] [--help-repeats 10] [--before REV] [--write]

It prints the section; ``--write`` also puts it in ``docs/benchmarks.md``.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C

#: modules a process that never uses memprof's library should not have loaded
HEAVY = ("torch", "transformers", "memprof.api")

#: the one-test project: it checks that memprof's plugin is loaded from this checkout and torch is not
PROJECT_TEST = f"""\
import os, sys

def test_one(request):
    if os.environ.get("STARTUP_CHECK"):
        plugin = request.config.pluginmanager.get_plugin("memprof")
        print("plugin:", plugin.__file__ if plugin else None)
        print("heavy:", ", ".join(m for m in {HEAVY!r} if m in sys.modules) or "none")
    assert 1 + 1 == 2
"""


class ChildTiming(C.Timing):
    """Wall and CPU seconds of a child process (``C.Timing`` times this process instead)."""

    def run(self, fn: Callable[[], object]) -> object:
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        w0 = time.perf_counter()
        out = fn()
        w1 = time.perf_counter()
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        self.wall.append(w1 - w0)
        self.cpu.append(after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime)
        return out

    def spread(self) -> str:
        return f"{1000 * min(self.wall):.0f} - {1000 * max(self.wall):.0f}"


def runner(argv: Sequence[str], cwd: Path, env: dict[str, str], code: int = 0) -> Callable[[], None]:
    def fn() -> None:
        p = subprocess.run(list(argv), cwd=cwd, env=env, capture_output=True, text=True, check=False)
        if p.returncode != code:
            raise RuntimeError(f"{' '.join(argv)} exited {p.returncode}:\n{p.stdout}{p.stderr}")

    return fn


def environment(pythonpath: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTEST_ADDOPTS")}
    env["PYTHONPATH"] = str(pythonpath)
    env.pop("PYTEST_DISABLE_PLUGIN_AUTOLOAD", None)
    return env


def measure(variants: Sequence[tuple[str, Callable[[], None]]], repeats: int) -> list[ChildTiming]:
    timings = [ChildTiming(name) for name, _ in variants]
    for t, (_, fn) in zip(timings, variants):
        C.log(f"  warm-up {t.name}")
        fn()
    C.interleave([(t, fn) for t, (_, fn) in zip(timings, variants)], repeats, C.log)
    return timings


def differences(a: ChildTiming, b: ChildTiming) -> tuple[list[float], list[float]]:
    """Per-repeat differences a - b (wall, cpu), in milliseconds."""
    return (
        [1000 * (x - y) for x, y in zip(a.wall, b.wall)],
        [1000 * (x - y) for x, y in zip(a.cpu, b.cpu)],
    )


def ms(values: Sequence[float]) -> str:
    return f"{statistics.median(values):+.0f} ({min(values):+.0f} to {max(values):+.0f})"


def check_project(python: str, project: Path, env: dict[str, str], root: Path) -> tuple[str, str]:
    """Run the project once with the plugin; return the plugin's file (under ``root``) and the heavy modules the test saw."""
    p = subprocess.run(
        [python, "-m", "pytest", "-q", "-s"],
        cwd=project,
        env={**env, "STARTUP_CHECK": "1"},
        capture_output=True,
        text=True,
        check=False,
    )
    lines = [
        ln.split(":", 1)[1].strip() for ln in p.stdout.splitlines() if ln.startswith(("plugin:", "heavy:"))
    ]
    if p.returncode != 0 or len(lines) != 2:
        raise RuntimeError(f"the check run failed:\n{p.stdout}{p.stderr}")
    plugin, heavy = lines
    if not plugin.startswith(str(root)):
        raise RuntimeError(f"memprof's plugin was loaded from {plugin}, not from {root}")
    return str(Path(plugin).relative_to(root)), heavy


def help_modules(python: str, env: dict[str, str]) -> str:
    """The heavy modules loaded by ``memprof --help`` (the console script's entry)."""
    code = (
        "import sys\nsys.argv = ['memprof', '--help']\nfrom memprof.__main__ import run\ntry:\n    run()\n"
        "except SystemExit:\n    pass\n"
        f"print('heavy:', ', '.join(m for m in {HEAVY!r} if m in sys.modules) or 'none')"
    )
    p = subprocess.run([python, "-c", code], env=env, capture_output=True, text=True, check=True)
    return p.stdout.splitlines()[-1].split(":", 1)[1].strip()


def plugin_import_ms(python: str, env: dict[str, str], repeats: int) -> list[float]:
    """Milliseconds to import memprof's plugin once pytest is loaded, in ``repeats`` fresh interpreters."""
    code = (
        "import time, pytest\nt = time.perf_counter()\nimport memprof.pytest_plugin\n"
        "print(1000 * (time.perf_counter() - t))"
    )
    out = []
    for _ in range(repeats):
        p = subprocess.run([python, "-c", code], env=env, capture_output=True, text=True, check=True)
        out.append(float(p.stdout.strip()))
    return out


def export(rev: str, into: Path) -> str:
    """``memprof/`` of this checkout at ``rev``, unpacked under ``into``; returns the short commit."""
    short = subprocess.run(
        ["git", "rev-parse", "--short", rev], cwd=C.REPO, capture_output=True, text=True, check=True
    ).stdout.strip()
    archive = subprocess.run(
        ["git", "archive", rev, "memprof", "configs"], cwd=C.REPO, capture_output=True, check=True
    )
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive.stdout, check=True)
    return short


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=20, help="repeats of each pytest run (default 20)")
    ap.add_argument(
        "--help-repeats", type=int, default=10, help="repeats of each interpreter run (default 10)"
    )
    ap.add_argument("--before", help="also time the pytest plugin of this checkout at this git revision")
    ap.add_argument(
        "--commands",
        action="store_true",
        help="only time the commands that answer before torch loads (recipes, validate, a bad "
        "argument, a MODEL that names nothing), here and at --before REV",
    )
    ap.add_argument("--write", action="store_true", help="also write the section into docs/benchmarks.md")
    args = ap.parse_args()

    python = sys.executable
    env = environment(C.REPO)
    if args.commands:
        return commands(python, args)
    with tempfile.TemporaryDirectory(prefix="memprof-startup-") as tmp:
        project = Path(tmp) / "project"
        project.mkdir()
        (project / "test_one.py").write_text(PROJECT_TEST)
        plugin, heavy = check_project(python, project, env, C.REPO)
        check = (
            f"plugin `{plugin}` loaded from this checkout; heavy modules loaded when the test ran: {heavy}"
        )
        C.log(f"check run: {check}")

        pytest = [python, "-m", "pytest", "-q"]
        variants = [
            ("`pytest -q` (memprof's plugin loaded)", runner(pytest, project, env)),
            ("`pytest -q -p no:memprof`", runner([*pytest, "-p", "no:memprof"], project, env)),
        ]
        before = None
        if args.before:
            old = Path(tmp) / "before"
            old.mkdir()
            before = export(args.before, old)
            _, heavy_before = check_project(python, project, environment(old), old)
            check += f"; at {before}: {heavy_before}"
            C.log(f"check run at {before}: {heavy_before}")
            variants.append(
                (
                    f"`pytest -q`, memprof at {before} (plugin loaded)",
                    runner(pytest, project, environment(old)),
                )
            )
        importing = plugin_import_ms(python, env, args.repeats)
        C.log(f"importing the plugin: {statistics.median(importing):.1f} ms")
        C.log(f"pytest: {len(variants)} variants x {args.repeats} repeats")
        plug = measure(variants, args.repeats)

        cli = [
            ("`python -c pass`", [python, "-c", "pass"]),
            ('`python -c "import memprof"`', [python, "-c", "import memprof"]),
            ('`python -c "import torch"`', [python, "-c", "import torch"]),
            ("`memprof --help` (`python -m memprof --help`)", [python, "-m", "memprof", "--help"]),
        ]
        C.log(f"interpreters: {len(cli)} variants x {args.help_repeats} repeats")
        loaded_by_help = help_modules(python, env)
        C.log(f"memprof --help loads: {loaded_by_help}")
        procs = measure([(name, runner(argv, project, env)) for name, argv in cli], args.help_repeats)

    base = plug[1]
    rows = []
    for t in plug:
        dw, dc = differences(t, base)
        same = t is base
        rows.append(
            [
                t.name,
                f"{1000 * t.wall_median:.0f}",
                t.spread(),
                f"{1000 * t.cpu_median:.0f}",
                "(the reference)" if same else ms(dw),
                "(the reference)" if same else ms(dc),
            ]
        )
    table_a = C.md_table(
        [
            "run (one-test project)",
            "wall ms (median)",
            "wall ms min - max",
            "CPU ms (median)",
            "wall ms vs `-p no:memprof` (median, min to max)",
            "CPU ms vs `-p no:memprof`",
        ],
        rows,
        "lrrrrr",
    )
    torch_t = procs[2]
    rows_b = []
    for t in procs:
        w, c = C.pair_ratios(t, torch_t)
        rows_b.append(
            [
                t.name,
                f"{1000 * t.wall_median:.0f}",
                t.spread(),
                f"{1000 * t.cpu_median:.0f}",
                "1 (the reference)" if t is torch_t else f"{w:.2f}",
            ]
        )
    table_b = C.md_table(
        [
            "process",
            "wall ms (median)",
            "wall ms min - max",
            "CPU ms (median)",
            "wall vs `import torch` (median of per-repeat ratios)",
        ],
        rows_b,
        "lrrrr",
    )

    extra = [
        f"- Repeats: {args.repeats} of each pytest run, {args.help_repeats} of each interpreter run, "
        "interleaved, after one untimed warm-up run each",
        f"- Check run: {check}",
        f"- Interpreter: `{python}`, `PYTHONPATH` set to this checkout for every process",
    ]
    dwall, dcpu = differences(plug[0], base)
    body = (
        C.header_lines(extra)
        + "\n\n### A pytest run that does not use memprof\n\n"
        + table_a
        + f"\n\nWith memprof installed, `pytest -q` took {statistics.median(dwall):+.0f} ms wall and "
        f"{statistics.median(dcpu):+.0f} ms CPU (medians of the per-repeat differences) beside the same run "
        "with the plugin blocked; the goal is under 50 ms. Single runs on this shared machine vary by more "
        "than that (the min - max columns), so the import itself was also timed: in "
        f"{len(importing)} fresh interpreters with pytest loaded, `import memprof.pytest_plugin` took "
        f"{statistics.median(importing):.1f} ms (median; {min(importing):.1f} - {max(importing):.1f}). "
        "Loading the plugin imports pytest (already loaded) and memprof's package face, "
        "which imports its names on first use; torch, transformers and memprof's library load "
        "only when a test records a step with the `memprof` fixture."
        + (
            f" The row for {before} is the same run with memprof's code at that commit "
            f"(the modules its test saw loaded: {heavy_before})."
            if before
            else ""
        )
        + "\n\n### `memprof --help`\n\n"
        + table_b
        + "\n\n`memprof --help` prints the top-level page from stubs with the real commands' names and "
        "help lines (`memprof.clihelp`; a test keeps the two pages identical), so it imports none of the "
        f"commands; of {', '.join(HEAVY)} it loads: {loaded_by_help}. A command's own page "
        "(`memprof analyze --help`) still imports its module, and torch with it."
    )
    C.publish("startup", "Startup: pytest with memprof installed, `memprof --help`", body, write=args.write)
    return 0


NOTE = "These commands import neither torch nor transformers now: the optimizations, recipes and command modules load the library only inside the functions that run a step, after the arguments are checked (tests/cli/test_answers_before_torch.py checks it). Nor does a MODEL that names nothing (`memprof analyze no-such-model`) or a config.json that is not one; a Hub id, a config whose model_type transformers must judge, and a line whose first error needs the library (`--shard`, `--step` with `--budget`) still load it."

#: commands that answer from their arguments alone: (label, arguments, exit code)
COMMANDS = [
    ("`memprof recipes`", ["recipes"], 0),
    (
        "`memprof recipes validate configs/recipes/low-memory-finetune.yaml`",
        ["recipes", "validate", "configs/recipes/low-memory-finetune.yaml"],
        0,
    ),
    ("`memprof analyze gpt2 --budget lots` (exit 2)", ["analyze", "gpt2", "--budget", "lots"], 2),
    ("`memprof analyze no-such-model` (exit 2)", ["analyze", "no-such-model"], 2),
]


def commands(python: str, args: argparse.Namespace) -> int:
    """Time the commands of COMMANDS at this checkout and, with ``--before``, at that revision."""
    with tempfile.TemporaryDirectory(prefix="memprof-startup-") as tmp:
        trees = [("this checkout", C.REPO)]
        if args.before:
            old = Path(tmp) / "before"
            old.mkdir()
            trees.append((f"at {export(args.before, old)}", old))
        variants = []
        for label, argv, code in COMMANDS:
            for where, root in trees:
                variants.append(
                    (
                        f"{label}, {where}",
                        runner([python, "-m", "memprof", *argv], root, environment(root), code),
                    )
                )
        C.log(f"commands: {len(variants)} variants x {args.help_repeats} repeats")
        timings = measure(variants, args.help_repeats)
    rows = [
        [t.name, f"{1000 * t.wall_median:.0f}", t.spread(), f"{1000 * t.cpu_median:.0f}"] for t in timings
    ]
    table = C.md_table(["command", "wall ms (median)", "wall ms min - max", "CPU ms (median)"], rows, "lrrr")
    extra = [
        f"- Repeats: {args.help_repeats} of each, interleaved, after one untimed warm-up run each",
        f"- Interpreter: `{python}` (`python -m memprof`), `PYTHONPATH` set to the code timed, run in the folder of the code timed (`python -m` puts it first on `sys.path`)",
    ]
    body = C.header_lines(extra) + "\n\n" + table + "\n\n" + NOTE
    C.publish("startup-commands", "Startup: commands that answer before torch loads", body, write=args.write)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
