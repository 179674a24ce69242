"""Each optimization, proven by its effect on a tiny model: the memory moved, the output held."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from memprof import optimizations
from memprof.engines import CpuEngine, SimEngine
from memprof.engines.base import Measure
from memprof.engines.runner import StepRunner
from memprof.errors import InputError
from memprof.models import resolve
from memprof.optimizations.checkpointing import enable_checkpointing
from memprof.optimizations.registry import Optimization, register
from memprof.tracking import Tracker
from memprof.workload import StepSetup, Workload
from tests.conftest import setup_with, tiny

QUALITY = Measure(quality=True)


def run(engine, spec, setup, measure=None):
    return engine.run_detailed(resolve(spec), setup, measure=measure or Measure())


def cats(r):
    return r.profile.categories_at_peak


@pytest.fixture(scope="module")
def llama():
    return tiny("llama")


# ------------------------------------------------------------------ registry
def test_registry_rejects_duplicates_and_unknown_names():
    with pytest.raises(ValueError, match="already registered"):

        @register
        class Again(Optimization):
            name = "checkpointing"

            @dataclasses.dataclass
            class Config:
                pass

    with pytest.raises(InputError, match="known: .*checkpointing"):
        optimizations.get("checkpoint")
    with pytest.raises(InputError, match="did you mean 'checkpointing'"):
        optimizations.make("checkpointng")


def test_options_are_validated_all_at_once():
    with pytest.raises(InputError) as e:
        optimizations.make("mixed_precision", {"dtype": "float8", "pure": "yes", "colour": 1})
    msg = str(e.value)
    assert "unknown option 'colour'" in msg
    assert "'dtype' must be one of bfloat16, float16" in msg
    assert "'pure' must be a boolean" in msg
    with pytest.raises(InputError, match="at least 1"):
        optimizations.make("grad_accumulation", {"steps": 0})
    with pytest.raises(InputError, match="needs dtype bfloat16"):
        optimizations.make("mixed_precision", {"dtype": "float16", "pure": True})
    # options round-trip: the config as data builds the same optimization
    opt = optimizations.make("optimizer", {"type": "sgd", "impl": "foreach"})
    assert optimizations.make("optimizer", opt.options).options == opt.options


def test_applies_to_says_why_not():
    infer = StepSetup.of(Workload(mode="infer"))
    assert "train" in optimizations.make("checkpointing").applies_to(None, infer)
    train = StepSetup.of(Workload(batch_size=3))
    assert "does not split" in optimizations.make("grad_accumulation", {"steps": 2}).applies_to(None, train)
    sdpa = StepSetup.of(Workload(attn="sdpa"))  # the default, auto, is resolved with the model
    assert "already uses sdpa" in optimizations.make("attention").applies_to(None, sdpa)
    plain = torch.nn.Sequential(torch.nn.Linear(4, 4))
    assert "no list of repeated blocks" in optimizations.make("checkpointing").applies_to(plain, train)


# -------------------------------------------------------------- checkpointing
def test_checkpointing_cuts_activations_and_keeps_the_math(llama):
    wl = Workload(batch_size=4, seq_len=64)
    base = run(CpuEngine(), llama, StepSetup.of(wl), QUALITY)
    ck = run(CpuEngine(), llama, setup_with(wl, ("checkpointing", {})), QUALITY)
    assert cats(ck)["activations"] < 0.5 * cats(base)["activations"]
    assert ck.profile.peak_bytes < base.profile.peak_bytes
    assert ck.loss_before == pytest.approx(base.loss_before, abs=1e-6)
    assert ck.loss_after == pytest.approx(base.loss_after, abs=1e-6)  # same gradients, same update


def test_checkpointing_generic_blocks_recomputes_in_backward():
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = torch.nn.ModuleList(
                torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.GELU(), torch.nn.Linear(256, 64))
                for _ in range(4)
            )

        def forward(self, x):
            for b in self.blocks:
                x = x + b(x)
            return x

    def step(model):
        x = torch.randn(32, 64, generator=torch.Generator().manual_seed(1))
        with Tracker(model) as t:
            loss = model(x).square().mean()
            params = sum(p.numel() * p.element_size() for p in model.parameters())
            saved = t.current - params  # what the forward left alive for backward
            loss.backward()
        grads = [p.grad.clone() for p in model.parameters()]
        return saved, grads

    torch.manual_seed(0)
    plain = Net()
    ck = Net()
    ck.load_state_dict(plain.state_dict())
    assert enable_checkpointing(ck, 1) == "torch.utils.checkpoint around repeated blocks"
    act_plain, g_plain = step(plain)
    act_ck, g_ck = step(ck)
    assert act_ck < 0.2 * act_plain
    for a, b in zip(g_plain, g_ck):
        torch.testing.assert_close(a, b)


def test_selective_checkpointing_sits_between(llama):
    wl = Workload(batch_size=4, seq_len=64)
    cfg = resolve(llama).config.to_dict() | {"num_hidden_layers": 4}
    import json
    import tempfile

    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(cfg, f)
    every1 = run(CpuEngine(), f.name, setup_with(wl, ("checkpointing", {"every": 1})))
    every2 = run(CpuEngine(), f.name, setup_with(wl, ("checkpointing", {"every": 2})))
    none = run(CpuEngine(), f.name, StepSetup.of(wl))
    assert cats(every1)["activations"] < cats(every2)["activations"] < cats(none)["activations"]


def test_checkpointing_in_sim_reroutes_sdpa_during_recompute(llama):
    # torch function modes are not active in backward: without the recompute context the
    # recomputation takes the CPU SDPA kernel and checkpoint's tensor count check fails.
    wl = Workload(batch_size=2, seq_len=64)
    base = run(SimEngine(), llama, StepSetup.of(wl))
    ck = run(SimEngine(), llama, setup_with(wl, ("checkpointing", {})))
    assert cats(ck)["activations"] < cats(base)["activations"]


# ------------------------------------------------------------ mixed precision
def test_autocast_cuts_activations_not_weights(llama):
    wl = Workload(batch_size=4, seq_len=64)
    base = run(CpuEngine(), llama, StepSetup.of(wl), QUALITY)
    ac = run(CpuEngine(), llama, setup_with(wl, ("mixed_precision", {"dtype": "bfloat16"})), QUALITY)
    assert cats(ac)["parameters"] == cats(base)["parameters"]
    assert cats(ac)["optimizer_state"] == cats(base)["optimizer_state"]
    base_fw = next(p.peak_bytes for p in base.profile.phases if p.name == "forward")
    ac_fw = next(p.peak_bytes for p in ac.profile.phases if p.name == "forward")
    assert ac_fw < base_fw
    rel = float((ac.output - base.output).abs().max() / base.output.abs().max())
    assert 0 < rel < 5e-2  # bf16 rounding: visible, small


def test_pure_bf16_halves_weights_gradients_and_optimizer_state(llama):
    wl = Workload(batch_size=2, seq_len=32)
    base = run(CpuEngine(), llama, StepSetup.of(wl), QUALITY)
    pure = run(CpuEngine(), llama, setup_with(wl, ("mixed_precision", {"pure": True})), QUALITY)
    assert cats(pure)["parameters"] * 2 == cats(base)["parameters"]
    assert cats(pure)["optimizer_state"] * 2 == pytest.approx(cats(base)["optimizer_state"], rel=0.01)
    assert pure.profile.workload["dtype"] == "bfloat16"
    assert abs(pure.loss_before - base.loss_before) < 0.05


def test_float16_autocast_scales_the_loss_and_unscales_the_gradients(llama):
    # SGD, unlike Adam, is not invariant to the gradient's scale: a gradient left
    # scaled by 2**16 would wreck the update, so the loss after the steps tells.
    wl = Workload(batch_size=2, seq_len=32, optimizer="sgd")
    setup = setup_with(wl, ("mixed_precision", {"dtype": "float16"}))
    assert setup.grad_scaler
    base = run(CpuEngine(), llama, StepSetup.of(wl), QUALITY)
    fp16 = run(CpuEngine(), llama, setup, QUALITY)
    assert fp16.loss_after != fp16.loss_before  # the scaled steps did update the weights
    assert fp16.loss_after == pytest.approx(base.loss_after, abs=1e-2)
    assert cats(fp16)["parameters"] == cats(base)["parameters"]  # float32 master weights
    sim = run(SimEngine(), llama, setup)  # GradScaler reads .item(); the sim's scaler must not
    assert [p.name for p in sim.profile.phases] == ["forward", "backward", "optimizer"]


# ---------------------------------------------------------- grad accumulation
def test_grad_accumulation_divides_activations_and_keeps_the_gradient(llama):
    wl = Workload(batch_size=8, seq_len=64)
    base = run(CpuEngine(), llama, StepSetup.of(wl), QUALITY)
    acc = run(CpuEngine(), llama, setup_with(wl, ("grad_accumulation", {"steps": 4})), QUALITY)
    assert cats(acc)["activations"] < 0.4 * cats(base)["activations"]
    assert acc.loss_after == pytest.approx(base.loss_after, abs=1e-5)


def test_grad_accumulation_splits_qwen2_vl_images_and_m_rope_positions(tmp_path):
    """Qwen2-VL's pixel_values are every image's patches in turn and its position_ids are
    (3, batch, seq): cut where their sequences are, each micro-batch is its own images and
    positions (before, only image_grid_thw was cut: an internal error on every engine)."""
    from tests.families import FAMILIES

    path = tmp_path / "qwen2_vl.json"
    path.write_text(json.dumps(FAMILIES["qwen2_vl"]))
    wl = Workload(batch_size=2, seq_len=16)
    base = run(CpuEngine(), str(path), StepSetup.of(wl), QUALITY)
    acc = run(CpuEngine(), str(path), setup_with(wl, ("grad_accumulation", {"steps": 2})), QUALITY)
    assert cats(acc)["activations"] < cats(base)["activations"]
    assert acc.loss_after == pytest.approx(base.loss_after, abs=1e-5)  # the same gradient


# ------------------------------------------------------------------ optimizer
def test_optimizer_state_by_algorithm(llama):
    wl = Workload(batch_size=2, seq_len=32)
    params = cats(run(CpuEngine(), llama, StepSetup.of(wl)))["parameters"]
    states = {
        kind: cats(run(CpuEngine(), llama, setup_with(wl, ("optimizer", {"type": kind}))))["optimizer_state"]
        for kind in ("adamw", "sgd", "adafactor")
    }
    assert states["adamw"] == pytest.approx(2 * params, rel=0.01)  # two moments (+ step counters)
    assert states["sgd"] == pytest.approx(params, rel=0.01)  # momentum
    assert states["adafactor"] < 0.2 * params  # factored second moments


def test_fused_optimizer_drops_the_foreach_intermediates_in_sim(llama):
    wl = Workload(batch_size=1, seq_len=16)
    foreach = run(SimEngine(), llama, setup_with(wl, ("optimizer", {"impl": "foreach"})))
    fused = run(SimEngine(), llama, setup_with(wl, ("optimizer", {"impl": "fused"})))

    def opt_peak(r):
        return next(p.peak_bytes for p in r.profile.phases if p.name == "optimizer")

    assert opt_peak(fused) < opt_peak(foreach)


def test_set_to_none_false_keeps_gradients_through_forward(llama):
    wl = Workload(batch_size=2, seq_len=32)
    keep = run(CpuEngine(), llama, setup_with(wl, ("optimizer", {"set_to_none": False})))
    free = run(CpuEngine(), llama, StepSetup.of(wl))

    def fw_peak(r):
        return next(p.peak_bytes for p in r.profile.phases if p.name == "forward")

    assert fw_peak(keep) - fw_peak(free) == pytest.approx(cats(free)["parameters"], rel=0.01)


def test_adamw8bit_without_its_library_says_how_to_install(llama, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec

    def no_lowbit(name, *args):
        return None if name.startswith(("torchao", "bitsandbytes")) else real(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", no_lowbit)
    from memprof.errors import EnvironmentProblem

    wl = Workload(batch_size=1, seq_len=8)
    why = optimizations.make("optimizer", {"type": "adamw8bit"}).applies_to(None, StepSetup.of(wl))
    assert "pip install bitsandbytes" in why
    with pytest.raises(EnvironmentProblem, match="pip install bitsandbytes"):
        run(CpuEngine(), llama, StepSetup.of(dataclasses.replace(wl, optimizer="adamw8bit")))


# ------------------------------------------------------------------ attention
def test_sdpa_stops_storing_attention_scores(llama):
    wl = Workload(batch_size=2, seq_len=128, attn="eager", dtype="bfloat16")
    eager = run(SimEngine(), llama, StepSetup.of(wl))
    sdpa = run(SimEngine(), llama, setup_with(wl, ("attention", {})))
    # eager keeps softmax(QK^T) per layer: batch x heads x seq x seq; flash keeps none
    scores = 2 * 4 * 128 * 128 * 2
    assert cats(eager)["activations"] - cats(sdpa)["activations"] >= 0.95 * 2 * scores  # two layers
    # in float32 the tiny Llama's grouped-query attention runs CUDA's math kernel, which keeps
    # the scores too (memory-efficient refuses fewer key/value heads): SDPA saves nothing there
    f32 = Workload(batch_size=2, seq_len=128, attn="eager")
    eager32 = run(SimEngine(), llama, StepSetup.of(f32))
    sdpa32 = run(SimEngine(), llama, setup_with(f32, ("attention", {})))
    assert sdpa32.profile.overheads["sdpa_kernels"] == {"math": 2}
    assert cats(sdpa32)["activations"] >= 0.95 * cats(eager32)["activations"]
    wl = Workload(batch_size=2, seq_len=128, attn="eager")
    cpu_e = run(CpuEngine(), llama, StepSetup.of(wl), QUALITY)
    cpu_s = run(CpuEngine(), llama, setup_with(wl, ("attention", {})), QUALITY)
    torch.testing.assert_close(cpu_s.output, cpu_e.output, atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------- activation offload
def test_activation_offload_moves_activations_off_the_gpu_in_sim(llama):
    wl = Workload(batch_size=4, seq_len=64)
    base = run(SimEngine(), llama, StepSetup.of(wl))
    off = run(SimEngine(), llama, setup_with(wl, ("activation_offload", {})))
    assert cats(off)["activations"] < 0.2 * cats(base)["activations"]
    assert off.profile.peak_bytes < base.profile.peak_bytes
    # the host line: what left the device is on the host (save_on_cpu copies every saved
    # tensor, weights too), and it crossed the bus twice
    host = off.profile.host
    assert host["bytes"] == host["by_kind"]["activations"]
    assert host["by_kind"]["activations"] >= cats(base)["activations"] - cats(off)["activations"]
    assert host["pcie_bytes_per_step"] >= 2 * host["by_kind"]["activations"]
    assert base.profile.host is None


def test_activation_offload_moves_nothing_on_the_cpu_engine(llama):
    wl = Workload(batch_size=4, seq_len=64)
    base = run(CpuEngine(), llama, StepSetup.of(wl), QUALITY)
    off = run(CpuEngine(), llama, setup_with(wl, ("activation_offload", {})), QUALITY)
    assert off.profile.peak_bytes == base.profile.peak_bytes  # host memory is the cpu's device memory
    assert off.profile.host["by_kind"]["activations"] > 0  # and still reported
    assert off.loss_after == pytest.approx(base.loss_after, abs=1e-6)


# ------------------------------------------------------- optimizer in backward
def test_optimizer_in_backward_frees_gradients_and_keeps_the_update(llama):
    wl = Workload(batch_size=2, seq_len=32)
    base = run(CpuEngine(), llama, setup_with(wl, ("optimizer", {"impl": "for-loop"})), QUALITY)
    oib = run(
        CpuEngine(),
        llama,
        setup_with(wl, ("optimizer", {"impl": "for-loop"}), ("optimizer_in_backward", {})),
        QUALITY,
    )

    def bw_grads(r):
        return r.profile.categories_at_peak["gradients"]

    params = cats(base)["parameters"]
    assert bw_grads(oib) < 0.5 * params
    assert oib.profile.categories_at_peak["optimizer_state"] == pytest.approx(2 * params, rel=0.01)
    assert oib.loss_after == pytest.approx(base.loss_after, abs=1e-6)


def test_optimizer_in_backward_refuses_accumulation():
    setup = setup_with(Workload(batch_size=4), ("grad_accumulation", {"steps": 2}))
    assert "accumulate" in optimizations.make("optimizer_in_backward").applies_to(None, setup)


# ------------------------------------------------------------- inference mode
def test_inference_mode_without_kv_cache(llama):
    wl = Workload(mode="infer", batch_size=2, seq_len=128)
    base = run(CpuEngine(), llama, StepSetup.of(wl))
    inf = run(CpuEngine(), llama, setup_with(wl, ("inference_mode", {})))
    # the KV cache a plain forward builds: 2 (K, V) x layers x batch x kv heads x seq x head dim x 4 bytes
    kv = 2 * 2 * 2 * 2 * 128 * 16 * 4
    assert base.profile.peak_bytes - inf.profile.peak_bytes >= kv


def test_runner_removes_its_hooks(llama):
    from memprof.models import build_model

    model, builder = build_model(resolve(llama), dtype="float32", attn="sdpa", load_weights=False)
    model.train(True)
    setup = setup_with(Workload(batch_size=2, seq_len=8), ("optimizer_in_backward", {}))
    with StepRunner(model, setup) as runner:
        runner.step(builder.build(2, 8, "cpu"))
    assert all(not p._post_accumulate_grad_hooks for p in model.parameters())


# ------------------------------------------------------------------- chunking
def test_chunked_loss_drops_the_full_logits_and_keeps_loss_and_gradient(llama):
    wl = Workload(batch_size=4, seq_len=128)
    base = run(CpuEngine(), llama, StepSetup.of(wl), QUALITY)
    ch = run(CpuEngine(), llama, setup_with(wl, ("chunking", {"size": 16})), QUALITY)
    logits = 4 * 128 * 512 * 4  # batch x seq x vocab float32
    assert base.profile.peak_bytes - ch.profile.peak_bytes >= logits
    assert ch.loss_before == pytest.approx(base.loss_before, abs=1e-5)
    assert ch.loss_after == pytest.approx(base.loss_after, abs=1e-5)  # same gradient, same update


def test_chunked_loss_gradient_equals_the_models_own():
    from memprof.chunked import chunked_lm_loss
    from memprof.models import build_model

    rm = resolve(tiny("llama"))
    model, builder = build_model(rm, dtype="float32", attn="sdpa", load_weights=False)
    inputs = builder.build(2, 64, "cpu")
    model(**inputs).loss.backward()
    ref = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    chunked_lm_loss(model, inputs, 7).backward()  # uneven chunks on purpose
    for a, b in zip(ref, [p.grad for p in model.parameters()]):
        torch.testing.assert_close(b, a, atol=1e-6, rtol=1e-5)


def test_exact_chunked_prefill_equals_the_full_forward_and_feeds_generation(llama):
    from memprof.chunked import chunked_forward
    from memprof.models import build_model

    model, builder = build_model(resolve(llama), dtype="float32", attn="sdpa", load_weights=False)
    inputs = builder.build(2, 96, "cpu", with_labels=False)
    with torch.no_grad():
        full = model(**inputs).logits
        chunked = chunked_forward(model, inputs, 32, exact=True, keep_all_logits=True)
        alone = chunked_forward(model, inputs, 32, exact=False, keep_all_logits=True)
    torch.testing.assert_close(chunked.logits, full, atol=1e-5, rtol=1e-5)
    assert float((alone.logits - full).abs().max()) > 1e-2  # independent chunks change the outputs
    wl = Workload(mode="infer", batch_size=2, seq_len=96, decode_tokens=3)
    gen = run(CpuEngine(), llama, setup_with(wl, ("chunking", {"form": "prefill", "size": 32})))
    assert [p.name for p in gen.profile.phases] == ["prefill", "decode"]


def test_chunked_prefill_lowers_the_inference_peak_and_independent_is_flagged(llama):
    wl = Workload(mode="infer", batch_size=4, seq_len=128)
    base = run(CpuEngine(), llama, StepSetup.of(wl), QUALITY)
    exact = run(CpuEngine(), llama, setup_with(wl, ("chunking", {"form": "prefill", "size": 16})), QUALITY)
    assert exact.profile.peak_bytes < base.profile.peak_bytes
    torch.testing.assert_close(exact.output, base.output, atol=1e-5, rtol=1e-5)
    setup = setup_with(wl, ("chunking", {"form": "independent", "size": 16}))
    assert any("outputs CHANGE" in n for n in setup.notes)


def test_chunking_says_why_not():
    ch = optimizations.make("chunking", {"size": 512})
    assert "covers the whole sequence" in ch.applies_to(None, StepSetup.of(Workload(seq_len=256)))
    assert "inference" in optimizations.make("chunking", {"form": "prefill"}).applies_to(
        None, StepSetup.of(Workload())
    )
    from memprof.prepare import fake_model

    bert = fake_model(resolve(tiny("bert")), Workload())
    assert "causal LMs" in optimizations.make("chunking", {"size": 8}).applies_to(
        bert, StepSetup.of(Workload())
    )


# -------------------------------------------------------------------- pruning
def test_unstructured_pruning_does_not_shrink_memory(llama):
    wl = Workload(mode="infer", batch_size=2, seq_len=32)
    base = run(CpuEngine(), llama, StepSetup.of(wl), QUALITY)
    folded = run(CpuEngine(), llama, setup_with(wl, ("pruning", {"method": "unstructured"})), QUALITY)
    masked = run(
        CpuEngine(), llama, setup_with(wl, ("pruning", {"method": "unstructured", "permanent": False}))
    )
    # the popular half-truth, measured: zeros in dense tensors take the same bytes...
    assert folded.profile.peak_bytes == base.profile.peak_bytes
    assert folded.profile.categories_at_peak["parameters"] == cats(base)["parameters"]
    assert folded.output is not None and not torch.equal(
        folded.output, base.output
    )  # ...and do change the model
    # ...and torch's reparametrisation adds a mask buffer as large as each weight
    assert cats(masked)["buffers"] - cats(base)["buffers"] > 0.5 * cats(base)["parameters"]
    assert any("parameter bytes are unchanged" in n for n in folded.profile.notes)


def test_unstructured_pruning_zeroes_the_asked_fraction():
    from memprof.models import build_model
    from memprof.surgery.pruning import prune_unstructured

    model, _ = build_model(resolve(tiny("llama")), dtype="float32", attn="sdpa", load_weights=False)
    prune_unstructured(model, 0.3)
    w = [m.weight for m in model.modules() if isinstance(m, torch.nn.Linear) and m is not model.lm_head]
    zeros = sum(int((x == 0).sum()) for x in w) / sum(x.numel() for x in w)
    assert zeros == pytest.approx(0.3, abs=0.01)


def test_structured_pruning_really_shrinks_the_ffn(llama):
    wl = Workload(batch_size=2, seq_len=32)
    base = run(CpuEngine(), llama, StepSetup.of(wl), QUALITY)
    pruned = run(CpuEngine(), llama, setup_with(wl, ("pruning", {"amount": 0.5})), QUALITY)
    # tiny llama: 2 blocks x 3 projections x 64 x 128 weights, half the neurons removed
    removed = 2 * 3 * 64 * 64
    assert base.profile.model["parameters"] - pruned.profile.model["parameters"] == removed
    assert cats(base)["parameters"] - cats(pruned)["parameters"] == removed * 4
    assert pruned.profile.peak_bytes < base.profile.peak_bytes
    assert pruned.loss_before != base.loss_before  # the function changed; compare shows by how much
    sim = run(SimEngine(), llama, setup_with(wl, ("pruning", {"amount": 0.5})))
    assert sim.profile.model["parameters"] == pruned.profile.model["parameters"]


def test_structured_pruning_says_why_not():
    from memprof.prepare import fake_model

    gpt2 = fake_model(resolve(tiny("gpt2")), Workload())
    assert "no feed-forward layout" in optimizations.make("pruning").applies_to(
        gpt2, StepSetup.of(Workload())
    )


@pytest.mark.parametrize("family", ["deepseek_v3", "qwen2_moe"])
def test_structured_pruning_refuses_feed_forwards_its_config_cannot_describe(family, tmp_path):
    """Shared experts are as wide as another config field says (moe_intermediate_size x
    n_shared_experts, shared_expert_intermediate_size): DeepSeek-V3's topk asked for more
    neurons than they have (an internal error), Qwen2-MoE's pruned checkpoint would not reload."""
    from memprof.prepare import fake_model
    from tests.families import FAMILIES

    path = tmp_path / f"{family}.json"
    path.write_text(json.dumps(FAMILIES[family]))
    model = fake_model(resolve(str(path)), Workload())
    why = optimizations.make("pruning").applies_to(model, StepSetup.of(Workload()))
    assert why and "wide beside intermediate_size 128 (shared experts)" in why


