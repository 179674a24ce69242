"""Engines run real (cpu) and simulated (sim) steps; their numbers are checked, not only that they ran."""

from __future__ import annotations

import pytest
import torch

import memprof
from memprof.engines import get_engine
from memprof.engines.cuda_semantics import choose_sdpa_kernel
from memprof.engines.sim import SimEngine
from memprof.errors import EnvironmentProblem, InputError, OutOfMemory
from memprof.models import bundled_models, resolve
from memprof.tracking import CATEGORIES
from memprof.workload import Workload
from tests.conftest import gpu_test, greedy_model, tiny


def _check_profile(p):
    assert set(p.categories_at_peak) == set(CATEGORIES)
    assert sum(p.categories_at_peak.values()) == p.peak_bytes
    assert p.peak_bytes == max(ph.peak_bytes for ph in p.phases)
    assert p.categories_at_peak["parameters"] > 0


@pytest.mark.parametrize("name", ["gpt2", "llama", "bert", "bert-cls", "t5", "vit", "whisper"])
@pytest.mark.parametrize("mode", ["train", "infer"])
def test_cpu_engine_every_tiny_architecture(name, mode):
    p = memprof.analyze(tiny(name), engine="cpu", mode=mode, batch_size=2, seq_len=16)
    _check_profile(p)
    assert p.engine == "cpu"
    phases = [ph.name for ph in p.phases]
    assert phases == (["forward", "backward", "optimizer"] if mode == "train" else ["forward"])
    if mode == "train":
        # steady state: Adam's two moments exist for every trainable parameter
        # (Whisper's encoder positions are frozen, hence a little under 2x)
        assert p.categories_at_peak["optimizer_state"] >= 1.9 * p.categories_at_peak["parameters"]
    else:
        assert p.categories_at_peak["gradients"] == 0 and p.categories_at_peak["optimizer_state"] == 0


def test_parameter_bytes_match_the_model():
    p = memprof.analyze(tiny("llama"), engine="cpu", mode="infer", batch_size=1, seq_len=8)
    n = p.model["parameters"]
    assert p.categories_at_peak["parameters"] == n * 4


# the 70B shape is the 8B's architecture, larger: building it on fake tensors alone takes ~9 s
# here; bench/fsdp_scale.py runs it (docs/benchmarks.md). The mixture-of-experts shapes take
# 10-20 s a step here: their experts run in tests/engines/test_moe.py on tiny configs, and their
# published parameter counts are checked below on a fake build
_SLOW_BUNDLED = ("llama-3-70b", "mixtral-8x7b", "qwen3-30b-a3b")


@pytest.mark.parametrize("name", [m for m in bundled_models() if m not in _SLOW_BUNDLED])
def test_sim_engine_every_bundled_config(name):
    p = memprof.analyze(name, engine="sim", mode="train", batch_size=1, seq_len=64, dtype="bfloat16")
    _check_profile(p)
    assert p.engine == "sim" and p.overheads["included_in_peak"] is False
    # bf16 parameters, 512-byte blocks: at least 2 bytes a parameter
    assert p.categories_at_peak["parameters"] >= 2 * p.model["parameters"]
    # every block is a multiple of 512 bytes
    assert p.peak_bytes % 512 == 0


@pytest.mark.parametrize(
    "name,params",
    # the published totals: Mixtral-8x7B 46.7B, Qwen3-30B-A3B 30.5B (3.3B active)
    [("mixtral-8x7b", 46_702_792_704), ("qwen3-30b-a3b", 30_532_122_624)],
)
def test_bundled_mixture_of_experts_parameter_counts(name, params):
    from memprof.api import fake_model
    from memprof.models import parameter_count

    model = fake_model(resolve(name), Workload(dtype="bfloat16"))
    assert parameter_count(model) == params


def test_sim_llama_8b_parameter_count():
    p = memprof.analyze("llama-3-8b", engine="sim", mode="infer", batch_size=1, seq_len=16, dtype="bfloat16")
    assert p.model["parameters"] == 8_030_261_248
    assert p.categories_at_peak["parameters"] == pytest.approx(2 * 8_030_261_248, rel=1e-3)


