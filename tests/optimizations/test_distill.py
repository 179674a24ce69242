"""Distillation: the teacher's and the student's memory apart, and each teacher option by its effect."""

from __future__ import annotations

import glob
import json
import os
import tempfile
from pathlib import Path

import pytest
import torch

from memprof import optimizations
from memprof.distill_loss import kd_loss
from memprof.engines import CpuEngine, SimEngine
from memprof.engines.base import Measure
from memprof.errors import InputError
from memprof.models import resolve
from memprof.profile import Profile
from memprof.tracking import CATEGORIES
from memprof.workload import StepSetup, Workload
from tests.conftest import setup_with, tiny

B, L, V = 2, 32, 512  # the tiny llamas' vocabulary


def distill(**kw) -> Workload:
    kw.setdefault("batch_size", B)
    kw.setdefault("seq_len", L)
    kw.setdefault("teacher", tiny("llama-teacher"))
    return Workload(mode="distill", **kw)


def run(setup, engine=None, measure=None, student=None):
    return (engine or CpuEngine()).run_detailed(
        resolve(student or tiny("llama")), setup, measure=measure or Measure()
    )


def side(r, name: str) -> dict[str, int]:
    return r.profile.split_at_peak[name]


def param_bytes(r, who: str, per: int = 4) -> int:
    m = r.profile.model
    return per * int(m["teacher"]["parameters"] if who == "teacher" else m["parameters"])


