"""Hostile files and interrupted runs (issue 17): outputs checked before any work, never
clobbered without --force, written whole or not at all; apply --force never leaves its
destination half-replaced; Ctrl-C and SIGTERM at any moment are one line, exit 130.
"""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import memprof.apply as apply_mod
from memprof import files
from memprof.cli import main
from tests.conftest import REPO, TINY

LLAMA = str(TINY / "llama.json")
SIM = ["-e", "sim", "-b", "1", "-s", "8"]
APPLY = ["apply", LLAMA, "--step", "checkpointing", "--no-profile", "-e", "sim"]
#: what apply writes for a config (no weights)
NEW_FILES = {"config.json", "memprof.json", "README.md"}
needs_proc = pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs Linux /proc")


def one_error_line(err: str) -> str:
    lines = err.splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.fixture
def no_work(monkeypatch):
    """Any command that starts its work (a spinner, apply's model preparation) fails the test."""
    import memprof.cli.analyze
    import memprof.cli.compare
    import memprof.cli.gate
    import memprof.cli.plan

    def started(*a, **k):
        raise AssertionError("the work started before the output paths were checked")

    for mod in (memprof.cli.analyze, memprof.cli.compare, memprof.cli.gate, memprof.cli.plan):
        monkeypatch.setattr(mod, "spinner", started)
    monkeypatch.setattr(apply_mod, "prepare", started)


# 1. every output path checked up front ------------------------------------------------


@needs_proc
@pytest.mark.parametrize(
    "case, args, says",
    [
        ("json in /proc", ["analyze", LLAMA, *SIM, "--json", "/proc/x"], "cannot write in /proc"),
        ("json a folder", ["analyze", LLAMA, *SIM, "--json", "{dir}"], "is a directory"),
        ("html in /proc", ["analyze", LLAMA, *SIM, "--html", "/proc/x.html"], "cannot write in /proc"),
        ("snapshot under a file", ["analyze", LLAMA, *SIM, "--snapshot", "{file}/s.pickle"], "is a file"),
        (
            "compare json under a file",
            ["compare", LLAMA, "--step", "checkpointing", "--json", "{file}/x"],
            "is a file",
        ),
        (
            "plan recipe in /proc",
            ["plan", LLAMA, "--budget", "1GiB", "--write-recipe", "/proc/r.yaml"],
            "/proc",
        ),
        ("baseline -o a folder", ["baseline", LLAMA, "-o", "{dir}"], "is a directory"),
        ("check --junit a folder", ["check", "-b", "{file}", "--junit", "{dir}"], "is a directory"),
        ("check -o in /proc", ["check", "-b", "{file}", "--format", "json", "-o", "/proc/x"], "/proc"),
        ("apply -o under a file", [*APPLY, "-o", "{file}/sub"], "is a file, not a folder"),
        ("apply -o a file", [*APPLY, "-o", "{file}"], "not a folder"),
        ("apply --json in /proc", [*APPLY, "-o", "{tmp}/out", "--json", "/proc/x"], "cannot write in /proc"),
        ("two options, one file", ["analyze", LLAMA, "--json", "{tmp}/a", "--html", "{tmp}/a"], "same file"),
    ],
)
def test_an_output_that_cannot_be_written_is_refused_before_any_work(
    case, args, says, tmp_path, capsys, no_work
):
    (tmp_path / "d").mkdir()
    (tmp_path / "f").write_text("a file\n")
    fill = {"dir": str(tmp_path / "d"), "file": str(tmp_path / "f"), "tmp": str(tmp_path)}
    argv = [a.format(**fill) for a in args]
    assert main(argv) == 2, case
    line = one_error_line(capsys.readouterr().err)
    assert line.startswith("memprof: error: --") and says in line, line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d", "f"]  # nothing written, no checkpoint
    assert (tmp_path / "f").read_text() == "a file\n"


def test_dash_is_still_stdout_and_devices_are_written_in_place(tmp_path, capsys):
    assert main(["analyze", LLAMA, *SIM, "--top", "0", "--json", "-"]) == 0
    assert json.loads(capsys.readouterr().out)["engine"] == "sim"
    if os.path.exists("/dev/null"):
        assert main(["analyze", LLAMA, *SIM, "--top", "0", "--json", "/dev/null", "--html", "/dev/null"]) == 0
        assert os.path.exists("/dev/null") and not os.path.isfile("/dev/null")