def _run(engine, name, **kw):
    wl = Workload(**kw)
    return engine.run(resolve(tiny(name)), wl)


def test_sim_agrees_with_cpu_on_eager_float32():
    kw = dict(mode="train", batch_size=4, seq_len=64, attn="eager", dtype="float32", optimizer="none")
    cpu = _run(get_engine("cpu"), "llama", **kw)
    sim = SimEngine()
    sim.block_rounding = 1  # exact bytes, as the cpu engine counts
    sim_p = _run(sim, "llama", **kw)
    for a, b in zip(cpu.phases, sim_p.phases):
        assert a.name == b.name
        assert b.peak_bytes == pytest.approx(a.peak_bytes, rel=0.01)
    assert sim_p.peak_bytes == pytest.approx(cpu.peak_bytes, rel=0.01)


def test_sim_ties_the_lm_head_as_a_real_build():
    # tiny gpt2 ties its head to the input embeddings (transformers' default)
    kw = dict(mode="infer", batch_size=1, seq_len=8, dtype="float32")
    cpu = _run(get_engine("cpu"), "gpt2", **kw)
    sim = _run(SimEngine(), "gpt2", **kw)
    assert sim.model["parameters"] == cpu.model["parameters"]
    # Qwen2.5-0.5B's published size: 494M parameters with its head tied
    p = memprof.analyze("qwen2.5-0.5b", engine="sim", mode="infer", batch_size=1, seq_len=8, dtype="bfloat16")
    assert p.model["parameters"] == 494_032_768


def test_sim_builds_no_causal_mask_the_real_step_does_not_with_checkpointing():
    # Checkpointing turns the KV cache off; transformers then looks for packed sequences in
    # the position ids, which fake tensors cannot answer, and would keep a batch x 1 x seq x seq
    # mask that SDPA gets instead of is_causal (the CUDA kernel choice changes with it: a mask
    # rules flash attention out). memprof's inputs hold one sequence per row: no mask.
    from tests.conftest import setup_with

    kw = dict(mode="train", batch_size=2, seq_len=64, attn="sdpa", dtype="bfloat16", optimizer="none")
    plain = _run(SimEngine(), "llama", **kw)
    ckpt = SimEngine().run(resolve(tiny("llama")), setup_with(Workload(**kw), ("checkpointing", {})))
    assert set(plain.overheads["sdpa_kernels"]) == {"flash"}
    assert set(ckpt.overheads["sdpa_kernels"]) == {"flash"}  # recomputed in backward too, maskless


def test_sim_projects_flash_attention_for_bf16():
    kw = dict(mode="train", batch_size=2, seq_len=256, dtype="bfloat16", optimizer="none")
    sdpa = memprof.analyze(tiny("llama"), engine="sim", attn="sdpa", **kw)
    eager = memprof.analyze(tiny("llama"), engine="sim", attn="eager", **kw)
    assert sdpa.overheads["sdpa_kernels"] == {"flash": 2}
    # eager keeps the L x L attention probabilities for backward; flash keeps only its output and log-sum-exp
    scores = 2 * 4 * 256 * 256 * 2  # batch x heads x L x L, bf16, one layer
    assert eager.categories_at_peak["activations"] - sdpa.categories_at_peak["activations"] >= scores


