"""``memprof --help`` from stubs: the same page as the real app's, without importing torch."""

from __future__ import annotations

import subprocess
import sys

from typer.testing import CliRunner

from memprof.cli import app
from memprof.clihelp import COMMANDS, GROUPS, help_app, is_top_level_help


def test_the_stub_page_is_the_real_page():
    real = CliRunner().invoke(app, ["--help"], terminal_width=100)
    stub = CliRunner().invoke(help_app(), ["--help"], terminal_width=100)
    assert real.exit_code == stub.exit_code == 0
    assert stub.output == real.output
    for name, _ in COMMANDS + GROUPS:
        assert name in real.output


def test_every_real_command_has_a_stub():
    registered = {c.name for c in app.registered_commands} | {g.name for g in app.registered_groups}
    assert registered == {n for n, _ in COMMANDS + GROUPS}


def test_top_level_help_imports_no_torch():
    code = (
        "import sys\n"
        "sys.argv = ['memprof', '--help']\n"
        "from memprof.__main__ import run\n"
        "try:\n"
        "    run()\n"
        "except SystemExit as e:\n"
        "    assert e.code in (0, None), e.code\n"
        "print('torch' in sys.modules, 'transformers' in sys.modules)\n"
    )
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False)
    assert p.returncode == 0, p.stderr
    assert "Commands" in p.stdout
    assert p.stdout.strip().endswith("False False")


def test_only_the_top_level_page_takes_the_stubs():
    assert is_top_level_help([]) and is_top_level_help(["--help"])
    assert not is_top_level_help(["analyze", "--help"]) and not is_top_level_help(["recipes"])