# 2. no clobbering without --force; writes atomic ----------------------------------------


@pytest.mark.parametrize(
    "args, flag",
    [
        (["analyze", LLAMA, *SIM, "--json", "{old}"], "--json"),
        (["analyze", LLAMA, *SIM, "--html", "{old}"], "--html"),
        (["compare", LLAMA, "--step", "checkpointing", *SIM, "--json", "{old}"], "--json"),
        (["plan", LLAMA, "--budget", "1GiB", "--write-recipe", "{old}"], "--write-recipe"),
        (["baseline", LLAMA, "-o", "{old}"], "--output"),
        (["check", "-b", "{old}", "--junit", "{old}"], "--junit"),
        ([*APPLY, "-o", "{tmp}/new", "--json", "{old}"], "--json"),
    ],
)
def test_an_existing_file_is_not_overwritten_without_force(args, flag, tmp_path, capsys, no_work):
    old = tmp_path / "old.txt"
    old.write_text("keep me\n")
    argv = [a.format(old=old, tmp=tmp_path) for a in args]
    assert main(argv) == 2
    line = one_error_line(capsys.readouterr().err)
    assert f"{flag} {old}: already exists; pass --force to replace it" in line
    assert old.read_text() == "keep me\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old.txt"]


def test_force_replaces_and_update_rewrites_its_own_file(tmp_path, capsys):
    js, html, base, junit = (tmp_path / n for n in ("p.json", "p.html", "b.json", "r.xml"))
    for f in (js, html, base, junit):
        f.write_text("old\n")
    assert (
        main(["analyze", LLAMA, *SIM, "--top", "0", "--json", str(js), "--html", str(html), "--force"]) == 0
    )
    assert json.loads(js.read_text())["engine"] == "sim" and "<html" in html.read_text().lower()
    assert main(["baseline", LLAMA, *SIM, "-o", str(base), "--force"]) == 0
    # --update rewrites the file it reads: no --force needed, as its --help says
    assert main(["baseline", "--update", "-o", str(base)]) == 0
    assert main(["check", "-b", str(base), "--junit", str(junit), "--force"]) == 0
    assert "<testsuite" in junit.read_text()
    capsys.readouterr()
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary files left


def test_write_atomic_interrupted_keeps_the_old_file(tmp_path, monkeypatch):
    f = tmp_path / "out.json"
    f.write_text("old\n")

    def interrupt(*a):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", interrupt)
    with pytest.raises(KeyboardInterrupt):
        files.write_atomic(f, "new")
    assert f.read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]


def test_write_atomic_follows_a_link_to_its_target(tmp_path):
    target = tmp_path / "real.json"
    target.write_text("old\n")
    (tmp_path / "link.json").symlink_to(target)
    files.write_atomic(tmp_path / "link.json", "new")
    assert (tmp_path / "link.json").is_symlink() and target.read_text() == "new\n"


# 3. interrupted apply ------------------------------------------------------------------

#: runs `memprof apply` as the console script does, killing itself at a named point of the write
KILLER = textwrap.dedent(
    """
    import os, signal, sys
    import memprof.apply as a
    where, how, fallback = sys.argv[1:4]
    def step(name):
        if name == where:
            os.kill(os.getpid(), getattr(signal, how))
    a._step = step
    if fallback == "1":
        a._renameat2 = lambda *args: False  # a system without renameat2
    from memprof.cli import main
    sys.argv = ["memprof", *sys.argv[4:]]
    main()
    """
)


def run_killed(where: str, how: str, fallback: bool, args: list[str]) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-c", KILLER, where, how, "1" if fallback else "0", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, check=False)


def old_folder(path: Path) -> None:
    path.mkdir()
    (path / "marker.txt").write_text("old")
    (path / "sub").mkdir()
    (path / "sub" / "data.bin").write_bytes(b"x" * 1000)


def is_complete_old(path: Path) -> bool:
    return (
        sorted(str(p.relative_to(path)) for p in path.rglob("*")) == ["marker.txt", "sub", "sub/data.bin"]
        and (path / "marker.txt").read_text() == "old"
        and (path / "sub" / "data.bin").stat().st_size == 1000
    )