def test_kernel_choice_rules():
    bf = torch.empty(1, 4, 8, 64, dtype=torch.bfloat16, device="meta")
    f32 = torch.empty(1, 4, 8, 64, dtype=torch.float32, device="meta")
    mask = torch.empty(1, 1, 8, 8, dtype=torch.bool, device="meta")
    odd = torch.empty(1, 4, 8, 66, dtype=torch.float32, device="meta")
    big = torch.empty(1, 4, 8, 320, dtype=torch.bfloat16, device="meta")
    assert choose_sdpa_kernel(bf, bf, bf, None) == "flash"
    assert choose_sdpa_kernel(bf, bf, bf, mask) == "efficient"
    assert choose_sdpa_kernel(f32, f32, f32, None) == "efficient"
    assert choose_sdpa_kernel(odd, odd, odd, None) == "math"
    assert choose_sdpa_kernel(big, big, big, None) == "efficient"
    # grouped-query attention (fewer key/value heads): flash takes it, memory-efficient does not
    kv_bf = torch.empty(1, 2, 8, 64, dtype=torch.bfloat16, device="meta")
    kv_f32 = torch.empty(1, 2, 8, 64, dtype=torch.float32, device="meta")
    assert choose_sdpa_kernel(bf, kv_bf, kv_bf, None) == "flash"
    assert choose_sdpa_kernel(bf, kv_bf, kv_bf, mask) == "math"
    assert choose_sdpa_kernel(f32, kv_f32, kv_f32, None) == "math"


def test_float32_grouped_query_attention_projects_the_math_kernel_and_its_softmax_scratch(monkeypatch):
    """A float32 Llama-3.2-1B forward on an H200 ran the math kernel (memory-efficient refuses
    grouped-query attention) and its _safe_softmax held a one-byte mask of the scores beyond its
    output: the sim projects both, and with its cuBLAS workspace met the measured peak to the byte."""
    from memprof.engines.sim import SimEngine

    B, L, H = 2, 256, 4  # tiny llama: 4 query heads, 2 key/value heads
    kw = dict(engine="sim", mode="infer", dtype="float32", batch_size=B, seq_len=L)
    p = memprof.analyze(tiny("llama"), **kw)
    assert p.overheads["sdpa_kernels"] == {"math": 2}
    assert p.peak_module.endswith("self_attn")
    monkeypatch.setattr(SimEngine, "kernel_scratch", lambda self: None)
    without = memprof.analyze(tiny("llama"), **kw)
    # the mask (a byte an element of the B x H x L x L scores), the rows' all() and a scalar,
    # each in 512-byte blocks
    assert p.peak_bytes - without.peak_bytes == B * H * L * L + B * H * L + 512
    assert p.categories_at_peak["temporaries"] - without.categories_at_peak["temporaries"] == (
        p.peak_bytes - without.peak_bytes
    )


def test_sim_uses_foreach_optimizer_temporaries():
    # CUDA's default multi-tensor AdamW holds a parameter-sized temporary in its step
    p = memprof.analyze(tiny("llama"), engine="sim", mode="train", batch_size=1, seq_len=8, dtype="float32")
    opt_phase = next(ph for ph in p.phases if ph.name == "optimizer")
    assert p.peak_phase == "optimizer"
    assert opt_phase.peak_bytes >= 4 * p.categories_at_peak["parameters"] * 0.95


def test_infer_decode_has_prefill_and_decode_phases():
    p = memprof.analyze(tiny("llama"), engine="cpu", mode="infer", batch_size=2, seq_len=16, decode_tokens=4)
    assert [ph.name for ph in p.phases] == ["prefill", "decode"]
    with pytest.raises(InputError, match="infer only"):
        memprof.analyze(tiny("llama"), engine="cpu", mode="train", decode_tokens=2)


@pytest.mark.parametrize("family", ["t5", "bart", "whisper"])
def test_an_encoder_decoder_decodes_with_its_encoder_run_once(family, tmp_path):
    """As ``generate``: the encoder in the prefill only, then the decoder on its last token,
    the encoder's output and the cache (T5 and Whisper were internal errors; BART re-encoded
    each new token as if it were the input)."""
    import contextlib
    import json

    from memprof.engines.runner import _generate
    from memprof.models import build_model
    from tests.families import FAMILIES

    spec = tmp_path / f"{family}.json"
    spec.write_text(json.dumps(FAMILIES[family]))
    model, builder = build_model(resolve(str(spec)), dtype="float32", attn="sdpa", load_weights=False)
    inputs = builder.build(2, 8, torch.device("cpu"), with_labels=False)
    calls = {"encoder": 0, "decoder": 0}
    for part in calls:
        getattr(model, f"get_{part}")().register_forward_hook(
            lambda *a, part=part: calls.__setitem__(part, calls[part] + 1)
        )
    with torch.no_grad():
        _generate(model, inputs, 3, lambda name: contextlib.nullcontext())
    assert calls == {"encoder": 1, "decoder": 4}
    p = memprof.analyze(str(spec), engine="cpu", mode="infer", batch_size=2, seq_len=8, decode_tokens=3)
    assert [ph.name for ph in p.phases] == ["prefill", "decode"]