# ------------------------------------------------------------ local attention
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_sliding_window_is_a_mask_with_eager_and_sdpa(attn):
    wl = Workload(batch_size=2, seq_len=256, attn=attn)
    spec = tiny("mistral")
    base = run(CpuEngine(), spec, StepSetup.of(wl), QUALITY)
    local = run(CpuEngine(), spec, setup_with(wl, ("local_attention", {"window": 16})), QUALITY)
    # the window changes the function...
    assert float((local.output - base.output).abs().max()) > 1e-3
    # ...but saves nothing here: eager still computes and stores the full scores, and sdpa
    # trades its causal fast path for an explicit seq x seq mask
    assert local.profile.peak_bytes >= base.profile.peak_bytes
    if attn == "sdpa":
        assert local.profile.peak_bytes > base.profile.peak_bytes


def test_local_attention_says_why_not():
    from memprof.prepare import fake_model

    llama = fake_model(resolve(tiny("llama")), Workload())
    opt = optimizations.make("local_attention", {"window": 16})
    assert "no sliding window" in opt.applies_to(llama, StepSetup.of(Workload(seq_len=64)))
    assert "covers the whole sequence" in opt.applies_to(None, StepSetup.of(Workload(seq_len=16)))


# --------------------------------------------------------------- quantization
def _linear_weight_bytes(spec):
    from memprof.models import build_model

    model, _ = build_model(resolve(spec), dtype="float32", attn="sdpa", load_weights=False)
    head = model.get_output_embeddings()
    return sum(
        m.weight.numel() * 4 for m in model.modules() if isinstance(m, torch.nn.Linear) and m is not head
    )


