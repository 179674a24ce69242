"""``--gpu NAME``: the presets, their effect on the sim's projection, and every non-tensor byte named."""

from __future__ import annotations

import json

import pytest

from memprof import api
from memprof.budget import (
    CUDNN_WORKSPACE_BYTES,
    DEFAULT_CONTEXT_BYTES,
    NCCL_BUFFSIZE,
    Budget,
    fit,
    nccl_buffers,
    non_tensor,
)
from memprof.errors import InputError
from memprof.gate import GateWorkload
from memprof.gpus import PRESETS, lookup
from memprof.profile import Profile
from tests.conftest import tiny
from tests.plan.helpers import run

MiB = 2**20


@pytest.mark.parametrize(
    "name,expected",
    [
        ("rtx4090", "RTX 4090"),
        ("4090", "RTX 4090"),
        ("RTX 4090", "RTX 4090"),
        ("rtx_4090", "RTX 4090"),
        ("a100-80gb", "A100 80GB"),
        ("A100 40GB", "A100 40GB"),
        ("h100", "H100 80GB SXM"),
        ("H100-PCIe", "H100 80GB PCIe"),
        ("t4", "T4"),
        ("h200", "H200"),
        ("5090", "RTX 5090"),
    ],
)
def test_names_are_case_insensitive_with_common_spellings(name, expected):
    assert lookup(name).name == expected


def test_unknown_name_lists_the_known_ones():
    with pytest.raises(InputError) as e:
        lookup("v100")
    msg = str(e.value)
    assert "v100" in msg and all(p.name in msg for p in PRESETS)


def test_every_preset_is_complete():
    for p in PRESETS:
        assert p.memory_bytes > p.context_bytes > 0
        assert p.sm_major >= 7 and p.memory_bandwidth_gbps > 0 and p.host_link_gbps > 0
        assert p.source.strip() and "http" in p.source
    assert lookup("rtx4090").memory_bytes == 24564 * MiB
    assert lookup("t4").sm == "7.5"


def _infer(gpu: str, **kw):
    return api.analyze(
        tiny("gpt2"), mode="infer", dtype="float16", batch_size=1, seq_len=16, gpu=lookup(gpu), **kw
    )


def test_t4_and_h100_project_different_sdpa_kernels_and_workspaces():
    t4, h100 = _infer("t4"), _infer("h100")
    assert t4.engine == h100.engine == "sim"
    # FlashAttention-2 needs sm 8.0: a T4 runs the memory-efficient kernel
    assert set(t4.overheads["sdpa_kernels"]) == {"efficient"}
    assert set(h100.overheads["sdpa_kernels"]) == {"flash"}
    # cuBLAS: 8.125 MiB before Hopper, 32 MiB on it
    assert t4.overheads["cublas_workspace_bytes"] == 4096 * 1024 * 2 + 16 * 1024 * 8
    assert h100.overheads["cublas_workspace_bytes"] == 32 * MiB
    assert "T4" in t4.device and "sm 7.5" in t4.device


def test_bfloat16_on_a_t4_falls_to_the_math_kernel():
    p = api.analyze(tiny("gpt2"), mode="infer", dtype="bfloat16", batch_size=1, seq_len=16, gpu=lookup("t4"))
    assert set(p.overheads["sdpa_kernels"]) == {"math"}


def test_profile_names_every_non_tensor_byte_and_the_fit():
    p = _infer("rtx4090")
    named = p.overheads["non_tensor"]
    preset = lookup("rtx4090")
    assert named["cuda_context_bytes"] == preset.context_bytes
    assert named["cuda_context_source"].startswith("estimate")
    assert named["cublas_streams"] == 1 and named["cublas_handles"] == 1  # inference: the forward's thread
    assert named["cudnn_workspace_bytes"] == 0 and named["convolutions"] == 0  # GPT-2's Conv1D is a linear
    assert named["nccl_buffers_bytes"] == 0
    assert named["total_bytes"] == named["cublas_workspace_bytes"] + named["cuda_context_bytes"]
    f = p.fit
    assert f["memory_bytes"] == preset.memory_bytes
    assert f["need_bytes"] == p.peak_reserved_bytes + named["total_bytes"]
    assert f["headroom_bytes"] == preset.memory_bytes - f["need_bytes"] and f["fits"]
    # plain data, in the JSON, read back
    d = json.loads(p.to_json())
    assert d["fit"]["need_bytes"] == f["need_bytes"]
    assert d["overheads"]["gpu"]["name"] == "RTX 4090"
    assert Profile.from_dict(d).fit == f
    old = dict(d)
    old.pop("fit")
    assert Profile.from_dict(old).fit is None  # a profile written before it


