"""CUDA's autocast policy for a step that runs on CPU fake tensors.

The sim engine runs the step on CPU fake tensors, so ``torch.autocast`` there is
CPU autocast, whose op lists differ from CUDA's: under CUDA autocast softmax,
log_softmax, layer_norm, the losses, sum/cumsum/prod and several pointwise ops
(exp, log, pow, rsqrt, ...) run in float32, where CPU autocast leaves them in the
input's dtype (eager attention's saved probabilities would be projected at half
their CUDA size); and CPU autocast casts ops CUDA's leaves alone (cat, stack, the
fft and linalg ops, ...).

:func:`cuda_autocast_policy` installs, while the sim runs, Python kernels on the
``AutocastCPU`` dispatch key that apply CUDA's policy (``WrapFunction_`` in
``aten/src/ATen/autocast_mode.h``): for each op CUDA's autocast covers, its
category's casts (lower_precision_fp, fp32, fp32_set_opt_dtype,
fp32_append_dtype, promote; the one banned op raises as CUDA does), and a
fallthrough (no cast) for ops only the CPU's policy covers. The casts run below
the autocast key and above autograd, as CUDA's, so the autograd graph saves what a
GPU saves; lower-precision casts of float32 leaf tensors that require grad (the
weights) are cached for the autocast region as CUDA's ``cached_cast`` does, and the
cache is cleared where torch clears its own (``torch.clear_autocast_cache``, on
leaving the outermost autocast region). On exit the kernels are removed and CPU
autocast is the CPU's again.

The op table (:data:`CUDA_AUTOCAST_OPS`) is transcribed from torch 2.13's
``aten/src/ATen/autocast_mode.h`` (the ``AT_FORALL_*`` lists that
``autocast_mode.cpp`` registers for ``AutocastCUDA``) plus the two cuDNN
convolutions and the banned ``binary_cross_entropy``. At run time it is checked
against the dispatcher's own ``AutocastCUDA`` registrations (present on CPU-only
builds too): an op CUDA covers that the table lacks keeps the CPU's policy and an
op the table lists that CUDA no longer covers gets none, each said in
:attr:`CudaAutocastPolicy.notes`, never silently.

Known limitations: the registrations are process-wide while the context is
active (another thread running CPU autocast at the same time would get CUDA's
policy); ``torch.autocast``'s own lists (``torch.get_autocast_dtype("cpu")``)
decide the dtype, as the step's ``torch.autocast("cpu", dtype)`` sets it.
"""

from __future__ import annotations

import contextlib
import functools
import warnings
import weakref
from collections.abc import Iterator
from typing import Any

import torch

#: CUDA's autocast categories, transcribed from torch 2.13 ``aten/src/ATen/autocast_mode.h``
#: (``AT_FORALL_LOWER_PRECISION_FP``, ``AT_FORALL_FP32``, ``AT_FORALL_FP32_SET_OPT_DTYPE``,
#: ``AT_FORALL_DIFFERENT_REDISPATCH_SIGNATURE``, ``AT_FORALL_PROMOTE``), which
#: ``aten/src/ATen/autocast_mode.cpp`` registers for ``AutocastCUDA``; plus
#: ``cudnn_convolution``/``cudnn_convolution_transpose`` (lower_precision_fp, probed on the
#: dispatcher's AutocastCUDA kernels) and ``binary_cross_entropy`` (banned under autocast).
_LOWER_PRECISION_FP = """
_convolution.deprecated _convolution conv1d conv2d conv3d conv_tbc conv_transpose1d
conv_transpose2d.input conv_transpose3d.input convolution prelu addmm addmv addr matmul einsum
mm mv linalg_vecdot linear addbmm baddbmm bmm chain_matmul linalg_multi_dot
_thnn_fused_lstm_cell _thnn_fused_gru_cell lstm_cell gru_cell rnn_tanh_cell rnn_relu_cell
_scaled_dot_product_flash_attention scaled_dot_product_attention
cudnn_convolution cudnn_convolution_transpose
"""
_FP32 = """
acos asin cosh erfinv exp expm1 log log10 log2 log1p reciprocal rsqrt sinh tan
pow.Tensor_Scalar pow.Tensor_Tensor pow.Scalar softplus layer_norm native_layer_norm rms_norm
group_norm frobenius_norm.dim nuclear_norm nuclear_norm.dim cosine_similarity poisson_nll_loss
cosine_embedding_loss nll_loss nll_loss2d hinge_embedding_loss kl_div l1_loss smooth_l1_loss
huber_loss mse_loss margin_ranking_loss multilabel_margin_loss soft_margin_loss
triplet_margin_loss multi_margin_loss binary_cross_entropy_with_logits dist pdist cdist renorm
logsumexp upsample_nearest1d _upsample_nearest_exact1d upsample_nearest2d
_upsample_nearest_exact2d upsample_nearest3d _upsample_nearest_exact3d upsample_linear1d
upsample_bilinear2d _upsample_bilinear2d_aa upsample_trilinear3d upsample_bicubic2d
_upsample_bicubic2d_aa
"""
_FP32_SET_OPT_DTYPE = """
prod prod.dim_int softmax.int log_softmax.int cumprod cumsum linalg_vector_norm
linalg_matrix_norm linalg_matrix_norm.str_ord sum sum.dim_IntList
"""
_FP32_APPEND_DTYPE = "norm.Scalar norm.ScalarOpt_dim"
_PROMOTE = "addcdiv addcmul atan2 bilinear cross dot vdot grid_sampler index_put tensordot scatter_add"
_BANNED = "binary_cross_entropy"

