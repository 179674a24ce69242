"""The lora optimization: PEFT's adapters on a frozen model, measured on the cpu and sim engines."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from rich.console import Console
from transformers import AutoConfig, AutoModelForCausalLM

from memprof import optimizations
from memprof.engines import CpuEngine, SimEngine
from memprof.engines.base import Measure
from memprof.engines.runner import StepRunner
from memprof.engines.sim import cpu_semantics_sim
from memprof.errors import ExitCode, InputError
from memprof.models import build_model, resolve
from memprof.prepare import fake_model, stack
from memprof.recipes import from_names
from memprof.report.terminal import render
from memprof.workload import StepSetup, Workload
from tests.conftest import setup_with, tiny

peft = pytest.importorskip("peft")

QUALITY = Measure(quality=True)
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")


@pytest.fixture(scope="module")
def llama():
    return tiny("llama")


def run(engine, spec, setup, measure=None):
    return engine.run_detailed(resolve(spec), setup, measure=measure or Measure())


def cats(r):
    return r.profile.categories_at_peak


def tiny_llama() -> torch.nn.Module:
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(tiny("llama")))


def peft_trainable(model: torch.nn.Module, **lora_config) -> int:
    """PEFT's own count: get_peft_model on a copy."""
    wrapped = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(**lora_config))
    return wrapped.get_nb_trainable_parameters()[0]


def lora_model(**options) -> torch.nn.Module:
    model = tiny_llama()
    optimizations.make("lora", options).transform_model(model, StepSetup.of(Workload()))
    return model


def trainable_names(model: torch.nn.Module) -> list[str]:
    return [n for n, p in model.named_parameters() if p.requires_grad]


# ------------------------------------------------------------------ what is trained
@pytest.mark.parametrize(
    "options,peft_options",
    [
        ({}, {"r": 16, "lora_alpha": 32, "target_modules": "all-linear"}),
        ({"rank": 4, "targets": "attention"}, {"r": 4, "target_modules": list(ATTENTION)}),
        ({"rank": 8, "dora": True}, {"r": 8, "target_modules": "all-linear", "use_dora": True}),
    ],
)
def test_trainable_parameters_are_peft_own_count(llama, options, peft_options):
    expected = peft_trainable(tiny_llama(), **peft_options)
    total = sum(p.numel() for p in tiny_llama().parameters())
    r = run(CpuEngine(), llama, setup_with(Workload(batch_size=1, seq_len=8), ("lora", options)))
    params = r.profile.parameters
    assert params["trainable"] == expected == params["adapters"]
    assert params["frozen"] == total  # every base weight, the embeddings and the head included
    assert params["trainable_bytes"] == 4 * expected and params["frozen_bytes"] == 4 * total


def test_baseline_training_profile_has_everything_trainable_and_inference_none(llama):
    r = run(CpuEngine(), llama, StepSetup.of(Workload(batch_size=1, seq_len=8)))
    total = sum(p.numel() for p in tiny_llama().parameters())
    assert r.profile.parameters == {
        "trainable": total,
        "frozen": 0,
        "trainable_bytes": 4 * total,
        "frozen_bytes": 0,
        "adapters": None,
    }
    assert (
        run(
            CpuEngine(), llama, StepSetup.of(Workload(mode="infer", batch_size=1, seq_len=8))
        ).profile.parameters
        is None
    )


def test_base_weights_get_no_gradient_and_no_optimizer_state(llama):
    model, builder = build_model(resolve(llama))
    inputs = builder.build(2, 16, torch.device("cpu"), with_labels=True)
    with StepRunner(model, setup_with(Workload(batch_size=2, seq_len=16), ("lora", {}))) as runner:
        runner.step(inputs)
        runner.step(inputs)
        adapters = {p for n, p in model.named_parameters() if "lora_" in n}
        assert adapters and {p for n, p in model.named_parameters() if p.requires_grad} == adapters
        optimized = {p for g in runner.optimizer.param_groups for p in g["params"]}
        assert optimized == adapters
        assert set(runner.optimizer.state) == adapters
        assert all(p.grad is None for p in model.parameters() if p not in adapters)


def test_attention_preset_adapts_only_the_attention_projections():
    model = lora_model(targets="attention")
    adapted = {n.split(".lora_")[0].rpartition(".")[2] for n in trainable_names(model)}
    assert adapted == set(ATTENTION)


def test_named_targets_and_dora_magnitude_vectors():
    plain = lora_model(rank=4, targets="q_proj,v_proj")
    dora = lora_model(rank=4, targets="q_proj+v_proj", dora=True)
    assert {n.split(".lora_")[0].rpartition(".")[2] for n in trainable_names(plain)} == {"q_proj", "v_proj"}
    magnitudes = [n for n in trainable_names(dora) if "lora_magnitude_vector" in n]
    # one magnitude per output feature of each adapted layer: q 64 + v 32, in 2 layers
    assert len(magnitudes) == 4
    count = {n: p.numel() for n, p in dora.named_parameters() if p.requires_grad}
    extra = sum(count.values()) - sum(p.numel() for p in plain.parameters() if p.requires_grad)
    assert extra == 2 * (64 + 32)


