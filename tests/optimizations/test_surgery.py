"""Model surgery by its effect: attention heads removed, 2:4 zeros, gated MLPs at equal parameters."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForMaskedLM

from memprof import optimizations
from memprof.compare import compare
from memprof.engines import CpuEngine, SimEngine
from memprof.engines.base import Measure
from memprof.errors import InputError
from memprof.models import resolve
from memprof.prepare import fake_model
from memprof.recipes import from_names
from memprof.surgery.pruning import prune_heads, sparsify_2to4
from memprof.workload import StepSetup, Workload
from tests.conftest import gpu_test, tiny
from tests.optimizations.test_optimizations import QUALITY, cats, run, setup_with


def random_model(name: str, auto=AutoModelForCausalLM, attn: str = "sdpa") -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = AutoConfig.from_pretrained(tiny(name))
    cfg._attn_implementation = attn
    return auto.from_config(cfg).eval()


IDS = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(3))


# ---------------------------------------------------------------- attention heads
def test_head_pruning_removes_whole_kv_groups_and_their_score_maps():
    # tiny llama: 2 layers, 4 query heads over 2 key/value heads of 16, hidden 64, eager (scores stored)
    spec, wl = tiny("llama"), Workload(batch_size=2, seq_len=128, attn="eager")
    base = run(CpuEngine(), spec, StepSetup.of(wl), QUALITY)
    pruned = run(CpuEngine(), spec, setup_with(wl, ("pruning", {"method": "heads"})), QUALITY)
    # one of 2 groups removed per layer: 2 query heads (q rows, o columns) + 1 key + 1 value head
    removed = 2 * (2 * 16 * 64 + 16 * 64 + 16 * 64 + 64 * 2 * 16)
    assert base.profile.model["parameters"] - pruned.profile.model["parameters"] == removed
    assert cats(base)["parameters"] - cats(pruned)["parameters"] == removed * 4
    # eager attention keeps a batch x heads x seq x seq probability map per layer for backward
    scores_of_removed_heads = 2 * 2 * 2 * 128 * 128 * 4  # layers x heads x batch x seq x seq x fp32
    assert cats(base)["activations"] - cats(pruned)["activations"] >= scores_of_removed_heads
    assert pruned.profile.peak_bytes < base.profile.peak_bytes
    assert float((pruned.output - base.output).abs().max()) > 1e-3  # the function changed
    assert any("from 2 to 1 key/value groups of 2 query heads" in n for n in pruned.profile.notes)
    sim = run(SimEngine(), spec, setup_with(wl, ("pruning", {"method": "heads"})))
    assert sim.profile.model["parameters"] == pruned.profile.model["parameters"]


def test_head_pruned_llama_reloads_at_its_new_size(tmp_path):
    model = random_model("llama")
    with torch.no_grad():
        full = model(IDS).logits
    prune_heads(model, 0.5)
    with torch.no_grad():
        pruned = model(IDS).logits
    model.save_pretrained(tmp_path)
    cfg = AutoConfig.from_pretrained(tmp_path)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (2, 1, 16)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert reloaded.model.layers[0].self_attn.q_proj.weight.shape == (32, 64)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(IDS).logits, pruned, atol=1e-5, rtol=1e-5)
    assert float((pruned - full).abs().max()) > 1e-3


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_head_pruned_bert_in_memory_equals_its_zeroed_checkpoint_form(attn):
    model = random_model("bert", AutoModelForMaskedLM, attn)
    removed, zeroed = copy.deepcopy(model), copy.deepcopy(model)
    before = sum(p.numel() for p in model.parameters())
    prune_heads(removed, 0.5)
    note = prune_heads(zeroed, 0.5, checkpoint=True)
    # in memory: 2 of 4 heads of 16 gone per layer (q/k/v rows with biases, output columns)
    assert before - sum(p.numel() for p in removed.parameters()) == 2 * (3 * (32 * 64 + 32) + 64 * 32)
    assert sum(p.numel() for p in zeroed.parameters()) == before  # BERT's config cannot say fewer heads
    assert "not smaller" in note
    mask = torch.ones(2, 16, dtype=torch.long)
    mask[1, 10:] = 0  # padding goes through the same masks in both forms
    with torch.no_grad():
        a = removed(IDS, attention_mask=mask).logits
        b = zeroed(IDS, attention_mask=mask).logits
        c = model(IDS, attention_mask=mask).logits
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert float((a - c).abs().max()) > 1e-3


def test_head_pruning_says_why_not():
    gpt2 = fake_model(resolve(tiny("gpt2")), Workload())
    opt = optimizations.make("pruning", {"method": "heads"})
    assert "no attention layout" in opt.applies_to(gpt2, StepSetup.of(Workload()))
    llama = fake_model(resolve(tiny("llama")), Workload())
    assert opt.applies_to(llama, StepSetup.of(Workload())) is None


# ------------------------------------------------------------------ 2:4 sparsity
def test_2to4_zeroes_the_two_smallest_of_every_four_inputs():
    model = random_model("llama")
    head = model.lm_head.weight.detach().clone()
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear) and m is not model.lm_head]
    original = [m.weight.detach().clone() for m in linears]
    sparsify_2to4(model)
    for m, w0 in zip(linears, original):
        groups = m.weight.detach().view(m.out_features, -1, 4)  # 4 contiguous inputs of one output
        assert bool(((groups == 0).sum(-1) == 2).all())
        g0 = w0.abs().view_as(groups)
        kept, dropped = g0.masked_fill(groups == 0, float("inf")), g0.masked_fill(groups != 0, -1.0)
        assert bool((kept.min(-1).values >= dropped.max(-1).values).all())  # by magnitude
    assert torch.equal(model.lm_head.weight, head)  # the output head is left alone


def test_2to4_on_the_cpu_saves_nothing_and_says_what_would():
    spec, wl = tiny("llama"), Workload(mode="infer", batch_size=2, seq_len=32)
    base = run(CpuEngine(), spec, StepSetup.of(wl), QUALITY)
    sparse = run(CpuEngine(), spec, setup_with(wl, ("pruning", {"method": "2to4"})), QUALITY)
    assert sparse.profile.peak_bytes == base.profile.peak_bytes
    assert cats(sparse)["parameters"] == cats(base)["parameters"]
    diff = float((sparse.output - base.output).abs().max())
    assert diff > 1e-4  # half the weights gone: the output moves
    assert any("compute capability >= 8.0" in n and "unchanged" in n for n in sparse.profile.notes)
    with pytest.raises(InputError, match="leave 'amount' at 0.5"):
        optimizations.make("pruning", {"method": "2to4", "amount": 0.3})


@gpu_test()
def test_2to4_compresses_to_about_56_percent_on_an_ampere_or_newer_gpu():
    if torch.cuda.get_device_capability() < (8, 0):
        pytest.skip("the semi-structured format needs compute capability >= 8.0")
    model = torch.nn.Sequential(torch.nn.Linear(1024, 1024)).half().cuda()
    x = torch.randn(64, 1024, dtype=torch.float16, device="cuda")
    note = sparsify_2to4(model, compress=True)
    w = model[0].weight
    dense = 1024 * 1024 * 2
    stored = sum(t.numel() * t.element_size() for t in (w.packed, w.meta) if t is not None)
    assert 0.5 < stored / dense < 0.6, note
    masked = w.to_dense()
    torch.testing.assert_close(
        model(x), torch.nn.functional.linear(x, masked, model[0].bias), atol=1e-2, rtol=1e-2
    )


# -------------------------------------------------------------------- gated MLP
def test_glu_at_equal_parameters_stores_more_activations():
    # tiny BERT: 2 layers, MLP 64 -> 128 -> 64 with torch's GELU; gated: 85 hidden (2/3 of 128)
    spec, wl = tiny("bert"), Workload(batch_size=2, seq_len=64)
    for engine in (CpuEngine(), SimEngine()):
        base = run(engine, spec, StepSetup.of(wl), Measure(flops=True))
        glu = run(engine, spec, setup_with(wl, ("glu", {})), Measure(flops=True))
        p0, p1 = base.profile.model["parameters"], glu.profile.model["parameters"]
        assert abs(p1 - p0) / p0 < 0.01
        assert abs(glu.flops - base.flops) / base.flops < 0.01
        # saved per token: plain GELU input + output (2 x 128); gated: gate, GELU, up, product (4 x 85)
        extra = 2 * 2 * 64 * (4 * 85 - 2 * 128) * 4
        assert cats(glu)["activations"] - cats(base)["activations"] == extra, engine.name


def test_glu_against_gpt2_gelu_new_stores_less():
    # GPT-2's gelu_new is a chain of Python ops saving 5 tensors of the hidden size: there the
    # smaller gated hidden size wins, even with the same activation
    spec, wl = tiny("gpt2"), Workload(batch_size=2, seq_len=64)
    base = run(SimEngine(), spec, StepSetup.of(wl))
    same_act = run(SimEngine(), spec, setup_with(wl, ("glu", {"activation": "model"})))
    fused = run(SimEngine(), spec, setup_with(wl, ("glu", {"activation": "gelu"})))
    assert cats(fused)["activations"] < cats(same_act)["activations"] < cats(base)["activations"]
    assert any("GeGLU with NewGELUActivation" in n for n in same_act.profile.notes)


def test_glu_refuses_pretrained_weights_and_checkpoints(tmp_path):
    opt = optimizations.make("glu", {"activation": "silu"})
    trained = StepSetup.of(Workload())
    trained.pretrained = True
    assert "pretrained weights" in opt.applies_to(None, trained)
    llama = fake_model(resolve(tiny("llama")), Workload())
    assert "already gated" in opt.applies_to(llama, StepSetup.of(Workload()))
    # a saved checkpoint: the cpu engine loads its weights (refused), the sim engine never does
    src = tmp_path / "gpt2"
    random_model("gpt2").save_pretrained(src)
    wl = Workload(batch_size=1, seq_len=16)
    on_cpu = compare(str(src), from_names(["glu"]), wl, engine="cpu", timing_steps=0)
    assert "pretrained weights" in on_cpu.steps[0].skipped
    in_sim = compare(str(src), from_names(["glu"]), wl, engine="sim")
    assert in_sim.steps[0].skipped is None and in_sim.steps[0].profile is not None
    # memprof apply: the stock class cannot reload a gated MLP
    from memprof.apply import apply

    with pytest.raises(InputError, match="cannot write this checkpoint"):
        apply(tiny("gpt2"), from_names(["glu"]), tmp_path / "out", wl, engine="sim", profile=False)
    with pytest.raises(InputError, match="pretrained weights"):
        apply(str(src), from_names(["glu"]), tmp_path / "out", wl, engine="cpu", profile=False)
    assert not (tmp_path / "out").exists()


def test_optional_libraries_are_imported_with_torch_compile_deferred_to_the_first_call(monkeypatch):
    """bitsandbytes compiles its CPU kernels at import: under quiet_imports the compile waits for a call."""
    from memprof.surgery.quantization import quiet_imports

    calls = []

    def compile_(model=None, **options):
        calls.append((model, options))
        return lambda *a, **k: ("compiled", model(*a, **k))

    monkeypatch.setattr(torch, "compile", compile_)

    def double(x):
        return 2 * x

    module = torch.nn.Linear(2, 2)
    with quiet_imports():
        called = torch.compile(double, dynamic=False)
        decorated = torch.compile(fullgraph=True)(double)
        torch.compile(module)
        assert calls == [(module, {})]  # a module at once (torch.compile wraps it), functions not yet
    assert torch.compile is compile_
    assert called(3) == ("compiled", 6) and decorated(4) == ("compiled", 8)
    assert calls[1:] == [(double, {"dynamic": False}), (double, {"fullgraph": True})]
    assert called(5) == ("compiled", 10) and len(calls) == 3  # compiled once
    assert called.__name__ == "double"
    with pytest.raises(ValueError), quiet_imports():
        raise ValueError
    assert torch.compile is compile_