def test_context_overhead_overrides_the_presets_estimate():
    p = _infer("t4", context_overhead=100 * MiB)
    assert p.overheads["non_tensor"]["cuda_context_bytes"] == 100 * MiB
    assert p.overheads["non_tensor"]["cuda_context_source"].startswith("given")


def test_without_gpu_the_default_context_and_no_fit():
    p = api.analyze(tiny("gpt2"), mode="infer", batch_size=1, seq_len=16, engine="sim")
    assert p.overheads["non_tensor"]["cuda_context_bytes"] == DEFAULT_CONTEXT_BYTES
    assert p.fit is None


def test_fit_arithmetic():
    named = non_tensor(
        cublas_workspace_bytes=32 * MiB,
        convolutions=1,
        world_size=4,
        context_bytes=500 * MiB,
        context_source="estimate",
    )
    nccl = nccl_buffers(4)
    assert nccl["peers"] == 2 and nccl["bytes"] > 2 * 2 * NCCL_BUFFSIZE
    assert named["total_bytes"] == 32 * MiB + CUDNN_WORKSPACE_BYTES + nccl["bytes"] + 500 * MiB
    f = fit(10 * 2**30, named, 12 * 2**30, "x")
    assert f["need_bytes"] == 10 * 2**30 + named["total_bytes"]
    assert f["headroom_bytes"] == 12 * 2**30 - f["need_bytes"] and f["fits"]
    assert not fit(12 * 2**30, named, 12 * 2**30, "x")["fits"]


def test_plan_budget_counts_cudnn_and_nccl():
    one = Budget(2**30, 0, 32 * MiB)
    conv4 = Budget(2**30, 0, 32 * MiB, world_size=4, cudnn_workspace_bytes=CUDNN_WORKSPACE_BYTES)
    assert one.need(0) == 32 * MiB
    assert conv4.need(0) == 32 * MiB + CUDNN_WORKSPACE_BYTES + nccl_buffers(4)["bytes"]
    assert conv4.usable_bytes == 2**30 - conv4.need(0)
    d = conv4.to_dict()
    assert d["nccl_buffers_bytes"] == nccl_buffers(4)["bytes"] and d["cudnn_workspace_bytes"]


def test_nccl_buffers_only_for_sharded_runs():
    kw = {"mode": "train", "batch_size": 1, "seq_len": 16, "dtype": "bfloat16", "gpu": lookup("h100")}
    alone = api.analyze(tiny("llama"), **kw)
    sharded = api.analyze(tiny("llama"), world_size=2, shard="fsdp", **kw)
    assert alone.overheads["non_tensor"]["nccl_buffers_bytes"] == 0
    assert sharded.sharding is not None
    named = sharded.overheads["non_tensor"]
    assert named["nccl_buffers_bytes"] == nccl_buffers(2)["bytes"] > 0
    assert any("NCCL" in a for a in named["assumptions"])
    assert sharded.fit["non_tensor_bytes"] == named["total_bytes"]


def test_cudnn_workspace_only_for_convolutions():
    p = api.analyze(tiny("vit"), mode="infer", batch_size=1, gpu=lookup("a100-80gb"))
    named = p.overheads["non_tensor"]
    assert named["convolutions"] >= 1 and named["cudnn_workspace_bytes"] == CUDNN_WORKSPACE_BYTES