def test_bfloat16_model_keeps_float32_adapters_as_get_peft_model_does():
    model = tiny_llama().to(torch.bfloat16)
    optimizations.make("lora").transform_model(model, StepSetup.of(Workload()))
    dtypes = {n: p.dtype for n, p in model.named_parameters()}
    assert {d for n, d in dtypes.items() if "lora_" in n} == {torch.float32}
    assert {d for n, d in dtypes.items() if "lora_" not in n} == {torch.bfloat16}


def test_adapter_dtype_model_keeps_bfloat16_adapters_and_saves_no_float32_inputs(llama):
    model = tiny_llama().to(torch.bfloat16)
    optimizations.make("lora", {"adapter_dtype": "model"}).transform_model(model, StepSetup.of(Workload()))
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    wl = Workload(batch_size=2, seq_len=64, dtype="bfloat16")
    upcast = run(CpuEngine(), llama, setup_with(wl, ("lora", {}))).profile
    same = run(CpuEngine(), llama, setup_with(wl, ("lora", {"adapter_dtype": "model"}))).profile
    # float32 adapters: a float32 copy of each adapted layer's input is saved for lora_A's gradient
    assert upcast.categories_at_peak["activations"] > 1.2 * same.categories_at_peak["activations"]
    assert same.parameters["trainable_bytes"] * 2 == upcast.parameters["trainable_bytes"]


# ------------------------------------------------------------------ the measurement
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_cpu_and_sim_agree_on_a_lora_step(llama, dtype):
    setup = setup_with(Workload(batch_size=2, seq_len=64, dtype=dtype), ("lora", {}))
    cpu = run(CpuEngine(), llama, setup).profile
    sim = run(cpu_semantics_sim(), llama, setup).profile
    assert sim.peak_bytes == pytest.approx(cpu.peak_bytes, rel=0.01)
    assert sim.parameters == cpu.parameters
    # and the CUDA-semantics sim, with its 512-byte blocks on these tiny tensors
    cuda = run(SimEngine(), llama, setup).profile
    if dtype == "bfloat16":
        assert cuda.peak_bytes == pytest.approx(cpu.peak_bytes, rel=0.05)
    else:
        # float32 grouped-query attention: CUDA runs the math kernel (memory-efficient refuses
        # it, measured on an H200), which keeps the scores the CPU's flash kernel does not
        assert cuda.overheads["sdpa_kernels"] == {"math": 2}
        assert cuda.peak_bytes > cpu.peak_bytes


def test_gradients_and_optimizer_state_shrink_to_the_adapters_activations_stay(llama):
    wl = Workload(batch_size=2, seq_len=64)
    base = run(CpuEngine(), llama, StepSetup.of(wl), QUALITY)
    lora = run(CpuEngine(), llama, setup_with(wl, ("lora", {})), QUALITY)
    adapter_bytes = lora.profile.parameters["trainable_bytes"]
    weight_bytes = base.profile.parameters["trainable_bytes"]
    assert adapter_bytes < 0.25 * weight_bytes

    def most_gradients(r):
        return max(r.profile.timeline["categories"]["gradients"])

    # gradients: every weight's in the baseline, only the adapters' with LoRA
    assert most_gradients(base) >= weight_bytes
    assert most_gradients(lora) <= adapter_bytes
    # AdamW: two moments per trained element (and a step counter each)
    assert cats(base)["optimizer_state"] == pytest.approx(2 * weight_bytes, rel=0.01)
    assert cats(lora)["optimizer_state"] == pytest.approx(2 * adapter_bytes, rel=0.01)
    # the frozen layers' inputs are still saved: the adapters' gradients and the chain need them
    assert cats(lora)["activations"] >= 0.8 * cats(base)["activations"]
    assert cats(lora)["parameters"] == pytest.approx(weight_bytes + adapter_bytes, rel=0.01)
    # lora_B starts at zero: the model computes what the baseline computes
    assert lora.loss_before == pytest.approx(base.loss_before, abs=1e-6)
    assert lora.loss_after != lora.loss_before  # and the adapters train


def test_terminal_report_shows_frozen_and_trainable(llama):
    lora = run(SimEngine(), llama, setup_with(Workload(batch_size=1, seq_len=16), ("lora", {}))).profile
    base = run(SimEngine(), llama, StepSetup.of(Workload(batch_size=1, seq_len=16))).profile

    def text(p):
        console = Console(width=200, record=True)
        render(p, console)
        return console.export_text()

    line = next(ln for ln in text(lora).splitlines() if "Parameters" in ln)
    assert (
        "139.6K frozen (545.25 KiB)" in line and "32.8K trainable (19.01%; LoRA adapters, 128.0 KiB)" in line
    )
    assert "frozen" not in text(base)
    assert lora.to_dict()["parameters"]["adapters"] == 32768


