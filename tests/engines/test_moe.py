"""Mixture-of-experts models: the experts as CUDA runs them, the routing assumption, and the real router.

The sim engine cannot know where a fake router sends tokens; it assumes a routing
(``--moe-routing``) and feeds the experts real expert ids. These tests force the cpu
engine's real router to the same routing and check that the two engines agree, that
the assumption only matters where a size depends on it, and that what the report
says about it is measured.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from memprof.api import analyze
from memprof.cli import main
from memprof.engines.cpu import CpuEngine
from memprof.engines.cuda_semantics import grouped_mm_output
from memprof.engines.moe import assumed_routing, experts_modules, routing_indices

DEC = dict(
    hidden_size=64,
    num_attention_heads=4,
    num_key_value_heads=2,
    num_hidden_layers=2,
    intermediate_size=128,
    vocab_size=128,
    max_position_embeddings=128,
)
CONFIGS = {
    "mixtral": dict(
        model_type="mixtral",
        architectures=["MixtralForCausalLM"],
        num_local_experts=4,
        num_experts_per_tok=2,
        **DEC,
    ),
    "qwen3_moe": dict(
        model_type="qwen3_moe",
        architectures=["Qwen3MoeForCausalLM"],
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=96,
        head_dim=16,
        **DEC,
    ),
}


def config(tmp_path: Path, name: str, **changes) -> str:
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps({**CONFIGS[name], **changes}))
    return str(path)


class ForcedRouting(CpuEngine):
    """The cpu engine with the real router's choice replaced by an assumed routing (tests only)."""

    def __init__(self, routing: str) -> None:
        super().__init__()
        self.routing = routing

    def experts_context(self, model, setup):
        return assumed_routing(model, self.routing)


def test_routing_indices_balanced_and_worst():
    ids = routing_indices(10, 2, 4, "balanced")
    assert ids.shape == (10, 2) and ids.dtype == torch.int64
    counts = torch.bincount(ids.flatten(), minlength=4)
    assert counts.tolist() == [5, 5, 5, 5]  # 10 tokens x top-2 / 4 experts
    assert all(len(set(row.tolist())) == 2 for row in ids)  # never the same expert twice
    worst = routing_indices(10, 2, 4, "worst")
    assert torch.bincount(worst.flatten(), minlength=4).tolist() == [10, 10, 0, 0]
    with pytest.raises(ValueError):
        routing_indices(4, 2, 4, "random")


def test_grouped_mm_output_as_cuda_allocates_it():
    a = torch.empty(10, 8)
    b = torch.empty(4, 8, 3)  # 3 float32 columns: rows padded to 16 bytes, as on CUDA
    out = grouped_mm_output(a, b, torch.tensor([2, 5, 7, 10]), None)
    assert out.shape == (10, 3) and out.dtype == torch.float32 and out.stride() == (4, 1)
    grad_b = grouped_mm_output(a.t(), torch.empty(10, 3), torch.tensor([2, 5, 7, 10]), torch.float32)
    assert grad_b.shape == (4, 8, 3)


@pytest.mark.parametrize("name", ["mixtral", "qwen3_moe"])
@pytest.mark.parametrize("experts", ["auto", "eager"])
def test_sim_balanced_agrees_with_the_cpu_engine_forced_balanced(tmp_path, name, experts):
    path = config(tmp_path, name)
    # activations dominate (as in real training), so the foreach AdamW the sim projects for CUDA weighs little
    kw = dict(batch_size=4, seq_len=128, attn="eager", experts=experts)
    sim = analyze(path, engine="sim", moe_routing="balanced", **kw)
    cpu = analyze(path, engine=ForcedRouting("balanced"), **kw)
    assert sim.moe["routing"] == "balanced" and cpu.moe["layers"] == 2
    assert sim.moe["implementation"] == ("grouped_mm" if experts == "auto" else "eager")
    assert abs(sim.peak_bytes - cpu.peak_bytes) / cpu.peak_bytes < 0.05
    # the real router, unforced: measured, no assumption
    real = analyze(path, engine="cpu", **kw)
    assert real.moe["routing"] == "router" and real.moe["routing_dependent"] is None
    assert any("own router" in n for n in real.notes)


def test_grouped_mm_memory_does_not_depend_on_the_routing(tmp_path):
    path = config(tmp_path, "qwen3_moe")
    kw = dict(engine="sim", batch_size=2, seq_len=32)
    bal = analyze(path, moe_routing="balanced", **kw)
    worst = analyze(path, moe_routing="worst", **kw)
    assert bal.moe["routing_dependent"] is False and "other" not in bal.moe
    assert worst.peak_bytes == bal.peak_bytes
    assert worst.categories_at_peak == bal.categories_at_peak
    assert any("gives the same memory" in n for n in bal.notes)


