"""CUDA's autocast policy on CPU fake tensors (memprof.engines.cuda_autocast).

The reference is PyTorch's own ``AutocastCUDA`` kernels (``aten/src/ATen/autocast_mode.cpp``
and the op lists of ``aten/src/ATen/autocast_mode.h``, torch 2.13), which are registered
in the dispatcher of CPU-only builds too and run on fake CUDA tensors in a forward: each
op below runs once there and once on CPU fake tensors under ``torch.autocast("cpu")``
with memprof's emulation, and the output dtypes must agree, for bfloat16 and float16.
Plain CPU autocast fails this table (softmax, layer_norm, sum, exp, ... stay in the
low-precision dtype there).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode

from memprof.engines.cuda_autocast import (
    CUDA_AUTOCAST_OPS,
    AutocastBanned,
    cuda_autocast_policy,
    dispatcher_autocast_ops,
)


@contextlib.contextmanager
def real_cuda_autocast(dtype: torch.dtype) -> Iterator[None]:
    """PyTorch's AutocastCUDA kernels, switched on by hand (``torch.autocast("cuda")`` refuses without a GPU)."""
    torch.set_autocast_enabled("cuda", True)
    torch.set_autocast_dtype("cuda", dtype)
    torch.autocast_increment_nesting()
    try:
        yield
    finally:
        torch.autocast_decrement_nesting()
        torch.clear_autocast_cache()
        torch.set_autocast_enabled("cuda", False)


def _dtypes(out: Any) -> Any:
    if isinstance(out, torch.Tensor):
        return out.dtype
    return tuple(_dtypes(o) for o in out)


#: ops whose output dtype is recorded between the casts (where the policy puts a cast matters:
#: CUDA's cross_entropy runs log_softmax in the logits' dtype, then nll_loss casts its input)
TRACED = {
    torch.ops.aten._log_softmax.default,
    torch.ops.aten._softmax.default,
    torch.ops.aten.nll_loss_forward.default,
    torch.ops.aten.native_layer_norm.default,
    torch.ops.aten.mm.default,
}


class _Casts(TorchDispatchMode):
    """The dtype casts (``_to_copy``) that reach the dispatcher below autocast, and the dtypes of a few ops between."""

    def __init__(self) -> None:
        super().__init__()
        self.casts: list[tuple[torch.dtype, torch.dtype]] = []

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        if func is torch.ops.aten._to_copy.default and out.dtype != args[0].dtype:
            self.casts.append((args[0].dtype, out.dtype))
        elif func in TRACED and isinstance(out, torch.Tensor):
            self.casts.append((func.__name__, out.dtype))
        return out


def on_cuda(case: Callable[[Callable[..., torch.Tensor], torch.dtype], Any], low: torch.dtype) -> Any:
    """(output dtypes, casts made) under PyTorch's AutocastCUDA kernels, on fake CUDA tensors."""
    with FakeTensorMode(allow_non_fake_inputs=True):
        t = _maker("cuda")
        with real_cuda_autocast(low), _Casts() as rec:
            out = _dtypes(case(t, low))
    return out, rec.casts


def emulated(case: Callable[[Callable[..., torch.Tensor], torch.dtype], Any], low: torch.dtype) -> Any:
    """(output dtypes, casts made) under CPU autocast with memprof's emulation, on CPU fake tensors."""
    with FakeTensorMode(allow_non_fake_inputs=True), cuda_autocast_policy():
        t = _maker("cpu")
        with torch.autocast("cpu", dtype=low), _Casts() as rec:
            out = _dtypes(case(t, low))
    return out, rec.casts


def _maker(device: str) -> Callable[..., torch.Tensor]:
    def t(*shape: int, dtype: torch.dtype = torch.float32, grad: bool = False) -> torch.Tensor:
        x = torch.empty(*shape, device=device, dtype=dtype)
        # fake CUDA tensors that require grad abort on CPU builds; the dtypes do not depend on it
        return x.requires_grad_() if grad and device == "cpu" else x

    return t


