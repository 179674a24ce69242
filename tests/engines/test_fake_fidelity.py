"""memprof.engines.fake_fidelity: fake tensors corrected to what the real step allocates."""

from __future__ import annotations

import torch
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

from memprof.engines.fake_fidelity import SimFakeMode, host_constants

aten = torch.ops.aten


def _layer_norm_grad(grad: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    w, b = torch.ones(x.shape[-1]), torch.zeros(x.shape[-1])
    _, mean, rstd = aten.native_layer_norm(x, [x.shape[-1]], w, b, 1e-5)
    return aten.native_layer_norm_backward(grad, x, [x.shape[-1]], mean, rstd, w, b, [True, True, True])[0]


def test_layer_norm_backward_gives_a_contiguous_input_gradient_as_the_real_kernels():
    def transposed() -> torch.Tensor:
        return torch.randn(2, 32, 16).transpose(1, 2)  # (2, 16, 32), not contiguous

    real = _layer_norm_grad(transposed(), torch.randn(2, 16, 32))
    assert real.is_contiguous()
    with FakeTensorMode():
        bare = _layer_norm_grad(transposed(), torch.randn(2, 16, 32))
    assert not bare.is_contiguous()  # torch's meta kernel: the incoming gradient's layout
    with SimFakeMode():
        fixed = _layer_norm_grad(transposed(), torch.randn(2, 16, 32))
    assert isinstance(fixed, FakeTensor) and fixed.stride() == real.stride()


def test_host_constants_have_values_while_the_model_is_built():
    with FakeTensorMode(allow_non_fake_inputs=True), host_constants():
        # ConvNeXt's stochastic-depth rates
        rates = [x.tolist() for x in torch.linspace(0, 0.3, 4, device="cpu").split([1, 3])]
        weight = torch.empty(4, 4)  # the model's own tensors stay fake
        steps = torch.arange(3)
    assert rates == [x.tolist() for x in torch.linspace(0, 0.3, 4).split([1, 3])]  # a real build's values
    assert isinstance(weight, FakeTensor) and isinstance(steps, FakeTensor)