@pytest.fixture(scope="module")
def peaked_teacher(tmp_path_factory) -> str:
    """A saved tiny teacher whose next-token distributions are peaked, as a trained LM's are.

    A randomly initialised LM is near-uniform over its vocabulary: its top-k
    holds k/V of the mass, the worst case for a top-k approximation. Scaling
    the LM head by 30 puts 0.99 of the mass in the top 16 (measured below).
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(tiny("llama-teacher")))
    with torch.no_grad():
        model.lm_head.weight.mul_(30)
    folder = tmp_path_factory.mktemp("teacher") / "peaked-teacher"
    model.save_pretrained(folder)
    return str(folder)


# ----------------------------------------------------------------- the loss
def test_kd_loss_is_the_tempered_kl_and_topk_of_the_whole_vocab_is_exact():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 5, 11, generator=g), torch.randn(2, 5, 11, generator=g) * 3
    T = 2.0
    p, q = (t / T).softmax(-1), (s / T).softmax(-1)
    expected = (p * (p.log() - q.log())).sum(-1).mean() * T * T
    assert float(kd_loss(s, t, T)) == pytest.approx(float(expected), rel=1e-5)
    assert float(kd_loss(t, t, T)) == pytest.approx(0.0, abs=1e-6)
    # top-k over the whole vocabulary renormalises nothing: the full KL again
    v, ix = t.topk(11, dim=-1)
    assert float(kd_loss(s, (v, ix), T)) == pytest.approx(float(expected), rel=1e-5)
    # a smaller top-k is the KL from the truncated teacher: larger here (near-uniform student)
    v, ix = t.topk(3, dim=-1)
    assert float(kd_loss(s, (v, ix), T)) > float(expected)


# --------------------------------------------------------- validation, CLI
def test_workload_and_teacher_validation(tmp_path):
    with pytest.raises(InputError, match="needs --teacher"):
        Workload(mode="distill").validate()
    with pytest.raises(InputError, match="distill only"):
        Workload(teacher=tiny("llama")).validate()
    with pytest.raises(InputError, match="--ce-weight"):
        distill(ce_weight=1.5).validate()
    with pytest.raises(InputError, match="--temperature"):
        distill(temperature=0).validate()
    cfg = json.loads(Path(tiny("llama-teacher")).read_text()) | {"vocab_size": 1024}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(InputError, match="vocabulary of 1024 tokens and the student llama 512"):
        run(StepSetup.of(distill(teacher=str(tmp_path))))
    with pytest.raises(InputError, match="token by token: the student must be"):
        run(StepSetup.of(distill()), student=tiny("bert-cls"))
    # a runner never falls back to a plain training step without its teacher
    from memprof.engines.runner import StepRunner
    from memprof.models import build_model

    model, builder = build_model(resolve(tiny("llama")))
    with pytest.raises(InputError, match="needs its teacher"):
        StepRunner(model, distill()).step(builder.build(B, 8, "cpu"))


def cli(capsys, *args):
    from memprof.cli import main

    code = main(list(args))
    return code, *capsys.readouterr()


def test_cli_distill_errors_are_one_line_exit_2(capsys, tmp_path):
    code, out, err = cli(capsys, "analyze", tiny("llama"), "--mode", "distill", "-e", "cpu")
    assert code == 2 and err.strip() == "memprof: error: --mode distill needs --teacher MODEL"
    cfg = json.loads(Path(tiny("llama-teacher")).read_text()) | {"vocab_size": 1000}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    code, out, err = cli(
        capsys, "compare", tiny("llama"), "--mode", "distill", "--teacher", str(tmp_path), "--step",
        "distill_teacher", "-e", "cpu",
    )  # fmt: skip
    assert code == 2 and len(err.strip().splitlines()) == 1 and "share the vocabulary" in err
    code, out, err = cli(capsys, "analyze", tiny("llama"), "--teacher", tiny("llama-teacher"), "-e", "cpu")
    assert code == 2 and "--teacher applies to --mode distill only" in err
    code, out, err = cli(
        capsys,
        "apply",
        tiny("llama"),
        "-o",
        str(tmp_path / "o"),
        "--step",
        "checkpointing",
        "--mode",
        "distill",
    )
    assert code == 2 and "analyze or compare" in err


def test_cli_analyze_distill_reports_sides_and_json_round_trips(capsys, tmp_path):
    path = tmp_path / "p.json"
    code, out, err = cli(
        capsys, "analyze", tiny("llama"), "--mode", "distill", "--teacher", tiny("llama-teacher"),
        "-e", "sim", "-b", "2", "-s", "16", "--json", str(path),
    )  # fmt: skip
    assert code == 0, err
    assert "Memory at the peak, by side" in out and "Teacher" in out and "llama-teacher" in out
    d = json.loads(path.read_text())
    assert set(d["split_at_peak"]) == {"student", "teacher", "loss", "other"}
    p = Profile.from_dict(d)
    assert p.split_at_peak == d["split_at_peak"]
    for c in CATEGORIES:  # the sides add up to the whole
        assert sum(s[c] for s in p.split_at_peak.values()) == p.categories_at_peak[c]
    # profiles written before the field read as no split
    d.pop("split_at_peak")
    assert Profile.from_dict(d).split_at_peak == {}


def test_cli_compare_distill_shows_the_sides_before_and_after(capsys):
    code, out, err = cli(
        capsys, "compare", tiny("llama"), "--mode", "distill", "--teacher", tiny("llama-teacher"),
        "--step", "distill_teacher:topk=8", "-e", "sim", "-b", "2", "-s", "16", "--json", "-",
    )  # fmt: skip
    assert code == 0, err
    d = json.loads(out)
    base, top = d["baseline"]["split_at_peak"], d["steps"][0]["profile"]["split_at_peak"]
    assert base["teacher"]["parameters"] > 0 and top["teacher"]["parameters"] == 0
    code, out, err = cli(
        capsys, "compare", tiny("llama"), "--mode", "distill", "--teacher", tiny("llama-teacher"),
        "--step", "distill_teacher", "-e", "sim", "-b", "2", "-s", "16",
    )  # fmt: skip
    assert code == 0, err
    assert "At the peak, by side" in out and "teacher" in out


# ------------------------------------------------------------ the baseline
def test_sides_hold_their_own_parameters_gradients_and_optimizer_state():
    # set_to_none=False keeps the student's gradients allocated between steps,
    # so they are live at the forward peak and their owner shows
    r = run(setup_with(distill(), ("distill_teacher", {}), ("optimizer", {"set_to_none": False})))
    st, te = side(r, "student"), side(r, "teacher")
    assert st["parameters"] == param_bytes(r, "student")
    assert te["parameters"] == param_bytes(r, "teacher")
    assert st["gradients"] == param_bytes(r, "student")
    assert te["gradients"] == 0 and te["optimizer_state"] == 0
    # AdamW: two moments per student parameter (and a step counter per tensor)
    assert 2 * param_bytes(r, "student") <= st["optimizer_state"] < 2 * param_bytes(r, "student") + 1024
    assert r.profile.model["teacher"]["parameters"] > 4 * r.profile.model["parameters"]


def test_naive_baseline_keeps_teacher_gradients_and_graph_and_no_grad_removes_them():
    q = Measure(quality=True)
    base = run(StepSetup.of(distill()), measure=q)
    ng = run(setup_with(distill(), ("distill_teacher", {})), measure=q)
    tb, tn = side(base, "teacher"), side(ng, "teacher")
    # the naive teacher: gradients nobody zeroes, and its saved activations
    assert tb["gradients"] == param_bytes(base, "teacher")
    assert tb["activations"] > 5 * B * L * V * 4
    # no_grad: no gradients, and of the teacher's activations only its logits remain
    assert tn["gradients"] == 0
    assert tn["activations"] == B * L * V * 4
    drop = base.profile.peak_bytes - ng.profile.peak_bytes
    assert drop >= tb["gradients"] + tb["activations"] - tn["activations"] - 64 * 1024
    # the student's step is the same: same loss, same update
    assert ng.loss_before == pytest.approx(base.loss_before, abs=1e-6)
    assert ng.loss_after == pytest.approx(base.loss_after, abs=1e-6)


def test_teacher_in_bfloat16_halves_its_parameters():
    q = Measure(quality=True)
    full = run(setup_with(distill(), ("distill_teacher", {})), measure=q)
    half = run(setup_with(distill(), ("distill_teacher", {"dtype": "bfloat16"})), measure=q)
    assert side(half, "teacher")["parameters"] * 2 == side(full, "teacher")["parameters"]
    assert side(full, "student") == side(half, "student")
    assert half.profile.model["teacher"]["dtype"] == "bfloat16"
    # the targets change by bf16 rounding only
    assert half.loss_before == pytest.approx(full.loss_before, abs=1e-3)


def test_topk_takes_the_teacher_out_of_the_step_and_keeps_the_kl(peaked_teacher):
    k = 16
    wl = distill(teacher=peaked_teacher, ce_weight=0.0)  # the loss is the KL alone
    q = Measure(quality=True, flops=True)
    before = set(glob.glob(os.path.join(tempfile.gettempdir(), "memprof-topk-*")))
    full = run(setup_with(wl, ("distill_teacher", {})), measure=q)
    top = run(setup_with(wl, ("distill_teacher", {"topk": k})), measure=q)
    tf, tt = side(full, "teacher"), side(top, "teacher")
    assert tf["parameters"] == param_bytes(full, "teacher")
    assert tt["parameters"] == 0 and tt["buffers"] == 0
    # what is left of the teacher: at most its top-k values (float32) and indices (int64)
    assert 0 < sum(tt.values()) <= B * L * k * (4 + 8)
    assert full.profile.peak_bytes - top.profile.peak_bytes >= tf["parameters"]
    assert top.flops < 0.5 * full.flops  # no teacher forward in the step
    # the KL over the peaked teacher's top-16 (renormalised) is within 2% of the full KL
    assert full.loss_before > 1.0
    assert top.loss_before == pytest.approx(full.loss_before, rel=0.02)
    assert "an approximation" in " ".join(top.profile.notes)
    # the file written for the top-k is gone after the run
    assert set(glob.glob(os.path.join(tempfile.gettempdir(), "memprof-topk-*"))) == before


def test_topk_is_read_per_micro_batch():
    k = 16
    one = run(setup_with(distill(batch_size=4), ("distill_teacher", {"topk": k})))
    two = run(
        setup_with(
            distill(batch_size=4), ("grad_accumulation", {"steps": 2}), ("distill_teacher", {"topk": k})
        )
    )
    # only the current micro-batch's top-k is on the device
    assert sum(side(two, "teacher").values()) * 2 == sum(side(one, "teacher").values())


# ------------------------------------------------- student-side optimizations
def test_checkpointing_acts_on_the_student_only():
    base = run(setup_with(distill(), ("distill_teacher", {})))
    ck = run(setup_with(distill(), ("distill_teacher", {}), ("checkpointing", {})))
    assert side(ck, "student")["activations"] < 0.5 * side(base, "student")["activations"]
    assert side(ck, "teacher") == side(base, "teacher")


def test_which_optimizations_apply_to_distillation():
    dist = StepSetup.of(distill())
    train = StepSetup.of(Workload())
    for name in (
        "checkpointing",
        "grad_accumulation",
        "optimizer",
        "optimizer_in_backward",
        "activation_offload",
    ):
        assert optimizations.make(name).applies_to(None, dist) is None, name
    assert optimizations.make("mixed_precision").applies_to(None, dist) is None
    assert "chunked KD loss" in optimizations.make("chunking").applies_to(None, dist)
    assert "not distill" in optimizations.make("inference_mode").applies_to(None, dist)
    assert (
        optimizations.make("distill_teacher").applies_to(None, train)
        == "applies to distill workloads, not train"
    )
    done = setup_with(distill(), ("distill_teacher", {"dtype": "bfloat16"}))
    assert "already" in optimizations.make("distill_teacher").applies_to(None, done)
    assert optimizations.make("distill_teacher", {"topk": 8}).applies_to(None, done) is None
    from memprof.prepare import fake_model

    student = fake_model(resolve(tiny("llama")), distill())
    why = optimizations.make("distill_teacher", {"topk": V}).applies_to(student, dist)
    assert "whole vocabulary of 512" in why
    with pytest.raises(InputError, match="leave no_grad on"):
        optimizations.make("distill_teacher", {"topk": 8, "no_grad": False})


def test_sim_engine_distill_sides_add_up_and_bf16_teacher_halves():
    full = run(setup_with(distill(), ("distill_teacher", {})), engine=SimEngine())
    half = run(setup_with(distill(), ("distill_teacher", {"dtype": "bfloat16"})), engine=SimEngine())
    p = full.profile
    for c in CATEGORIES:
        assert sum(s[c] for s in p.split_at_peak.values()) == p.categories_at_peak[c]
    assert side(full, "teacher")["parameters"] == pytest.approx(
        2 * side(half, "teacher")["parameters"], rel=0.01
    )


def test_distillation_moves_the_student_towards_the_teacher():
    r = run(
        setup_with(distill(ce_weight=0.0), ("distill_teacher", {}), ("optimizer", {"type": "sgd"})),
        measure=Measure(quality=True),
    )
    # two SGD steps on the KL alone: the KL to the teacher goes down
    assert r.loss_after < r.loss_before