@pytest.mark.parametrize("backend", ["torchao", "torch.ao"])
def test_int8_quantization_quarters_the_linear_weights_and_keeps_the_output_close(llama, backend):
    if backend == "torchao":
        pytest.importorskip("torchao")
    wl = Workload(mode="infer", batch_size=2, seq_len=32)
    base = run(CpuEngine(), llama, StepSetup.of(wl), QUALITY)
    q = run(CpuEngine(), llama, setup_with(wl, ("quantization", {"backend": backend})), QUALITY)
    fp32 = _linear_weight_bytes(llama)
    saved = cats(base)["parameters"] - cats(q)["parameters"]
    # int8 instead of float32: 3/4 of the Linear weight bytes go (less a scale per output row)
    assert 0.70 * fp32 < saved <= 0.75 * fp32
    assert q.profile.peak_bytes < base.profile.peak_bytes
    diff = (q.output - base.output).abs().max() / base.output.abs().max()
    assert 0 < diff < (0.05 if backend == "torchao" else 0.3)  # changed, within int8 rounding
    assert any("Linear layers, weights" in n for n in q.profile.notes)


def test_int8_weight_only_quantization_in_sim(llama):
    pytest.importorskip("torchao")
    wl = Workload(mode="infer", batch_size=2, seq_len=32)
    base = run(SimEngine(), llama, StepSetup.of(wl))
    q = run(SimEngine(), llama, setup_with(wl, ("quantization", {"backend": "torchao"})))
    saved = cats(base)["parameters"] - cats(q)["parameters"]
    assert 0.70 * _linear_weight_bytes(llama) < saved <= 0.75 * _linear_weight_bytes(llama)


def test_quantization_says_why_not(llama, monkeypatch):
    from memprof.surgery import quantization as surgery

    wl = Workload(mode="infer", batch_size=2, seq_len=32)
    setup = StepSetup.of(wl)
    assert "train" not in str(optimizations.get("quantization").modes)
    assert "infer" in optimizations.make("quantization").applies_to(None, StepSetup.of(Workload()))
    monkeypatch.setattr(surgery, "_installed", lambda name: False)
    assert "bitsandbytes is not installed" in optimizations.make("quantization", {"bits": 4}).applies_to(
        None, setup
    )
    assert "torchao is not installed" in optimizations.make(
        "quantization", {"backend": "torchao"}
    ).applies_to(None, setup)
    # auto falls back to torch.ao, which the sim engine cannot trace: the row fails with the reason
    assert surgery.quant_backend("auto", 8) == "torch.ao"
    with pytest.raises(InputError, match="fake tensors cannot trace"):
        run(SimEngine(), llama, setup_with(wl, ("quantization", {})))