def is_complete_new(path: Path) -> bool:
    return {p.name for p in path.iterdir()} == NEW_FILES and json.loads((path / "memprof.json").read_text())


def temp_folders(tmp_path: Path) -> list[str]:
    return sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".out.memprof-"))


def exchange_supported(tmp_path: Path) -> bool:
    (tmp_path / "x1").mkdir()
    (tmp_path / "x2").mkdir()
    try:
        return apply_mod._renameat2(tmp_path / "x1", tmp_path / "x2", apply_mod._RENAME_EXCHANGE)
    finally:
        os.rmdir(tmp_path / "x1")
        os.rmdir(tmp_path / "x2")


@pytest.mark.parametrize(
    "where, fallback, at_dest",
    [
        ("written", False, "old"),  # the new folder complete, nothing swapped yet
        ("exchanged", False, "new"),  # swapped in one step; the old one not yet deleted
        ("moved-aside", True, "missing"),  # the fallback's two renames: killed between them
    ],
)
def test_apply_force_killed_at_any_step_leaves_old_or_new_and_the_next_run_cleans_up(
    where, fallback, at_dest, tmp_path, capsys
):
    if not fallback and not exchange_supported(tmp_path):
        pytest.skip("renameat2(RENAME_EXCHANGE) is not available here")
    out = tmp_path / "out"
    old_folder(out)
    p = run_killed(where, "SIGKILL", fallback, [*APPLY, "-o", str(out), "--force"])
    assert p.returncode == -signal.SIGKILL, p.stderr
    if at_dest == "old":
        assert is_complete_old(out)
    elif at_dest == "new":
        assert is_complete_new(out)
    else:
        # the documented gap of the two-step replace: the old folder whole, aside
        assert not out.exists()
        (aside,) = [tmp_path / n for n in temp_folders(tmp_path) if n.endswith("-old")]
        assert is_complete_old(aside)
    assert temp_folders(tmp_path)  # the killed run's leftovers

    if at_dest == "missing":
        # the next apply (without --force) puts the old folder back first, then refuses to replace it
        assert main([*APPLY, "-o", str(out)]) == 2
        line = one_error_line(capsys.readouterr().err)
        assert "already exists; pass --force" in line and "restored" in line
        assert is_complete_old(out)
        assert temp_folders(tmp_path) == []
    # the next apply to the destination removes what killed runs left
    assert main([*APPLY, "-o", str(out), "--force"]) == 0
    assert "temporary folder(s) of interrupted runs" in capsys.readouterr().out or at_dest == "missing"
    assert is_complete_new(out)
    assert temp_folders(tmp_path) == []


def test_a_running_applys_temporary_folder_is_not_a_leftover(tmp_path):
    out = tmp_path / "out"
    mine = tmp_path / f".out.memprof-{os.getppid()}-abcd"  # a live process (the test runner's parent)
    dead = tmp_path / ".out.memprof-999999999-abcd"
    legacy = tmp_path / ".out.memprof-old"
    for d in (mine, dead, legacy):
        d.mkdir()
    assert apply_mod.leftovers(out) == [dead, legacy]  # by name


def test_sigterm_during_apply_is_an_interrupt_that_cleans_up(tmp_path):
    out = tmp_path / "out"
    old_folder(out)
    p = run_killed("written", "SIGTERM", False, [*APPLY, "-o", str(out), "--force"])
    assert p.returncode == 130, p.stderr
    assert one_error_line(p.stderr) == "memprof: error: interrupted"
    assert is_complete_old(out)
    assert temp_folders(tmp_path) == []


# 4. Ctrl-C at any moment ----------------------------------------------------------------

#: Ctrl-C while `import torch` runs: an import hook raises KeyboardInterrupt there
IMPORT_INTERRUPTED = textwrap.dedent(
    """
    import builtins, runpy, sys
    real = builtins.__import__
    entry, heavy = sys.argv[1:3]
    def hook(name, *args, **kwargs):
        if name == heavy or name.startswith(heavy + "."):
            raise KeyboardInterrupt
        return real(name, *args, **kwargs)
    builtins.__import__ = hook
    sys.argv = ["memprof", *sys.argv[3:]]
    if entry == "module":  # python -m memprof
        runpy.run_module("memprof", run_name="__main__", alter_sys=True)
    else:  # the console script (pyproject's [project.scripts]): `from memprof.__main__ import run; run()`
        from memprof.__main__ import run
        run()
    """
)