def _idx(t: Callable[..., torch.Tensor], *shape: int) -> torch.Tensor:
    return t(*shape, dtype=torch.long)


f32 = torch.float32
# each case: (t, low) -> output(s); t(*shape, dtype=..) makes an input on the device under test
CASES: dict[str, Callable[[Callable[..., torch.Tensor], torch.dtype], Any]] = {
    "mm": lambda t, lo: torch.mm(t(4, 8), t(8, 8)),
    "linear": lambda t, lo: F.linear(t(4, 8), t(8, 8, grad=True), t(8, grad=True)),
    "matmul": lambda t, lo: torch.matmul(t(2, 4, 8), t(8, 8)),
    "bmm": lambda t, lo: torch.bmm(t(2, 4, 8), t(2, 8, 8)),
    "addmm": lambda t, lo: torch.addmm(t(8), t(4, 8), t(8, 8)),
    "baddbmm": lambda t, lo: torch.baddbmm(t(2, 4, 8), t(2, 4, 8), t(2, 8, 8)),
    "einsum": lambda t, lo: torch.einsum("ij,jk->ik", t(4, 8), t(8, 8)),
    "conv1d": lambda t, lo: F.conv1d(t(1, 4, 8), t(4, 4, 3)),
    "conv2d": lambda t, lo: F.conv2d(t(1, 4, 8, 8), t(4, 4, 3, 3)),
    "sdpa": lambda t, lo: F.scaled_dot_product_attention(t(1, 2, 8, 16), t(1, 2, 8, 16), t(1, 2, 8, 16)),
    "softmax": lambda t, lo: torch.softmax(t(4, 8, dtype=lo), -1),
    "softmax explicit dtype": lambda t, lo: torch.softmax(t(4, 8), -1, dtype=lo),
    "log_softmax": lambda t, lo: F.log_softmax(t(4, 8, dtype=lo), -1),
    "layer_norm": lambda t, lo: F.layer_norm(t(4, 8, dtype=lo), (8,), t(8, dtype=lo), t(8, dtype=lo)),
    "group_norm": lambda t, lo: F.group_norm(t(2, 4, 8, dtype=lo), 2),
    "rms_norm": lambda t, lo: F.rms_norm(t(4, 8, dtype=lo), (8,)),
    "cross_entropy": lambda t, lo: F.cross_entropy(t(4, 8, dtype=lo), _idx(t, 4)),
    "nll_loss": lambda t, lo: F.nll_loss(t(4, 8, dtype=lo), _idx(t, 4)),
    "mse_loss": lambda t, lo: F.mse_loss(t(4, 8, dtype=lo), t(4, 8, dtype=lo)),
    "bce_with_logits": lambda t, lo: F.binary_cross_entropy_with_logits(t(4, dtype=lo), t(4, dtype=lo)),
    "sum": lambda t, lo: torch.sum(t(4, 8, dtype=lo)),
    "sum dim": lambda t, lo: t(4, 8, dtype=lo).sum(-1),
    "sum int": lambda t, lo: _idx(t, 4, 8).sum(),
    "cumsum": lambda t, lo: torch.cumsum(t(4, 8, dtype=lo), 0),
    "prod": lambda t, lo: torch.prod(t(4, 8, dtype=lo)),
    "prod dim": lambda t, lo: torch.prod(t(4, 8, dtype=lo), 1),
    "mean": lambda t, lo: t(4, 8, dtype=lo).mean(),
    "exp": lambda t, lo: torch.exp(t(4, 8, dtype=lo)),
    "log": lambda t, lo: torch.log(t(4, 8, dtype=lo)),
    "pow scalar": lambda t, lo: torch.pow(t(4, 8, dtype=lo), 2),
    "pow tensor": lambda t, lo: torch.pow(t(4, 8, dtype=lo), t(4, 8, dtype=lo)),
    "rsqrt": lambda t, lo: torch.rsqrt(t(4, 8, dtype=lo)),
    "reciprocal": lambda t, lo: torch.reciprocal(t(4, 8, dtype=lo)),
    "norm": lambda t, lo: torch.norm(t(4, 8, dtype=lo)),
    "norm dim": lambda t, lo: torch.norm(t(4, 8, dtype=lo), dim=1),
    "vector_norm": lambda t, lo: torch.linalg.vector_norm(t(4, 8, dtype=lo)),
    "logsumexp": lambda t, lo: torch.logsumexp(t(4, 8, dtype=lo), -1),
    "cat": lambda t, lo: torch.cat([t(4, 8, dtype=lo), t(4, 8)]),
    "stack": lambda t, lo: torch.stack([t(4, 8, dtype=lo), t(4, 8)]),
    "index_put": lambda t, lo: torch.index_put(t(4, 8, dtype=lo), (_idx(t, 2),), t(2, 8)),
    "index_put low": lambda t, lo: torch.index_put(t(4, 8, dtype=lo), (_idx(t, 2),), t(2, 8, dtype=lo)),
    "addcmul": lambda t, lo: torch.addcmul(t(4, 8, dtype=lo), t(4, 8), t(4, 8, dtype=lo)),
    "addcdiv low": lambda t, lo: torch.addcdiv(t(4, 8, dtype=lo), t(4, 8, dtype=lo), t(4, 8, dtype=lo)),
    "scatter_add": lambda t, lo: torch.scatter_add(t(4, 8, dtype=lo), 0, _idx(t, 4, 8), t(4, 8)),
    "embedding": lambda t, lo: F.embedding(_idx(t, 4), t(16, 8, grad=True)),
    "gelu": lambda t, lo: F.gelu(t(4, 8, dtype=lo)),
    "silu": lambda t, lo: F.silu(t(4, 8, dtype=lo)),
    "tanh": lambda t, lo: torch.tanh(t(4, 8, dtype=lo)),
    "upsample": lambda t, lo: F.interpolate(t(1, 2, 4, 4, dtype=lo), scale_factor=2, mode="nearest"),
    "cosine_similarity": lambda t, lo: F.cosine_similarity(t(4, 8, dtype=lo), t(4, 8, dtype=lo)),
    "double untouched": lambda t, lo: torch.exp(t(4, 8, dtype=torch.float64)),
}