def test_eager_experts_depend_on_the_routing_and_analyze_measures_both(tmp_path):
    # experts' intermediate dominates: the worst routing puts every token through one expert's matmuls
    path = config(tmp_path, "mixtral", intermediate_size=1024)
    kw = dict(engine="sim", mode="infer", batch_size=4, seq_len=64, experts="eager")
    bal = analyze(path, moe_routing="balanced", **kw)
    worst = analyze(path, moe_routing="worst", **kw)
    assert bal.moe["routing_dependent"] is True
    assert worst.peak_bytes > bal.peak_bytes
    # analyze ran the other assumption too, and says what it gives
    assert bal.moe["other"] == {"routing": "worst", "peak_bytes": worst.peak_bytes}
    assert worst.moe["other"] == {"routing": "balanced", "peak_bytes": bal.peak_bytes}
    # and the cpu engine, its router forced the same way, measures the same difference
    cpu_bal = analyze(
        path, engine=ForcedRouting("balanced"), **{k: v for k, v in kw.items() if k != "engine"}
    )
    cpu_worst = analyze(path, engine=ForcedRouting("worst"), **{k: v for k, v in kw.items() if k != "engine"})
    assert cpu_worst.peak_bytes > cpu_bal.peak_bytes
    assert abs(worst.peak_bytes - cpu_worst.peak_bytes) / cpu_worst.peak_bytes < 0.05


def test_auxiliary_load_balancing_loss(tmp_path):
    plain = config(tmp_path, "mixtral")
    aux_path = tmp_path / "mixtral-aux.json"
    aux_path.write_text(json.dumps({**CONFIGS["mixtral"], "output_router_logits": True}))
    kw = dict(batch_size=4, seq_len=128, attn="eager")
    without = analyze(plain, engine="sim", **kw)
    with_aux = analyze(str(aux_path), engine="sim", **kw)
    cpu = analyze(str(aux_path), engine=ForcedRouting("balanced"), **kw)
    # the router logits of every layer are kept for the loss
    assert with_aux.peak_bytes > without.peak_bytes
    assert abs(with_aux.peak_bytes - cpu.peak_bytes) / cpu.peak_bytes < 0.05


def test_hooks_and_modes_removed_after_the_run(tmp_path):
    from memprof.models import build_model, resolve

    rm = resolve(config(tmp_path, "mixtral"))
    model, _ = build_model(rm)
    found = experts_modules(model)
    assert len(found) == 2
    with assumed_routing(model, "worst") as info:
        assert info is not None and all(m._forward_pre_hooks for _, m in found)
    assert not any(m._forward_pre_hooks for _, m in found)
    assert not torch.overrides._get_current_function_mode_stack()


def test_cli_moe_routing(tmp_path, capsys):
    path = config(tmp_path, "mixtral")
    out = tmp_path / "p.json"
    code = main(
        [
            "analyze",
            path,
            "--engine",
            "sim",
            "-b",
            "1",
            "-s",
            "16",
            "--moe-routing",
            "worst",
            "--json",
            str(out),
        ]
    )
    assert code == 0
    prof = json.loads(out.read_text())
    assert prof["moe"]["routing"] == "worst" and prof["workload"]["moe_routing"] == "worst"
    assert "Experts" in capsys.readouterr().out
    assert main(["analyze", path, "--engine", "sim", "--moe-routing", "random"]) == 2
    assert main(["analyze", path, "--engine", "sim", "--experts", "fused"]) == 2


def test_workloads_file_moe_keys_are_checked(tmp_path):
    from memprof.errors import ProblemsError
    from memprof.gate import read_workloads

    good = tmp_path / "good.yaml"
    good.write_text("workloads:\n  - model: gpt2\n    moe_routing: worst\n    experts: eager\n")
    (w,) = read_workloads(good)
    assert w.workload.moe_routing == "worst" and w.workload.experts == "eager"
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "workloads:\n  - model: gpt2\n    moe_routing: random\n  - model: gpt2\n    experts: fused\n"
    )
    with pytest.raises(ProblemsError) as e:
        read_workloads(bad)
    assert len(e.value.problems) == 2
    assert "--moe-routing must be one of balanced, worst" in e.value.problems[0]
    assert "--experts must be one of" in e.value.problems[1]


def test_checkpointed_eager_experts_recompute_with_the_routing(tmp_path):
    """Checkpointing recomputes the experts in backward, where torch function modes are off: the sim re-enters it."""
    from memprof.engines import SimEngine
    from memprof.models import resolve
    from memprof.workload import Workload
    from tests.conftest import setup_with

    rm = resolve(config(tmp_path, "mixtral"))
    wl = Workload(batch_size=4, seq_len=64, attn="eager", experts="eager")
    plain = SimEngine().run(rm, wl)
    ckpt = SimEngine().run(rm, setup_with(wl, ("checkpointing", {})))
    assert ckpt.moe["routing_dependent"] is True
    assert ckpt.categories_at_peak["activations"] < plain.categories_at_peak["activations"]
    cpu = ForcedRouting("balanced").run(rm, setup_with(wl, ("checkpointing", {})))
    assert abs(ckpt.peak_bytes - cpu.peak_bytes) / cpu.peak_bytes < 0.05
