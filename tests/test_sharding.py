"""FSDP2 sharding: the sim projection over a fake process group, and real ranks under torchrun."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from memprof.cli import main
from memprof.engines import SimEngine
from memprof.prepare import prepare
from memprof.workload import Workload
from tests.conftest import REPO, setup_with, tiny

LLAMA = tiny("llama")


def _tiny_llama() -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    return LlamaForCausalLM(cfg)


def test_sim_step_equals_pytorch_fsdp_mem_tracker():
    """The sim's sharded step (tracker, local-shard optimizer) measures what PyTorch's FSDPMemTracker does."""
    fmt = pytest.importorskip("torch.distributed._tools.fsdp2_mem_tracker")
    from torch._subclasses.fake_tensor import FakeTensorMode

    from memprof.engines.runner import RunEnv, StepRunner
    from memprof.sharding import fake_group, shard_model
    from memprof.tracking import Tracker

    wl = Workload(batch_size=2, seq_len=64, world_size=8)
    setup = setup_with(wl, ("fsdp", {}))
    ids = None

    # memprof: the runner the sim engine uses (LocalShards optimizer, foreach as on CUDA)
    with fake_group(8) as mesh, FakeTensorMode():
        torch.manual_seed(0)
        model = _tiny_llama()
        runner = StepRunner(model, setup, RunEnv(simulate_cuda=True, default_foreach=True, mesh=mesh))
        assert runner.local_shards is not None
        ids = torch.randint(0, 512, (2, 64))
        inputs = {"input_ids": ids, "labels": ids}
        runner.step(inputs)
        tracker = Tracker(runner.model, runner.optimizers, distributed=True)
        with tracker:
            tracker.mark_inputs([ids])
            runner.step(inputs)
        runner.close()
        ours = tracker.result()

    # PyTorch's own tracker, the DTensor optimizer stepping the sharded parameters
    with fake_group(8) as mesh, FakeTensorMode():
        torch.manual_seed(0)
        model = _tiny_llama()
        shard_model(model, mesh)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5, foreach=True)
        ids = torch.randint(0, 512, (2, 64))

        def step() -> None:
            model(input_ids=ids, labels=ids).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        step()
        mt = fmt.FSDPMemTracker(model, opt)
        mt.track_inputs((ids,))
        with mt:
            step()
        theirs = mt.get_tracker_snapshot("peak")[torch.device("cpu")]

    assert ours.peak_bytes == theirs["Total"]
    by_name = {getattr(k, "value", k): v for k, v in theirs.items()}
    assert ours.sharding_at_peak["sharded_parameters"] == by_name["Sharded Param"]
    assert ours.sharding_at_peak["unsharded_parameters"] == by_name["Unsharded Param"]
    assert ours.sharding_at_peak["all_gather_buffers"] == by_name["All Gather"]
    assert ours.categories_at_peak["optimizer_state"] == by_name["OptState"]


def _sim(world_size: int, **kw: object) -> object:
    wl = Workload(batch_size=2, seq_len=64, world_size=world_size, **kw)  # type: ignore[arg-type]
    setup = setup_with(wl, ("fsdp", {})) if world_size > 1 else setup_with(wl)
    rm, eng = prepare(LLAMA, wl, SimEngine())
    return eng.run(rm, setup)


def test_projection_shards_model_states_and_keeps_activations():
    one, two, eight = _sim(1), _sim(2), _sim(8)
    params = one.categories_at_peak["parameters"]
    for n, p in ((2, two), (8, eight)):
        s = p.sharding
        assert s["world_size"] == n and s["method"] == "fsdp" and s["rank"] == 0
        # the rank's shards: 1/N of the parameters (up to FSDP2's padding and 512-byte blocks)
        assert s["at_peak"]["sharded_parameters"] == pytest.approx(params / n, rel=0.1)
        # Adam's two moments of the rank's shards (and a 512-byte step counter per parameter)
        assert p.categories_at_peak["optimizer_state"] == pytest.approx(
            2 * s["at_peak"]["sharded_parameters"], rel=0.1
        )
        # one gathered block and its all-gather buffer on top: model states are not all that is left
        assert s["at_peak"]["unsharded_parameters"] > 0 and s["at_peak"]["all_gather_buffers"] > 0
        # activations do not shard
        assert p.categories_at_peak["activations"] == one.categories_at_peak["activations"]
        z = s["zero3_estimate"]
        assert z["bytes"] == 18 * z["parameters"] // n + 4 * z["largest_layer_params"]
    assert eight.peak_bytes < two.peak_bytes < one.peak_bytes
    assert one.sharding is None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_torchrun_two_ranks_agree_with_the_projection(tmp_path: Path):
    """A real 2-rank FSDP2 step (gloo, CPU): one table with a row per rank; the sim projection agrees."""
    out = tmp_path / "ranks.json"
    args = [LLAMA, "-b", "2", "-s", "64", "--attn", "eager", "--shard", "fsdp"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("WORLD_SIZE", None)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc-per-node",
            "2",
            "--master-addr",
            "127.0.0.1",
            "--master-port",
            str(_free_port()),
            "-m",
            "memprof",
            "analyze",
            *args,
            "-e",
            "cpu",
            "--top",
            "0",
            "--json",
            str(out),
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Every rank" in proc.stdout and proc.stdout.count("Sharding: FSDP2 over 2 ranks") == 1
    data = json.loads(out.read_text())
    ranks = data["ranks"]
    assert [r["sharding"]["rank"] for r in ranks] == [0, 1]
    assert all(r["sharding"]["launcher"] == "torchrun" for r in ranks)
    proj = tmp_path / "sim.json"
    assert main(["analyze", *args, "--world-size", "2", "-e", "sim", "--json", str(proj)]) == 0
    sim = json.loads(proj.read_text())
    for r in ranks:
        # the sim rounds to CUDA's 512-byte blocks; gloo may keep a buffer a little longer
        assert sim["peak_bytes"] == pytest.approx(r["peak_bytes"], rel=0.05)
        assert sim["categories_at_peak"]["optimizer_state"] == pytest.approx(
            r["categories_at_peak"]["optimizer_state"], rel=0.05
        )


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--world-size", "0", "--shard", "fsdp"], "--world-size"),
        (["--shard", "fsdp"], "--world-size N with N >= 2"),
        (["--shard", "fsdp", "--world-size", "2", "-e", "cpu"], "torchrun --nproc-per-node 2"),
        (["--shard", "fsdp", "--world-size", "2", "--mode", "infer"], "train"),
    ],
)
def test_bad_sharding_input(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]):
    code = main(["analyze", LLAMA, "-b", "1", "-s", "16", *argv])
    err = capsys.readouterr().err
    assert code == 2
    assert message in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


class _Flat(torch.nn.Module):
    """One layer: nothing to shard block by block."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(16, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).pow(2).mean()

    def example_inputs(self, batch_size: int, seq_len: int) -> dict[str, torch.Tensor]:
        return {"x": torch.randn(batch_size, seq_len, 16)}