#: cases whose op runs a different kernel below autocast on each device (the CPU-only build's
#: fake CUDA SDPA falls back to the math kernel, which upcasts; the sim routes SDPA itself)
BELOW_AUTOCAST_DIFFERS = {"sdpa"}


@pytest.mark.parametrize("low", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("name", list(CASES))
def test_output_dtype_and_casts_match_cuda_autocast(name: str, low: torch.dtype) -> None:
    """The output's dtype and every cast made on the way (e.g. cross_entropy: a low-precision
    log_softmax, then nll_loss's float32 copy) are the real AutocastCUDA kernels'."""
    case = CASES[name]
    got, want = emulated(case, low), on_cuda(case, low)
    if name in BELOW_AUTOCAST_DIFFERS:
        # the casts autocast makes (q, k, v), not those of the kernel each device then runs
        got, want = (got[0], got[1][:3]), (want[0], want[1][:3])
    assert got == want


def test_the_table_differs_from_cpu_autocast() -> None:
    """The cases above are not vacuous: plain CPU autocast gets some of them wrong."""
    wrong = []
    for name in ("softmax", "layer_norm", "sum", "exp", "cumsum"):
        with FakeTensorMode(allow_non_fake_inputs=True):
            t = _maker("cpu")
            with torch.autocast("cpu", dtype=torch.bfloat16):
                got = _dtypes(CASES[name](t, torch.bfloat16))
        if got != on_cuda(CASES[name], torch.bfloat16)[0]:
            wrong.append(name)
    assert wrong == ["softmax", "layer_norm", "sum", "exp", "cumsum"]


def test_table_matches_the_dispatcher() -> None:
    """memprof's table (torch 2.13's lists) is exactly the set of ops with an AutocastCUDA kernel."""
    cuda, _ = dispatcher_autocast_ops()
    assert set(CUDA_AUTOCAST_OPS) == cuda
    with cuda_autocast_policy() as policy:
        assert policy.notes == []


def test_binary_cross_entropy_is_refused_as_on_cuda() -> None:
    def bce(t: Callable[..., torch.Tensor], lo: torch.dtype) -> Any:
        return F.binary_cross_entropy(t(4).sigmoid(), t(4))

    with pytest.raises(RuntimeError, match="unsafe to autocast"):
        on_cuda(bce, torch.bfloat16)
    with pytest.raises(AutocastBanned, match="unsafe to autocast"):
        emulated(bce, torch.bfloat16)


def test_casts_are_recorded_by_autograd_and_weights_cached() -> None:
    """Casts happen above autograd (ToCopy nodes in the graph); a weight's bf16 copy is made once per region."""
    with FakeTensorMode(), cuda_autocast_policy():
        x = torch.empty(4, 8, requires_grad=True)
        w = torch.empty(8, 8, requires_grad=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = F.linear(x, w)
            y2 = F.linear(x, w)
            s = torch.softmax(y, -1)
            assert s.dtype == torch.float32
            nexts = {type(n).__name__ for n, _ in y.grad_fn.next_functions if n is not None}
            assert "ToCopyBackward0" in nexts
            # the weight's cast is cached: both linears saved the same bf16 copy
            w1 = [
                n
                for n, _ in y.grad_fn.next_functions
                if n is not None and type(n).__name__ == "ToCopyBackward0"
            ]
            w2 = [
                n
                for n, _ in y2.grad_fn.next_functions
                if n is not None and type(n).__name__ == "ToCopyBackward0"
            ]
            assert set(w1) & set(w2)
        (s.sum() + y2.float().sum()).backward()
        assert w.grad is not None and w.grad.dtype == torch.float32


def test_cat_is_not_cast_as_cpu_autocast_does() -> None:
    """CUDA leaves cat to its own type promotion (no float32 copy of the bf16 input first)."""
    with FakeTensorMode(), cuda_autocast_policy():
        a = torch.empty(4, 8, dtype=torch.bfloat16, requires_grad=True)
        b = torch.empty(4, 8, requires_grad=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            c = torch.cat([a, b])
        assert c.dtype == torch.float32
        assert all(
            type(n).__name__ != "ToCopyBackward0" for n, _ in c.grad_fn.next_functions if n is not None
        )


def _cpu_softmax_dtype() -> torch.dtype:
    with FakeTensorMode(), torch.autocast("cpu", dtype=torch.bfloat16):
        return torch.softmax(torch.empty(4, 8, dtype=torch.bfloat16), -1).dtype


def test_kernels_removed_on_exit_and_on_error() -> None:
    assert _cpu_softmax_dtype() == torch.bfloat16
    clear = torch.clear_autocast_cache
    with cuda_autocast_policy():
        assert _cpu_softmax_dtype() == torch.float32
    assert _cpu_softmax_dtype() == torch.bfloat16
    with pytest.raises(ValueError), cuda_autocast_policy():
        raise ValueError("boom")
    assert _cpu_softmax_dtype() == torch.bfloat16
    assert torch.clear_autocast_cache is clear
    # the CPU's own autocast kernels are back (stack is one of them: it casts to the widest type)
    with FakeTensorMode():
        a = torch.empty(4, dtype=torch.bfloat16, requires_grad=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            s = torch.stack([a, torch.empty(4)])
        assert any(
            type(n).__name__ == "ToCopyBackward0" for n, _ in s.grad_fn.next_functions if n is not None
        )