def test_decoding_a_model_that_does_not_generate_is_refused():
    with pytest.raises(InputError, match="bert is a masked-lm model, which does not generate tokens"):
        memprof.analyze(tiny("bert"), engine="sim", mode="infer", batch_size=2, seq_len=8, decode_tokens=2)


def test_minilm_real_checkpoint_cpu(minilm_dir):
    p = memprof.analyze(str(minilm_dir), engine="cpu", mode="infer", batch_size=4, seq_len=128)
    assert any("loaded from the checkpoint" in n for n in p.notes)
    assert p.model["parameters"] == 22_713_216
    assert p.categories_at_peak["parameters"] == 22_713_216 * 4
    _check_profile(p)


def test_auto_engine_picks_cpu_for_small_and_sim_for_huge():
    e = get_engine("auto", estimate_bytes=1)
    assert e.name == ("cuda" if torch.cuda.is_available() else "cpu") and "auto" in e.reason
    if not torch.cuda.is_available():
        e = get_engine("auto", estimate_bytes=10**15)
        assert e.name == "sim" and "simulated" in e.reason


def test_cuda_engine_without_gpu_is_an_environment_error():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(EnvironmentProblem, match="no CUDA GPU"):
        get_engine("cuda")


def test_out_of_memory_reports_partial_profile(tmp_path, monkeypatch):
    spec = greedy_model(
        tmp_path,
        monkeypatch,
        "oomfactory",
        'torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 80.00 GiB")',
    )
    with pytest.raises(OutOfMemory) as ei:
        memprof.analyze(spec, engine="cpu", mode="infer", batch_size=2)
    prof = ei.value.profile
    assert prof.oom["phase"] == "forward"
    assert prof.oom["module"] == "greedy"
    assert prof.oom["live_by_category"]["parameters"] > 0
    assert "forward phase in greedy" in str(ei.value)


@gpu_test()
def test_cuda_engine_matches_allocator():
    p = memprof.analyze(tiny("llama"), engine="cuda", mode="train", batch_size=2, seq_len=64)
    _check_profile(p)
    assert p.peak_reserved_bytes >= p.peak_bytes
    # what tensors do not explain is the allocator's own (cuBLAS workspace, kernel scratch)
    assert 0 <= p.overheads["untracked_at_peak_bytes"] <= 64 * 2**20


def test_what_tensors_do_not_explain_is_in_the_peak_phase_too(monkeypatch):
    """On cuda the allocator's peak (cuBLAS workspaces included) is the profile's peak: the
    phase that holds it reports it too, so the peak is still the highest phase's (the first
    GPU run found the two apart: 67.8 MB against 3.8 MB on a tiny model)."""
    from memprof.engines.cpu import CpuEngine

    wl = Workload(mode="train", batch_size=2, seq_len=16)
    tracked = CpuEngine().run(resolve(tiny("llama")), wl)
    allocator = tracked.peak_bytes + 64 * 2**20
    monkeypatch.setattr(CpuEngine, "allocator_peak", lambda self: allocator)
    p = CpuEngine().run(resolve(tiny("llama")), wl)
    _check_profile(p)
    assert p.peak_bytes == allocator
    assert p.overheads["untracked_at_peak_bytes"] == 64 * 2**20
    assert p.categories_at_peak["temporaries"] == tracked.categories_at_peak["temporaries"] + 64 * 2**20
    by_name = {ph.name: ph.peak_bytes for ph in p.phases}
    before = {ph.name: ph.peak_bytes for ph in tracked.phases}
    assert by_name[p.peak_phase] == allocator
    assert all(by_name[n] == before[n] for n in before if n != p.peak_phase)
