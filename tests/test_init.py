"""The package face (memprof/__init__.py): public names imported on first use, never torch at import."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import REPO


def run_python(code: str) -> str:
    """Run ``code`` in a fresh interpreter (this one has torch loaded); return its stdout."""
    p = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"},
        check=False,
    )
    assert p.returncode == 0, p.stderr
    return p.stdout


def test_import_memprof_and_its_pytest_plugin_load_no_torch():
    out = run_python(
        "import sys, memprof\n"
        f"assert memprof.__file__.startswith({str(REPO)!r}), memprof.__file__\n"
        "heavy = ('torch', 'transformers', 'yaml', 'memprof.api', 'memprof.plan')\n"
        "print(sorted(m for m in heavy if m in sys.modules), memprof.__version__)\n"
        "import memprof.pytest_plugin\n"
        "print(sorted(m for m in heavy if m in sys.modules))\n"
    )
    assert out.splitlines() == ["[] 0.1.0", "[]"]


def test_public_names_are_the_library_objects():
    import memprof
    from memprof import api, profile, workload
    from memprof._version import __version__

    assert memprof.analyze is api.analyze and memprof.track is api.track
    assert memprof.Profile is profile.Profile and memprof.Workload is workload.Workload
    plan_module = sys.modules["memprof.plan"]
    assert memprof.plan is plan_module.plan and memprof.PlanResult is plan_module.PlanResult
    assert memprof.__version__ == __version__
    assert set(memprof.__all__) <= set(dir(memprof))
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        memprof.nope  # noqa: B018


def test_plan_is_the_function_even_when_its_module_was_imported_first():
    # importing a submodule binds it on the package: memprof.plan must stay the function
    out = run_python(
        "import memprof.plan, memprof.cli\n"
        "import memprof\n"
        "from memprof import plan\n"
        "print(callable(memprof.plan), memprof.plan is plan, type(plan).__name__)\n"
    )
    assert out.split() == ["True", "True", "function"]