def flat_model() -> torch.nn.Module:
    return _Flat()


def test_sharding_needs_repeated_blocks(capsys: pytest.CaptureFixture[str]):
    spec = "tests.test_sharding:flat_model"
    code = main(["analyze", spec, "-e", "sim", "--shard", "fsdp", "--world-size", "2", "-b", "2", "-s", "8"])
    err = capsys.readouterr().err
    assert code == 2 and "repeated blocks" in err and "Traceback" not in err


def test_a_scalar_parameter_fsdp2_cannot_shard_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    """CLIP's logit_scale is 0-D: fully_shard refuses it (on a GPU too). Was an internal error."""
    from tests.families import FAMILIES

    spec = tmp_path / "clip.json"
    spec.write_text(json.dumps(FAMILIES["clip"]))
    code = main(
        ["analyze", str(spec), "-e", "sim", "--shard", "fsdp", "--world-size", "2", "-b", "2", "-s", "8"]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert "has a scalar parameter (logit_scale), which FSDP2's fully_shard does not shard" in err[0]


def test_mixed_precision_gathers_half_precision_parameters():
    """With mixed precision FSDP2 all-gathers bf16 parameters (MixedPrecisionPolicy): half the buffers."""
    wl = Workload(batch_size=2, seq_len=64, world_size=8)
    rm, eng = prepare(LLAMA, wl, SimEngine())
    full = eng.run(rm, setup_with(wl, ("fsdp", {})))
    mixed = eng.run(rm, setup_with(wl, ("mixed_precision", {}), ("fsdp", {})))
    f, m = full.sharding["at_peak"], mixed.sharding["at_peak"]
    assert m["sharded_parameters"] == f["sharded_parameters"]  # the shards stay float32
    assert m["all_gather_buffers"] == pytest.approx(f["all_gather_buffers"] / 2, rel=0.05)
    assert m["unsharded_parameters"] == pytest.approx(f["unsharded_parameters"] / 2, rel=0.05)
    assert any("MixedPrecisionPolicy(param_dtype=bfloat16" in n for n in mixed.notes)


def test_compare_stacks_sharding_per_rank(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    out = tmp_path / "cmp.json"
    argv = ["compare", LLAMA, "-e", "sim", "--world-size", "8", "--step", "fsdp", "-b", "2", "-s", "64"]
    # a chunked loss calls the base model and the head itself: they become FSDP units of their own
    argv += ["--step", "chunking:size=16"]
    assert main([*argv, "--json", str(out)]) == 0
    assert "8 ranks, per-rank memory" in capsys.readouterr().out
    data = json.loads(out.read_text())
    base, row = data["baseline"], data["steps"][0]
    assert row["name"] == "fsdp" and not row.get("skipped") and not row.get("error")
    assert base["sharding"] is None and row["profile"]["sharding"]["world_size"] == 8
    cats = row["profile"]["categories_at_peak"]
    assert cats["optimizer_state"] < base["categories_at_peak"]["optimizer_state"] / 4
    assert row["profile"]["peak_bytes"] < base["peak_bytes"]
    chunked = data["steps"][1]
    assert chunked["profile"] and not chunked.get("error") and not chunked.get("skipped")
    assert chunked["profile"]["peak_bytes"] < row["profile"]["peak_bytes"]
    assert any("output layer are units of their own" in n for n in chunked["profile"]["notes"])


def test_apply_writes_fsdp_training_arguments(tmp_path: Path):
    """apply with --world-size: FSDP2 settings for the Trainer, the sharded step projected in sim."""
    out = tmp_path / "out"
    argv = ["apply", LLAMA, "--step", "fsdp", "--world-size", "4", "-b", "2", "-s", "32", "-o", str(out)]
    assert main(argv) == 0
    meta = json.loads((out / "memprof.json").read_text())
    assert meta["training_args"]["fsdp"] is True
    assert meta["training_args"]["fsdp_config"] == {"version": 2, "reshard_after_forward": True}
    after, before = meta["profile_after"], meta["profile_before"]
    assert after["sharding"]["world_size"] == 4 and after["engine"] == "sim"
    assert after["peak_bytes"] < before["peak_bytes"]
