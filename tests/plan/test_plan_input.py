"""memprof plan refuses bad input: one line, exit 2 (the command line); InputError (the library)."""

from __future__ import annotations

import importlib

import pytest

from memprof.errors import InputError
from memprof.workload import Workload
from tests.conftest import tiny
from tests.plan.helpers import run

P = importlib.import_module("memprof.plan")  # the package (memprof.plan is also the function)


@pytest.mark.parametrize(
    "args,needle",
    [
        (["--budget", "24XB"], "--budget: unknown size unit"),
        (["--budget", "lots"], "--budget: not a size"),
        (["--budget", "0"], "--budget: must be more than 0"),
        (["--budget", "24GiB", "--world-size", "0"], "--world-size must be at least 1"),
        (["--budget", "24GiB", "--max-overhead", "40"], "--max-overhead: not a percentage"),
        (["--budget", "100MiB", "--context-overhead", "1GiB"], "leaves nothing after the CUDA context"),
        (["--budget", "24GiB", "--maximize", "width"], "--maximize"),
        ([], "--budget"),
    ],
)
def test_f_bad_input_is_one_line_exit_2(capsys, args, needle):
    code, out, err = run(capsys, "plan", tiny("llama"), *args)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("memprof: error:"), err
    assert needle in lines[0]
    assert "Traceback" not in err


def test_library_rejects_bad_arguments():
    wl = Workload(batch_size=1, seq_len=8)
    for kw in ({"world_size": 0}, {"max_overhead": -0.1}, {"maximize": "width"}, {"context_overhead": -1}):
        with pytest.raises(InputError):
            P.plan(tiny("llama"), wl, 24 * 2**30, **kw)
