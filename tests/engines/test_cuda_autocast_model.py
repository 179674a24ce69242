"""The sim engine's step under bf16 autocast gets CUDA's autocast policy (memprof.engines.cuda_autocast).

Under CUDA autocast ``softmax.int`` runs in float32 (``AT_FORALL_FP32_SET_OPT_DTYPE``) and
``pow`` too (``AT_FORALL_FP32``), in torch 2.13's ``aten/src/ATen/autocast_mode.h``, which
``aten/src/ATen/autocast_mode.cpp`` registers for AutocastCUDA; CPU autocast leaves both in
bfloat16. BERT's eager attention (no mask: no padding) saves float32 probabilities, as on a
GPU; GPT-2's adds its float32 causal mask first, so its softmax is float32 under either
policy, and what moves there is gelu_new's ``pow``.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from memprof.engines.base import Measure
from memprof.engines.cuda_autocast import cuda_autocast_policy
from memprof.engines.sim import SimEngine, cpu_semantics_sim, sim_engine
from memprof.models import build_model, resolve
from memprof.workload import Workload
from tests.conftest import setup_with, tiny

B, L = 2, 64
WL = Workload(mode="train", batch_size=B, seq_len=L, attn="eager", optimizer="adamw")


def _cpu_softmax_dtype() -> torch.dtype:
    with FakeTensorMode(), torch.autocast("cpu", dtype=torch.bfloat16):
        return torch.softmax(torch.empty(2, 4, dtype=torch.bfloat16), -1).dtype


def _run(engine: SimEngine, spec: str):
    return engine.run_detailed(resolve(spec), setup_with(WL, ("mixed_precision", {})), measure=Measure())


def _saved_softmax_dtypes(spec: str, cuda_policy: bool) -> list[torch.dtype]:
    """The dtypes softmax's backward saves in a tiny model's autocast forward on CPU fake tensors."""
    with FakeTensorMode(allow_non_fake_inputs=True):
        model, _ = build_model(resolve(spec), dtype="float32", attn="eager", load_weights=False)
        ids = torch.zeros(B, L, dtype=torch.long)
        policy = cuda_autocast_policy() if cuda_policy else contextlib.nullcontext()
        with policy, torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
    seen, out, stack = set(), [], [loss.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if type(node).__name__ == "SoftmaxBackward0":
            out.append(node._saved_result.dtype)
        stack.extend(n for n, _ in node.next_functions)
    return out


def test_attention_probabilities_saved_in_float32_as_on_cuda():
    bert = json.loads(Path(tiny("bert")).read_text())["num_hidden_layers"]
    assert _saved_softmax_dtypes(tiny("bert"), cuda_policy=True) == [torch.float32] * bert
    assert _saved_softmax_dtypes(tiny("bert"), cuda_policy=False) == [torch.bfloat16] * bert
    # GPT-2 adds its float32 causal mask before the softmax: float32 under either policy
    gpt2 = json.loads(Path(tiny("gpt2")).read_text())["n_layer"]
    assert _saved_softmax_dtypes(tiny("gpt2"), cuda_policy=False) == [torch.float32] * gpt2
    assert _cpu_softmax_dtype() == torch.bfloat16


def test_bert_activations_grow_by_the_float32_probabilities():
    cfg = json.loads(Path(tiny("bert")).read_text())
    cuda = _run(SimEngine(), tiny("bert")).profile
    cpu = _run(sim_engine(cuda_autocast=False), tiny("bert")).profile
    probs = cfg["num_hidden_layers"] * B * cfg["num_attention_heads"] * L * L * 2  # 4 bytes, not 2
    assert cuda.categories_at_peak["activations"] - cpu.categories_at_peak["activations"] >= probs
    assert cuda.peak_bytes > cpu.peak_bytes


def test_sim_projects_cuda_autocast_activations():
    cfg = json.loads(Path(tiny("gpt2")).read_text())
    layers, d = cfg["n_layer"], cfg["n_embd"]
    engine = SimEngine()
    cuda = _run(engine, tiny("gpt2")).profile
    assert "CUDA's autocast policy" in engine.notes()[0]
    cpu = _run(sim_engine(cuda_autocast=False), tiny("gpt2")).profile
    # gelu_new's pow(x, 3) runs in float32 on CUDA, and so do the two ops after it: pow's saved input,
    # the mul's saved factor and tanh's saved result are float32 (2 bytes more than bfloat16 each)
    gelu = 3 * layers * B * L * 4 * d * 2
    diff = cuda.categories_at_peak["activations"] - cpu.categories_at_peak["activations"]
    assert diff == gelu
    assert cuda.peak_bytes - cpu.peak_bytes == diff
    # the kernels are gone after the step: CPU autocast is the CPU's again
    assert _cpu_softmax_dtype() == torch.bfloat16


def test_llama_eager_attention_already_float32():
    """transformers' Llama softmaxes in float32 explicitly and casts back: both policies save the same."""
    cuda = _run(SimEngine(), tiny("llama")).profile
    cpu = _run(sim_engine(cuda_autocast=False), tiny("llama")).profile
    assert cuda.peak_bytes == cpu.peak_bytes


def test_cpu_semantics_sim_keeps_the_cpu_policy():
    engine = cpu_semantics_sim()
    assert not engine.cuda_autocast
    assert "the CPU's autocast policy" in engine.cpu_semantics()
    _run(engine, tiny("gpt2"))
    assert _cpu_softmax_dtype() == torch.bfloat16


def test_binary_cross_entropy_under_autocast_is_a_typed_error():
    """CUDA's autocast refuses BCELoss; the sim says so as a NotSupported, never a traceback."""
    from memprof.engines.cuda_autocast import AutocastBanned
    from memprof.errors import NotSupported

    err = SimEngine().translate_error(AutocastBanned("unsafe to autocast"), "m", "forward")
    assert isinstance(err, NotSupported)
    assert "binary_cross_entropy_with_logits" in str(err)