def test_cli_analyze_gpu_report_lines(capsys):
    code, out, err = run(capsys, "analyze", tiny("gpt2"), "--gpu", "t4", "-b", "1", "-s", "16", "--top", "0")
    assert code == 0, err
    text = " ".join(out.split())
    assert "simulated T4" in text
    assert "Not tensors" in text and "(2 handle(s) x 1 compute stream)" in text and "(estimate)" in text
    assert "Fits?" in text and "of T4" in text


@pytest.mark.parametrize(
    "args,needle",
    [
        (["analyze", "--gpu", "v100"], "unknown --gpu 'v100'"),
        (["analyze", "--gpu", "t4", "--engine", "cuda"], "--engine cuda"),
        (["analyze", "--gpu", "t4", "--engine", "cpu"], "--engine cpu"),
        (["plan", "--gpu", "nope"], "unknown --gpu"),
        (["compare", "--gpu", "nope", "--step", "checkpointing"], "unknown --gpu"),
    ],
)
def test_bad_gpu_is_one_line_exit_2(capsys, args, needle):
    code, out, err = run(capsys, args[0], tiny("gpt2"), *args[1:])
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("memprof: error:"), err
    assert needle in lines[0] and "Traceback" not in err


def test_baseline_unknown_gpu_is_refused_before_work(capsys, tmp_path):
    code, out, err = run(capsys, "baseline", tiny("gpt2"), "-o", str(tmp_path / "b.json"), "--gpu", "nope")
    assert code == 2 and "unknown --gpu" in err and not (tmp_path / "b.json").exists()


def test_gate_workload_records_the_gpu():
    problems: list[str] = []
    w = GateWorkload.from_entry({"model": tiny("gpt2"), "gpu": "rtx4090"}, "w", problems)
    assert w is not None and w.gpu == "RTX 4090" and w.to_dict()["gpu"] == "RTX 4090"
    assert GateWorkload.from_entry({"model": tiny("gpt2"), "gpu": "nope"}, "w", problems) is None
    assert any("unknown --gpu" in p for p in problems)
    plain = GateWorkload.from_entry({"model": tiny("gpt2")}, "w", [])
    assert plain is not None and "gpu" not in plain.to_dict()


def plan_budget(capsys, *args: str) -> dict:
    """The budget accounting of ``memprof plan`` on the tiny Llama (two runs at most), from its JSON."""
    code, out, err = run(
        capsys, "plan", tiny("llama"), *args, "-b", "1", "-s", "32", "--max-runs", "2", "--json", "-"
    )
    assert code == 0, err
    return json.loads(out)["budget"]


def test_plan_gpu_without_budget_uses_the_presets_memory_and_context(capsys):
    preset = lookup("rtx4090")
    b = plan_budget(capsys, "--gpu", "rtx4090")
    assert b["budget_bytes"] == preset.memory_bytes == 24564 * MiB
    assert b["context_bytes"] == preset.context_bytes
    assert b["context_source"].startswith("estimate")
    assert b["gpu"] == "RTX 4090"
    assert b["usable_bytes"] == preset.memory_bytes - preset.context_bytes - b["cublas_workspace_bytes"]


@pytest.mark.parametrize(
    ("budget", "label"),
    [
        (None, "the H100 80GB SXM's memory (--gpu)"),
        (24 * 2**30, "--budget; the H100 80GB SXM (--gpu) has 79.6 GiB"),  # was: "the H100 ...'s memory"
    ],
)
def test_plan_says_where_its_budget_comes_from(budget, label):
    from types import SimpleNamespace

    from rich.console import Console

    from memprof.report.plan import budget_table

    preset = lookup("h100")
    b = Budget(budget or preset.memory_bytes, preset.context_bytes, 0, gpu=preset.name)
    console = Console(width=200, record=True)
    console.print(budget_table(SimpleNamespace(budget=b)))  # type: ignore[arg-type]
    row = " ".join(console.export_text().splitlines()[0].split())
    assert row == f"budget {b.budget_bytes / 2**30:.1f} GiB {label}"


def test_plan_gpu_with_context_overhead(capsys):
    b = plan_budget(capsys, "--gpu", "t4", "--context-overhead", "100MiB")
    assert b["context_bytes"] == 100 * MiB and b["budget_bytes"] == lookup("t4").memory_bytes
    # the T4's workspace, pre-Hopper, for each of a training step's two cuBLAS handles
    assert b["cublas_workspace_bytes"] == 2 * (4096 * 1024 * 2 + 16 * 1024 * 8)