@pytest.mark.parametrize(
    "entry, heavy",
    [
        ("module", "torch"),
        ("console-script", "torch"),
        # even before memprof.cli runs (typer imports first)
        ("module", "typer"),
        ("console-script", "typer"),
    ],
)
def test_ctrl_c_while_torch_imports_is_one_line_and_130(entry, heavy):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    p = subprocess.run(
        [sys.executable, "-c", IMPORT_INTERRUPTED, entry, heavy, "analyze", LLAMA, "-e", "sim"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )
    assert p.returncode == 130, p.stderr
    assert one_error_line(p.stderr) == "memprof: error: interrupted"


#: analyze whose engine run signals the test when it starts, then takes its time
SLOW_ANALYZE = textwrap.dedent(
    """
    import sys, time
    from memprof.engines import base
    def slow_run(self, *args, **kwargs):
        print("running", flush=True)
        time.sleep(120)
    base.Engine.run = slow_run
    from memprof.cli import main
    sys.argv = ["memprof", *sys.argv[1:]]
    main()
    """
)


def test_sigterm_to_a_running_analyze_is_one_line_and_130(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    js = tmp_path / "p.json"
    proc = subprocess.Popen(
        [sys.executable, "-c", SLOW_ANALYZE, "analyze", LLAMA, *SIM, "--json", str(js)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline() == "running\n"
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 130, err
    assert one_error_line(err) == "memprof: error: interrupted"
    assert list(tmp_path.iterdir()) == []  # no --json, not even half of one


def test_the_console_script_is_the_guarded_entry():
    import tomllib

    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["memprof"] == "memprof.__main__:run"


# 5. outputs kept apart: from stdout, from each other, from what the command reads ------


@pytest.mark.parametrize(
    "args",
    [
        ["analyze", LLAMA, *SIM, "--json", "-", "--html", "-"],
        ["compare", LLAMA, "--step", "checkpointing", *SIM, "--json", "-", "--html", "-"],
        ["plan", LLAMA, "--budget", "1GiB", "--write-recipe", "-", "--json", "-"],
        ["check", "-b", "{file}", "--format", "json", "--junit", "-"],
        ["check", "-b", "{file}", "--junit", "-", "--html", "-"],
    ],
)
def test_two_outputs_to_stdout_are_refused_before_any_work(args, tmp_path, capsys, no_work):
    (tmp_path / "f").write_text("{}\n")
    assert main([a.format(file=tmp_path / "f") for a in args]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "only one output can go to stdout" in line, line


def test_html_to_stdout_keeps_the_terminal_report_off_it(capsys):
    # as --json - does: stdout holds the one document, whole
    assert main(["analyze", LLAMA, *SIM, "--html", "-"]) == 0
    out = capsys.readouterr().out
    assert out.lstrip().lower().startswith("<!doctype html") and out.rstrip().endswith("</html>"), out[-300:]


@pytest.mark.parametrize(
    "args, says",
    [
        (["analyze", LLAMA, *SIM, "--snapshot", "-"], "--snapshot -: cannot go to stdout"),
        ([*APPLY, "-o", "-"], "--output -: a folder cannot go to stdout"),
        (["baseline", LLAMA, "-o", "-"], "--output -: cannot go to stdout"),
    ],
)
def test_a_pickle_or_a_folder_is_never_a_file_named_dash(args, says, tmp_path, monkeypatch, capsys, no_work):
    monkeypatch.chdir(tmp_path)
    assert main(args) == 2
    assert says in one_error_line(capsys.readouterr().err)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("name", ["config.json", "README.md", "sub/x.json", "."])
def test_apply_refuses_another_output_inside_its_folder_whatever_force_says(name, tmp_path, capsys, no_work):
    out = tmp_path / "out"
    old_folder(out)
    json_path = str(out / name) if name != "." else str(out)
    assert main([*APPLY, "-o", str(out), "--json", json_path, "--force"]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "--json" in line and ("inside --output" in line or "is a directory" in line), line
    assert is_complete_old(out)


def clobber_cases(tmp_path: Path) -> dict[str, tuple[list[str], list[Path]]]:
    """A case -> (argv, the inputs it must leave as they are)."""
    cfg = tmp_path / "cfg.json"
    cfg.write_text((TINY / "llama.json").read_text())
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text(cfg.read_text())
    (tmp_path / "link.json").symlink_to(cfg)
    base = tmp_path / "good.json"
    base.write_text('{"schema": "memprof.baseline/1"}\n')
    sb = tmp_path / "sb"
    sb.mkdir()
    (sb / "r.yaml").write_text("steps: [checkpointing]\n")
    (sb / "data.txt").write_text("one\ntwo\n")
    wl = tmp_path / "wl.yaml"
    wl.write_text(f'workloads:\n  - {{name: a, model: "{cfg}", batch_size: 1, seq_len: 8}}\n')
    F = "--force"
    return {
        "json over the model config": (["analyze", str(cfg), *SIM, "--json", str(cfg), F], [cfg]),
        "json over a link to it": (
            ["analyze", str(cfg), *SIM, "--json", str(tmp_path / "link.json"), F],
            [cfg],
        ),
        "html over a file of the model folder": (
            ["analyze", str(folder), *SIM, "--html", str(folder / "config.json"), F],
            [folder / "config.json"],
        ),
        "json over the teacher": (
            ["analyze", LLAMA, "--mode", "distill", "--teacher", str(cfg), *SIM, "--json", str(cfg), F],
            [cfg],
        ),
        "json over the recipe": (
            ["analyze", LLAMA, "-r", str(sb / "r.yaml"), "--json", str(sb / "r.yaml"), F],
            [sb / "r.yaml"],
        ),
        "compare json over --data": (
            [
                "compare",
                LLAMA,
                "--step",
                "checkpointing",
                "--data",
                str(sb / "data.txt"),
                "--json",
                str(sb / "data.txt"),
                F,
            ],
            [sb / "data.txt"],
        ),
        "plan recipe over the model": (
            ["plan", str(cfg), "--budget", "1GiB", "--write-recipe", str(cfg), F],
            [cfg],
        ),
        "check junit over the baseline": (["check", "-b", str(base), "--junit", str(base), F], [base]),
        "baseline over its workloads file": (["baseline", "--workloads", str(wl), "-o", str(wl), F], [wl]),
        "baseline over a workload's model": (["baseline", "--workloads", str(wl), "-o", str(cfg), F], [cfg]),
        "apply's folder holding the recipe and data": (
            [
                "apply",
                LLAMA,
                "--recipe",
                str(sb / "r.yaml"),
                "--data",
                str(sb / "data.txt"),
                "-o",
                str(sb),
                F,
            ],
            [sb / "r.yaml", sb / "data.txt"],
        ),
        "apply's folder inside the model folder": (
            ["apply", str(folder), "--step", "checkpointing", "-o", str(folder / "out"), F],
            [folder / "config.json"],
        ),
    }


CLOBBER_CASES = [
    "json over the model config",
    "json over a link to it",
    "html over a file of the model folder",
    "json over the teacher",
    "json over the recipe",
    "compare json over --data",
    "plan recipe over the model",
    "check junit over the baseline",
    "baseline over its workloads file",
    "baseline over a workload's model",
    "apply's folder holding the recipe and data",
    "apply's folder inside the model folder",
]


@pytest.mark.parametrize("case", CLOBBER_CASES)
def test_an_output_never_replaces_an_input_even_with_force(case, tmp_path, capsys, no_work):
    argv, inputs = clobber_cases(tmp_path)[case]
    before = {p: p.read_bytes() for p in inputs}
    assert main(argv) == 2, case
    line = one_error_line(capsys.readouterr().err)
    assert "this command reads" in line, line
    assert {p: p.read_bytes() for p in inputs} == before


def test_env_checks_its_json_up_front_and_replaces_only_with_force(tmp_path, capsys, monkeypatch):
    import memprof.cli.env

    old = tmp_path / "env.json"
    old.write_text("keep me\n")
    real = memprof.cli.env.collect

    def collected():
        raise AssertionError("env collected before its --json path was checked")

    monkeypatch.setattr(memprof.cli.env, "collect", collected)
    assert main(["env", "--json", str(old)]) == 2
    assert f"--json {old}: already exists; pass --force" in one_error_line(capsys.readouterr().err)
    assert main(["env", "--json", str(old / "x")]) == 2
    assert f"{old} is a file, not a folder" in one_error_line(capsys.readouterr().err)
    assert old.read_text() == "keep me\n"
    monkeypatch.setattr(memprof.cli.env, "collect", real)
    assert main(["env", "--json", str(old), "--force"]) == 0
    assert "sim" in json.loads(old.read_text())["engines"]


@pytest.mark.parametrize("link_to", ["missing/x", "missing"])
def test_a_link_to_a_missing_folder_is_refused_and_no_folder_is_made(link_to, tmp_path, capsys, no_work):
    link = tmp_path / "link"
    link.symlink_to(tmp_path / link_to)
    out = link if link_to == "missing/x" else link / "p.json"  # the link is the file, or a folder on the way
    assert main(["analyze", LLAMA, *SIM, "--json", str(out)]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert f"--json {out}: " in line and "is a link to" in line and "does not exist" in line, line
    with pytest.raises(FileNotFoundError):
        files.write_atomic(out, "{}")
    assert [p.name for p in tmp_path.iterdir()] == ["link"]  # no folder made where it points


def test_a_link_to_a_missing_file_in_a_folder_that_exists_is_written(tmp_path):
    (tmp_path / "link.json").symlink_to(tmp_path / "real.json")
    files.check_output_file(tmp_path / "link.json", "--json")
    files.write_atomic(tmp_path / "link.json", "{}")
    assert (tmp_path / "real.json").read_text() == "{}\n"


@pytest.mark.parametrize(
    "what, says",
    [
        ("model /dev/null", "/dev/null: is a character device, not a regular file"),
        ("model fifo", "fifo: is a named pipe (FIFO), not a regular file"),
        ("model empty", "an empty model name"),
        ("folder with a fifo config.json", "its config.json is a named pipe (FIFO), not a regular file"),
        ("recipe /dev/null", "/dev/null: is a character device, not a regular file"),
        ("recipe fifo", "fifo: is a named pipe (FIFO), not a regular file"),
    ],
)
def test_a_path_that_is_not_a_regular_file_says_so(what, says, tmp_path, monkeypatch, capsys, no_work):
    if not os.path.exists("/dev/null") or not hasattr(os, "mkfifo"):
        pytest.skip("needs /dev/null and FIFOs")
    monkeypatch.chdir(tmp_path)
    os.mkfifo("fifo")
    os.mkdir("model")
    os.mkfifo("model/config.json")
    model, recipe = {
        "model /dev/null": ("/dev/null", None),
        "model fifo": ("fifo", None),
        "model empty": ("", None),
        "folder with a fifo config.json": ("model", None),
        "recipe /dev/null": (LLAMA, "/dev/null"),
        "recipe fifo": (LLAMA, "fifo"),
    }[what]
    argv = ["analyze", model, *SIM] + (["--recipe", recipe] if recipe else [])
    assert main(argv) == 2
    line = one_error_line(capsys.readouterr().err)
    assert says in line, line


def test_a_snapshot_follows_the_output_rules_a_link_and_a_pipe_kept(tmp_path):
    import threading

    from memprof.snapshot import write_snapshot

    # a link: its target replaced, as write_atomic does (the link was replaced by a file)
    target = tmp_path / "real.pickle"
    target.write_bytes(b"old")
    (tmp_path / "link.pickle").symlink_to(target)
    write_snapshot({"segments": []}, tmp_path / "link.pickle")
    assert (tmp_path / "link.pickle").is_symlink() and target.read_bytes()[:2] == b"\x80\x04"
    # a pipe (as /dev/null or /dev/stdout): written in place, never renamed over
    if not hasattr(os, "mkfifo"):
        return
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    got: list[bytes] = []
    reader = threading.Thread(target=lambda: got.append(fifo.read_bytes()), daemon=True)
    reader.start()
    write_snapshot({"segments": []}, fifo)
    reader.join(10)
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)
    assert got and got[0][:2] == b"\x80\x04"