#: op (``name`` or ``name.overload``, without ``aten::``) -> CUDA's autocast category
CUDA_AUTOCAST_OPS: dict[str, str] = {
    op: cat
    for cat, ops in (
        ("lower_precision_fp", _LOWER_PRECISION_FP),
        ("fp32", _FP32),
        ("fp32_set_opt_dtype", _FP32_SET_OPT_DTYPE),
        ("fp32_append_dtype", _FP32_APPEND_DTYPE),
        ("promote", _PROMOTE),
        ("banned", _BANNED),
    )
    for op in ops.split()
}

#: fp32_append_dtype: the overload CUDA redispatches to, with the dtype appended
_APPEND_DTYPE_TARGET = {"norm.Scalar": "ScalarOpt_dtype", "norm.ScalarOpt_dim": "ScalarOpt_dim_dtype"}

_BCE_MESSAGE = (
    "torch.nn.functional.binary_cross_entropy and torch.nn.BCELoss are unsafe to autocast.\n"
    "Many models use a sigmoid layer right before the binary cross entropy layer.\n"
    "In this case, combine the two layers using torch.nn.functional.binary_cross_entropy_with_logits\n"
    "or torch.nn.BCEWithLogitsLoss.  binary_cross_entropy_with_logits and BCEWithLogits are\n"
    "safe to autocast."
)


class AutocastBanned(RuntimeError):
    """An op CUDA's autocast refuses (``binary_cross_entropy``), raised as CUDA raises it."""


def _short(name: str) -> str:
    return name.removeprefix("aten::")


@functools.lru_cache(maxsize=1)
def dispatcher_autocast_ops() -> tuple[frozenset[str], frozenset[str]]:
    """The ops with an ``AutocastCUDA`` and with an ``AutocastCPU`` kernel in this torch's dispatcher.

    Read once per process, before any kernel of :func:`cuda_autocast_policy` is registered.
    """
    has = torch._C._dispatch_has_kernel_for_dispatch_key
    names = torch._C._dispatch_get_all_op_names()
    cuda = frozenset(_short(n) for n in names if n.startswith("aten::") and has(n, "AutocastCUDA"))
    cpu = frozenset(_short(n) for n in names if n.startswith("aten::") and has(n, "AutocastCPU"))
    return cuda, cpu


def _overload(op: str) -> Any:
    name, _, overload = op.partition(".")
    return getattr(getattr(torch.ops.aten, name), overload or "default")


def _eligible(t: Any) -> bool:
    # is_eligible/is_autocast_eligible: a defined floating tensor on the autocast device, not double
    # (every tensor of the sim's step is a CPU fake tensor: the CPU stands for the GPU)
    return (
        isinstance(t, torch.Tensor)
        and t.device.type == "cpu"
        and t.is_floating_point()
        and t.dtype != torch.float64
    )