# ------------------------------------------------------------------ options and conflicts
def test_bad_options_are_listed_at_once():
    with pytest.raises(InputError) as e:
        optimizations.make("lora", {"rank": 0, "alpha": 0, "dropout": 1.5, "targets": "q-proj!,v_proj"})
    msg = str(e.value)
    for needle in (
        "'rank' must be at least 1",
        "'alpha' must be above 0",
        "'dropout'",
        "'q-proj!' is not a module name",
    ):
        assert needle in msg
    with pytest.raises(InputError, match="'targets' is empty"):
        optimizations.make("lora", {"targets": " , "})


def test_unknown_target_names_say_which_the_model_has(llama):
    model = fake_model(resolve(llama), Workload())
    setup = StepSetup.of(Workload())
    why = optimizations.make("lora", {"targets": "query,v_proj,dense"}).applies_to(model, setup)
    assert "no Linear layer named query, dense" in why
    assert "down_proj, gate_proj, k_proj, o_proj, q_proj, up_proj, v_proj" in why
    assert optimizations.make("lora", {"targets": "v_proj"}).applies_to(model, setup) is None
    infer = StepSetup.of(Workload(mode="infer"))
    assert "train" in optimizations.make("lora").applies_to(model, infer)
    none = StepSetup.of(Workload(optimizer="none"))
    assert "no optimizer" in optimizations.make("lora").applies_to(model, none)


def test_stacks_with_what_makes_sense_and_refuses_layer_rewrites_after_it(llama):
    wl = Workload(batch_size=2, seq_len=64)
    model = fake_model(resolve(llama), wl)
    good = from_names(
        [
            "pruning:method=structured,amount=0.5",
            "lora",
            "checkpointing",
            "mixed_precision:dtype=bfloat16",
            "chunking:size=16",
            "optimizer_in_backward",
        ]
    )
    setup, skipped = stack(good, wl, model)
    assert not skipped and [s["name"] for s in setup.steps] == [s.name for s in good.steps]
    r = run(SimEngine(), llama, setup)
    assert r.profile.parameters["adapters"] == r.profile.parameters["trainable"] > 0
    # layers rewritten after the adapters are attached would lose them (or get pruned adapters)
    setup, skipped = stack(from_names(["lora", "pruning"]), wl, model)
    assert [s["name"] for s in setup.steps] == ["lora"]
    assert "pruning rewrites layers after lora attached its adapters: list it before lora" in skipped[0]
    twice = setup_with(wl, ("lora", {}))
    assert "already has adapters" in optimizations.make("lora", {"rank": 4}).applies_to(model, twice)


def test_fsdp_shards_the_frozen_model_and_the_adapters(llama):
    wl = Workload(batch_size=2, seq_len=64, world_size=2)
    alone = run(SimEngine(), llama, setup_with(Workload(batch_size=2, seq_len=64), ("lora", {}))).profile
    sharded = run(SimEngine(), llama, setup_with(wl, ("lora", {}), ("fsdp", {}))).profile
    assert sharded.categories_at_peak["optimizer_state"] < 0.6 * alone.categories_at_peak["optimizer_state"]
    assert sharded.parameters["frozen_bytes"] < 0.6 * alone.parameters["frozen_bytes"]


# ------------------------------------------------------------------ PEFT missing
def test_missing_peft_is_one_line_with_the_install_hint(llama, capsys, monkeypatch):
    import importlib.util

    from memprof.cli import main
    from memprof.engines.base import Engine

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "peft" else real(name, *a)
    )

    def no_run(*args, **kwargs):
        raise AssertionError("nothing runs before the missing library is reported")

    monkeypatch.setattr(Engine, "run_detailed", no_run)
    code = main(["compare", llama, "--engine", "sim", "--step", "lora", "-b", "1", "-s", "8"])
    err = capsys.readouterr().err
    assert code == ExitCode.ENVIRONMENT
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "pip install 'memprof[lora]'" in lines[0], err
    assert "Traceback" not in err


def test_lora_with_chunked_loss_and_activation_offload_traces_in_sim():
    # a frozen head under saved-tensor hooks: the chunk's recomputation must take the forward's path
    from memprof.engines import SimEngine
    from memprof.models import resolve

    wl = Workload(batch_size=2, seq_len=64, dtype="bfloat16")
    rm = resolve(tiny("llama"))
    stacked = setup_with(wl, ("activation_offload", {}), ("lora", {}))
    chunked = setup_with(
        wl, ("chunking", {"form": "loss", "size": 16}), ("activation_offload", {}), ("lora", {})
    )
    plain = SimEngine().run(rm, stacked)
    p = SimEngine().run(rm, chunked)
    assert p.peak_bytes < plain.peak_bytes  # the full logits never exist at once


def test_targets_peft_refuses_are_one_line_not_an_internal_error(tmp_path, capsys):
    """PEFT refuses Mamba's out_proj and conv1d, which all-linear picks: the user's choice of
    targets, said in one line with exit 2 (was an internal error, exit 70)."""
    from memprof.cli import main
    from tests.families import FAMILIES

    path = tmp_path / "mamba.json"
    path.write_text(json.dumps(FAMILIES["mamba"]))
    code = main(
        ["analyze", str(path), "-e", "sim", "-b", "2", "-s", "16", "--step", "lora:targets=all-linear"]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith("memprof: error: lora: targets 'all-linear': ") and "out_proj" in err[0]
