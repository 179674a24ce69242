"""The synthetic inputs do not depend on the default device around them.

The cuda engine builds the inputs inside ``with torch.device("cuda")``: a factory
call that names no device then lands on the GPU, and one that draws from a CPU
generator fails there ("Expected a 'cuda' device type for generator"). Found on
the first GPU run (docs/validation.md); a "meta" default device shows the same
dependence on a CPU-only machine.
"""

from __future__ import annotations

import pytest
import torch

from memprof.models import build_model, resolve
from tests.conftest import tiny


@pytest.mark.parametrize("name", ["llama", "bert-cls", "t5", "vit", "whisper"])
def test_inputs_are_drawn_on_the_cpu_whatever_the_default_device(name):
    rm = resolve(tiny(name))
    _, builder = build_model(rm)
    want = builder.build(2, 8, "cpu")
    with torch.device("meta"):
        got = builder.build(2, 8, "cpu")
    assert want.keys() == got.keys()
    for key, value in want.items():
        if isinstance(value, torch.Tensor):
            assert got[key].device.type == "cpu", key
            assert torch.equal(got[key], value), key
        else:
            assert got[key] == value, key
