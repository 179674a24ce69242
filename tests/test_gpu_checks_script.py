"""bench/gpu_checks.sh, the GPU checks in one run, works end to end where there is no GPU.

A GPU is lent to few sessions, for minutes: the script must not find out there that it
rotted. Here its cuda steps fail with memprof's own exit codes, the others run, every
step is time-boxed and recorded, and the results are packed in one archive.
"""

from __future__ import annotations

import os
import re
import subprocess
import tarfile

import pytest
import torch

from tests.conftest import REPO, tiny


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the script's plumbing without a GPU")
def test_the_gpu_checks_run_every_step_time_boxed_and_pack_the_results(tmp_path):
    env = dict(
        os.environ,
        OUT=str(tmp_path),
        GPU_MODEL=tiny("llama"),
        GPU_SHAPE="-b 2 -s 64",
        GPU_SNAPSHOTS="0",  # two more cuda steps, refused as the others are
        ANALYZE_LIMIT="90",
        PYTEST_LIMIT="120",
        VALIDATE_LIMIT="60",
    )
    r = subprocess.run(
        ["bash", "bench/gpu_checks.sh"], cwd=REPO, env=env, capture_output=True, text=True, timeout=600
    )
    assert r.returncode == 0, r.stderr
    summary = (tmp_path / "summary.txt").read_text()
    rc = {
        line.split(":")[0]: int(line.split("rc ")[1].split()[0])
        for line in summary.splitlines()
        if ": rc " in line
    }
    assert rc["pytest_gpu"] == 0  # the gpu tests skip without one
    # every file with a gpu_test was collected: each of its GPU tests says why it skipped
    marked = sum(
        len(re.findall(r"^@gpu_test\(", p.read_text(), re.M)) for p in (REPO / "tests").rglob("test_*.py")
    )
    assert (tmp_path / "pytest_gpu.log").read_text().count("needs a CUDA GPU") == marked >= 4
    assert rc["validate"] == 2  # --engine cuda refused: no GPU
    assert (
        rc["train_cuda"] == rc["infer_cuda"] == 3
    )  # exit 3, an environment error: --engine cuda without a GPU
    assert rc["train_sim"] == rc["infer_sim"] == 0
    with tarfile.open(tmp_path / "gpu-checks.tgz") as t:
        names = set(t.getnames())
    assert {"./summary.txt", "./env.txt", "./train_sim.json", "./infer_sim.json", "./validation.md"} <= names
