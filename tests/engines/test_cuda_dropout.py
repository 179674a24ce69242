"""Dropout as CUDA runs it: the fused kernel keeps a one-byte mask for backward.

The first GPU validation (docs/validation.md, an H200) measured every training step
with dropout below the sim by 3 bytes per dropped float32 element (GPT-2 450 MiB,
BERT 900 MiB, T5 1968 MiB): the CPU's dropout keeps a noise tensor of the input's
dtype, CUDA's ``native_dropout`` a bool mask.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from memprof.engines.cuda_semantics import CudaDropout
from memprof.engines.sim import sim_engine
from memprof.models import resolve
from memprof.workload import StepSetup, Workload
from tests.conftest import TINY


def _saved(fn, x):
    saved = []

    def pack(t):
        saved.append((t.dtype, tuple(t.shape)))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(x)
    return saved


def test_training_dropout_keeps_a_bool_mask_as_on_cuda():
    x = torch.randn(16, 32, requires_grad=True)
    assert _saved(lambda t: F.dropout(t, 0.1, True), x) == [(torch.float32, (16, 32))]  # the CPU's noise
    mode = CudaDropout()
    with mode:
        assert _saved(lambda t: F.dropout(t, 0.1, True), x) == [(torch.bool, (16, 32))]
        assert _saved(lambda t: torch.dropout(t, 0.1, True), x) == [(torch.bool, (16, 32))]
        y = F.dropout(x, 0.5, True)
    assert mode.elements == 3 * 16 * 32
    kept = y != 0
    assert torch.allclose(y[kept], 2 * x[kept])  # scaled by 1 / (1 - p), as dropout is


@pytest.mark.parametrize(
    "call",
    [
        lambda t: F.dropout(t, 0.1, False),  # eval: the identity
        lambda t: F.dropout(t, 0.0, True),  # p = 0: the identity
        lambda t: F.dropout(t.clone(), 0.1, True, inplace=True),  # dropout_: the noise path on CUDA too
    ],
)
def test_what_cuda_runs_unfused_is_left_as_it_is(call):
    x = torch.randn(8, 8, requires_grad=True)
    want = _saved(call, x)
    mode = CudaDropout()
    with mode:
        assert _saved(call, x) == want
    assert mode.elements == 0


def test_the_sim_projects_one_byte_per_dropped_element(tmp_path):
    """Tiny BERT with dropout 0.1, a training step: at the peak (backward's start) every mask is
    alive; the CPU's float32 noise is 4 bytes an element, CUDA's mask 1 (exact bytes)."""
    config = json.loads((TINY / "bert.json").read_text())
    config.update(hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)
    (tmp_path / "config.json").write_text(json.dumps(config))
    rm = resolve(str(tmp_path / "config.json"))
    B, L, H, layers = 4, 64, config["hidden_size"], config["num_hidden_layers"]
    runs = {}
    for cuda in (False, True):
        setup = StepSetup.of(Workload(mode="train", batch_size=B, seq_len=L))
        runs[cuda] = sim_engine(exact_bytes=True, cuda_dropout=cuda).run(rm, setup)
    # embeddings, then each layer's attention-output and output dropouts (the attention's
    # own dropout runs inside the SDPA kernel)
    elements = (1 + 2 * layers) * B * L * H
    cpu, cuda = (runs[k].categories_at_peak["activations"] for k in (False, True))
    assert cpu - cuda == 3 * elements
    assert runs[False].peak_bytes - runs[True].peak_bytes == 3 * elements
    assert "dropout as the CPU runs it" in sim_engine(cuda_dropout=False).cpu_semantics()


def test_checkpointing_recomputes_the_fused_dropout(tmp_path):
    """Checkpointing recomputes each block in backward, where torch function modes are not
    active: the sim re-enters the fused dropout there, or the recomputed masks (float32)
    differ from the saved ones (bool) and torch.utils.checkpoint refuses the step (the
    H200 validation's GPT-2 and BERT rows with checkpointing)."""
    from tests.conftest import setup_with

    config = json.loads((TINY / "gpt2.json").read_text())
    config.update(attn_pdrop=0.1, embd_pdrop=0.1, resid_pdrop=0.1)
    (tmp_path / "config.json").write_text(json.dumps(config))
    rm = resolve(str(tmp_path / "config.json"))
    B, L = 8, 128  # activations (the logits) make the peak, at backward's start
    wl = Workload(mode="train", batch_size=B, seq_len=L)
    peaks = {}
    for cuda in (False, True):
        setup = setup_with(wl, ("checkpointing", {}))
        peaks[cuda] = sim_engine(exact_bytes=True, cuda_dropout=cuda).run(rm, setup).peak_bytes
    # at the peak: the embeddings' mask (kept across the checkpointed blocks) and those of
    # the block being recomputed (two a block), each 3 bytes an element less
    masks, rest = divmod(peaks[False] - peaks[True], 3 * B * L * config["n_embd"])
    assert rest == 0 and 1 <= masks <= 3