def test_plan_world_size_counts_nccl_in_the_fit(capsys):
    b = plan_budget(capsys, "--budget", "8GiB", "--world-size", "4")
    assert b["nccl_buffers_bytes"] == nccl_buffers(4)["bytes"]
    assert (
        b["usable_bytes"]
        == b["budget_bytes"] - b["context_bytes"] - b["cublas_workspace_bytes"] - b["nccl_buffers_bytes"]
    )


def test_gpus_command_lists_the_table(capsys):
    code, out, err = run(capsys, "gpus", "--sources")
    assert code == 0, err
    for p in PRESETS:
        assert p.name in out
    assert "24564 MiB" in out and "nvidia.com" in out


def test_html_report_names_the_non_tensor_bytes_and_the_fit():
    from memprof.report.html import profile_html

    page = profile_html(_infer("t4"))
    assert "Not tensors" in page and "(1 handle(s) x 1 compute stream)" in page and "of T4" in page


def test_budget_fit_agrees_with_the_budget_accounting():
    p = api.analyze(
        tiny("llama"),
        batch_size=1,
        seq_len=16,
        dtype="bfloat16",
        gpu=lookup("t4"),
        budget=64 * MiB,
        context_overhead=0,
        fixes=1,
    )
    assert p.fit["against"].startswith("--budget") and p.fit["memory_bytes"] == 64 * MiB
    assert p.fit["need_bytes"] == p.budget["need_bytes"]
    assert p.fit["fits"] == p.budget["fits"]


def test_baseline_records_the_gpu_and_check_reruns_on_it(capsys, tmp_path):
    out = tmp_path / "b.json"
    code, _, err = run(capsys, "baseline", tiny("gpt2"), "-b", "1", "-s", "16", "--gpu", "t4", "-o", str(out))
    assert code == 0, err
    d = json.loads(out.read_text())
    w = d["workloads"][0]
    assert w["gpu"] == "T4" and "T4" in w["profile"]["device"]
    code, _, err = run(capsys, "check", "--baseline", str(out))
    assert code == 0, err


def test_a_training_step_holds_a_cublas_workspace_for_autograd_s_thread_too():
    """Measured on an H200 (fresh processes): 64 MiB beyond the tensors in training, 32 MiB in
    inference. The forward's thread and autograd's device thread each get a cuBLAS handle."""
    gpu = lookup("h200")
    kw = dict(batch_size=1, seq_len=16, gpu=gpu)
    train = api.analyze(tiny("gpt2"), mode="train", **kw).overheads
    infer = api.analyze(tiny("gpt2"), mode="infer", **kw).overheads
    assert infer["non_tensor"]["cublas_handles"] == 1 and train["non_tensor"]["cublas_handles"] == 2
    assert infer["cublas_workspace_bytes"] == infer["non_tensor"]["cublas_workspace_bytes"] == 32 * 2**20
    assert train["cublas_workspace_bytes"] == train["non_tensor"]["cublas_workspace_bytes"] == 64 * 2**20


def test_the_allocator_model_leaves_room_for_each_cublas_workspace(monkeypatch):
    """The allocator model may reserve the GPU's memory less the context and the workspaces:
    one in inference, two in training (the capacity its garbage collection and retries use)."""
    import memprof.engines.sim as S

    seen: list[int | None] = []
    real = S.replay

    def spy(trace, settings, capacity_bytes=None, **kw):
        seen.append(capacity_bytes)
        return real(trace, settings, capacity_bytes=capacity_bytes, **kw)

    monkeypatch.setattr(S, "replay", spy)
    gpu = lookup("h200")
    for mode, handles in (("infer", 1), ("train", 2)):
        seen.clear()
        api.analyze(tiny("gpt2"), mode=mode, batch_size=1, seq_len=16, gpu=gpu)
        assert seen and set(seen) == {gpu.memory_bytes - gpu.context_bytes - handles * 32 * MiB}