class CudaAutocastPolicy:
    """CUDA's autocast policy on the ``AutocastCPU`` key while active (see the module docstring).

    ``notes`` says where the installed torch's CUDA lists and memprof's table differ.
    """

    def __init__(self) -> None:
        self._lib: Any = None
        self._cache: dict[int, tuple[weakref.ref[torch.Tensor], torch.Tensor]] = {}
        self._clear_orig: Any = None
        self.notes: list[str] = []
        self._exclude = torch._C.DispatchKeySet(torch._C.DispatchKey.AutocastCPU)

    # -- casts (autocast_mode.h) ---------------------------------------------------------

    def _cached_cast(self, to: torch.dtype, arg: Any) -> Any:
        if isinstance(arg, (list, tuple)):
            return type(arg)(self._cached_cast(to, a) for a in arg)
        if not _eligible(arg) or arg.dtype == to:
            return arg
        can_cache = (
            to == torch.get_autocast_dtype("cpu")
            and arg.dtype == torch.float32
            and arg.requires_grad
            and arg.is_leaf
            and not arg._is_view()
            and torch.is_autocast_cache_enabled()
        )
        if not can_cache:
            return arg.to(to)
        hit = self._cache.get(id(arg))
        if hit is not None and hit[0]() is arg:
            return hit[1]
        out = arg.to(to)
        self._cache[id(arg)] = (weakref.ref(arg), out)
        return out

    def _promote_type(self, values: Any) -> torch.dtype:
        current = torch.get_autocast_dtype("cpu")
        low = current
        for v in values:
            if isinstance(v, (list, tuple)):
                for item in v:
                    current = self._prioritize(current, item, low)
            else:
                current = self._prioritize(current, v, low)
        return current

    @staticmethod
    def _prioritize(current: torch.dtype, arg: Any, low: torch.dtype) -> torch.dtype:
        if not _eligible(arg):
            return current
        if current == torch.float32 or arg.dtype == torch.float32:
            return torch.float32
        if current == low and arg.dtype == low:
            return low
        raise RuntimeError("Unexpected floating ScalarType in at::autocast::prioritize")

    def _kernel(self, op: str, category: str) -> Any:
        func = _overload(op)
        exclude = self._exclude

        if category == "banned":

            def banned(*args: Any, **kwargs: Any) -> Any:
                raise AutocastBanned(_BCE_MESSAGE)

            return banned

        if category == "fp32_set_opt_dtype":
            at = [a.name for a in func._schema.arguments].index("dtype")
            # CUDA's softmax/log_softmax of a float16 input with dtype float32 run the fused
            # half-to-float kernel, with no float32 copy of the input (``softmax`` in
            # aten/src/ATen/native/SoftMax.cpp: ``input_.is_cuda()`` and Half); the CPU casts first
            half_to_float = {
                "softmax.int": torch.ops.aten._softmax.default,
                "log_softmax.int": torch.ops.aten._log_softmax.default,
            }.get(op)

            def set_opt_dtype(*args: Any, **kwargs: Any) -> Any:
                with torch._C._ExcludeDispatchKeyGuard(exclude):
                    # firstarg_is_eligible, set_opt_dtype: an explicit dtype is kept
                    if args and _eligible(args[0]):
                        if len(args) > at:
                            if args[at] is None:
                                args = (*args[:at], torch.float32, *args[at + 1 :])
                        elif kwargs.get("dtype") is None:
                            kwargs = {**kwargs, "dtype": torch.float32}
                    if half_to_float is not None and args and args[0].dtype == torch.float16:
                        dtype = args[at] if len(args) > at else kwargs.get("dtype")
                        if dtype == torch.float32:
                            return half_to_float(args[0], args[1], True)
                    return func(*args, **kwargs)

            return set_opt_dtype

        if category == "fp32_append_dtype":
            target = getattr(torch.ops.aten.norm, _APPEND_DTYPE_TARGET[op])

            def append_dtype(*args: Any, **kwargs: Any) -> Any:
                with torch._C._ExcludeDispatchKeyGuard(exclude):
                    first = args[0]
                    out_type = torch.float32 if _eligible(first) else first.dtype
                    return target(*args, **kwargs, dtype=out_type)

            return append_dtype

        def cast(*args: Any, **kwargs: Any) -> Any:
            with torch._C._ExcludeDispatchKeyGuard(exclude):
                if category == "lower_precision_fp":
                    to = torch.get_autocast_dtype("cpu")
                elif category == "fp32":
                    to = torch.float32
                else:  # promote
                    to = self._promote_type([*args, *kwargs.values()])
                args = tuple(self._cached_cast(to, a) for a in args)
                kwargs = {k: self._cached_cast(to, v) for k, v in kwargs.items()}
                return func(*args, **kwargs)

        return cast

    # -- install / remove ----------------------------------------------------------------

    def __enter__(self) -> CudaAutocastPolicy:
        cuda, cpu = dispatcher_autocast_ops()
        table = set(CUDA_AUTOCAST_OPS)
        unknown = sorted(cuda - table)
        gone = sorted(table - cuda)
        self.notes = []
        if unknown:
            self.notes.append(
                "CUDA's autocast in this torch covers ops memprof's table (torch 2.13) lacks; they keep the "
                "CPU's autocast policy: " + ", ".join(unknown)
            )
        if gone:
            self.notes.append(
                "ops memprof's autocast table (torch 2.13) lists that this torch's CUDA autocast no longer "
                "covers; they run uncast: " + ", ".join(gone)
            )
        lib = torch.library.Library("aten", "IMPL")
        try:
            with warnings.catch_warnings():
                # 'Overriding a previously registered kernel': the CPU's kernels come back on exit
                warnings.simplefilter("ignore")
                for op in sorted(table & cuda):
                    lib.impl(op, self._kernel(op, CUDA_AUTOCAST_OPS[op]), "AutocastCPU")
                for op in sorted(cpu - cuda - set(unknown)):
                    lib.impl(op, torch.library.fallthrough_kernel, "AutocastCPU")
        except BaseException:
            lib._destroy()
            raise
        self._lib = lib
        self._clear_orig = torch.clear_autocast_cache

        clear_orig = self._clear_orig
        cache = self._cache

        def clear_autocast_cache() -> None:
            cache.clear()
            clear_orig()

        torch.clear_autocast_cache = clear_autocast_cache
        return self

    def __exit__(self, *exc: object) -> None:
        if self._clear_orig is not None:
            torch.clear_autocast_cache = self._clear_orig
            self._clear_orig = None
        self._cache.clear()
        if self._lib is not None:
            self._lib._destroy()
            self._lib = None


@contextlib.contextmanager
def cuda_autocast_policy() -> Iterator[CudaAutocastPolicy]:
    """While active, CPU autocast applies CUDA's autocast policy (see the module docstring)."""
    with CudaAutocastPolicy() as policy:
        yield policy
