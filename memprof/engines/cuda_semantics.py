"""What a CUDA run does differently from the CPU, applied to a CPU fake-tensor step.

On a CPU-only PyTorch build, fake tensors on device "cuda" crash in backward,
so the simulation runs CPU fake tensors and applies CUDA semantics here:

* **SDPA kernel choice.** ``F.scaled_dot_product_attention`` is routed to the
  aten op the CUDA dispatcher would pick (torch's ``sdp_utils.cpp``, order
  flash -> memory-efficient -> math): flash for float16/bfloat16 with no
  explicit mask and head dim <= 256 (multiple of 8), on sm 8.0 and newer;
  memory-efficient (bfloat16 from sm 8.0) for
  float32/float16/bfloat16 with or without a mask (boolean masks become an
  additive mask of the query dtype, padded to a multiple of 16 as CUDA does),
  when query, key and value have as many heads (it refuses grouped-query
  attention); math otherwise, as for a float32 Llama-3 (measured on an H200).
  The aten ops run their meta kernels and their real autograd formulas, so what is saved for backward is what CUDA saves (flash: output and
  log-sum-exp, never the ``L x L`` scores). On Hopper with a recent cuDNN,
  PyTorch may prefer cuDNN attention; its saved tensors (output and softmax
  statistics) are the same size as flash's, so the projection uses flash.
* **Dropout.** ATen's ``dropout`` on a CUDA tensor takes the fused
  ``native_dropout`` kernel, whose backward keeps a one-byte boolean mask; on
  the CPU it multiplies by a noise tensor of the input's dtype and keeps that
  (4 bytes an element in float32). :class:`CudaDropout` routes it as CUDA does.
  Found on the first GPU validation (``docs/validation.md``): without it every
  training step with dropout was projected high by 3 bytes per dropped element.
* **Autocast policy.** Under autocast the ops run in the dtypes CUDA's autocast
  gives them, not the CPU's (:mod:`memprof.engines.cuda_autocast`).
* **Allocator rounding.** The caching allocator rounds every block up to 512
  bytes (``kMinBlockSize``); the tracker is run with ``block_rounding=512``.
* **Grouped matmul.** ``aten._grouped_mm`` (the experts of transformers' MoE
  models) takes every floating dtype on CUDA and pads its output's rows to 16
  bytes (:class:`CudaGroupedMM`); the meta function refuses all but bfloat16.
* **bitsandbytes' 4-bit matmul.** ``bitsandbytes::gemm_4bit`` (the forward of a
  QLoRA base layer) has only an output in its fake kernel; on CUDA, past a few
  rows, bitsandbytes dequantizes the weight to the compute dtype and calls
  ``F.linear`` (:class:`CudaGemm4bit`), the temporaries a training step holds.
* **Kernels' scratch.** Some kernels allocate through the caching allocator
  beyond their outputs and free it before returning, where no tensor shows it:
  :data:`KERNEL_SCRATCH` lists them for the tracker (``_safe_softmax``, the math
  attention's softmax: a one-byte mask of its input, measured on an H200).
* **Workspaces and context.** The cuBLAS workspace and the CUDA context are not
  tensors; they are reported separately (:func:`cublas_workspace_bytes`), never
  folded into the peak.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from memprof.units import CUDA_BLOCK_BYTES

CUDA_BLOCK_ROUNDING = CUDA_BLOCK_BYTES


def cublas_workspace_bytes(sm_major: int = 9) -> int:
    """The cuBLAS workspace PyTorch allocates per handle and stream, by default.

    From ``aten/src/ATen/cuda/CublasHandlePool.cpp`` (``getChosenWorkspaceSize``):
    ``CUBLAS_WORKSPACE_CONFIG`` defaults to ``:4096:8`` (32 MiB) on Hopper and
    newer and ``:4096:2:16:8`` (8.125 MiB) before.
    """
    if sm_major >= 9:
        return 4096 * 1024 * 8
    return 4096 * 1024 * 2 + 16 * 1024 * 8


def choose_sdpa_kernel(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: torch.Tensor | None,
    dropout_p: float = 0.0,
    sm_major: int = 9,
) -> str:
    """The kernel CUDA's SDPA dispatcher picks for these inputs: flash, efficient or math."""
    hd = q.shape[-1]
    same_dims = k.shape[-1] == hd and v.shape[-1] == hd
    dense4 = q.dim() == 4 and k.dim() == 4 and v.dim() == 4
    low = q.dtype in (torch.float16, torch.bfloat16)
    if (
        attn_mask is None
        and low
        and same_dims
        and dense4
        and hd <= 256
        and hd % 8 == 0
        # FlashAttention-2, in PyTorch since 2.2, runs on sm 8.0 and newer only (sdp_utils.cpp:
        # check_flash_attention_hardware_support); a T4 (sm 7.5) falls to memory-efficient
        and sm_major >= 8
    ):
        return "flash"
    eff_dtypes = (torch.float16, torch.float32) + ((torch.bfloat16,) if sm_major >= 8 else ())
    align = 8 if low else 4
    # grouped-query attention (fewer key/value heads, enable_gqa): flash takes it, memory-
    # efficient does not (check_batch_size_and_num_heads_dense<supports_gqa=false>), so a
    # float32 Llama-3 falls to math, which materializes the L x L scores (measured on an H200)
    same_heads = dense4 and q.shape[-3] == k.shape[-3] == v.shape[-3]
    if (
        q.dtype in eff_dtypes
        and dense4
        and same_heads
        and hd % align == 0
        and v.shape[-1] % align == 0
        and k.shape[-1] == hd
    ):
        return "efficient"
    return "math"


class CudaSDPA(TorchFunctionMode):
    """Route ``F.scaled_dot_product_attention`` to the kernel CUDA would run.

    ``kernels`` counts the choices made, for the report.
    """

    def __init__(self, sm_major: int = 9) -> None:
        super().__init__()
        self.sm_major = sm_major
        self.kernels: Counter[str] = Counter()

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention or func is torch._C._nn.scaled_dot_product_attention:
            return self._sdpa(*args, **kwargs)
        return func(*args, **kwargs)

    def _sdpa(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attn_mask: torch.Tensor | None = None,
        dropout_p: float = 0.0,
        is_causal: bool = False,
        scale: float | None = None,
        enable_gqa: bool = False,
    ) -> torch.Tensor:
        if torch.is_autocast_enabled("cpu"):
            # This mode routes SDPA before the dispatcher's autocast kernel for it runs:
            # apply that kernel's cast here (lower_precision_fp in CUDA's lists and the
            # CPU's, see cuda_autocast), so the routed kernel sees what CUDA's sees.
            low = torch.get_autocast_dtype("cpu")
            query, key, value = (t.to(low) if t.is_floating_point() else t for t in (query, key, value))
            if attn_mask is not None and attn_mask.is_floating_point():
                attn_mask = attn_mask.to(low)
        kernel = choose_sdpa_kernel(query, key, value, attn_mask, dropout_p, self.sm_major)
        self.kernels[kernel] += 1
        aten = torch.ops.aten
        if kernel == "flash":
            # Flash takes grouped K/V heads natively (no repeat).
            out = aten._scaled_dot_product_flash_attention(
                query, key, value, dropout_p, is_causal, False, scale=scale
            )
            return out[0]
        if kernel == "efficient":  # same head counts (choose_sdpa_kernel): nothing to repeat
            bias = None
            if attn_mask is not None:
                bias = attn_mask
                if bias.dtype == torch.bool:
                    # convert_boolean_attn_mask: an additive mask of the query dtype
                    bias = torch.zeros_like(bias, dtype=query.dtype).masked_fill_(~bias, float("-inf"))
                last = bias.shape[-1]
                if last % 16:
                    # preprocess_mask: pad the last dim to a multiple of 16, then slice back
                    pad = 16 - last % 16
                    bias = F.pad(bias, (0, pad))[..., :last]
                bias = bias.expand(query.shape[0], query.shape[1], query.shape[2], key.shape[2])
            need_lse = torch.is_grad_enabled() and (
                query.requires_grad or key.requires_grad or value.requires_grad
            )
            out = aten._scaled_dot_product_efficient_attention(
                query, key, value, bias, need_lse, dropout_p, is_causal, scale=scale
            )
            return out[0]
        kw: dict[str, Any] = {"scale": scale}
        if enable_gqa:
            kw["enable_gqa"] = True
        out = aten._scaled_dot_product_attention_math(
            query, key, value, attn_mask, dropout_p, is_causal, None, **kw
        )
        return out[0]


def _safe_softmax_scratch(args: Any, kwargs: dict[str, Any], out: torch.Tensor) -> list[int]:
    """``aten._safe_softmax(x, dim)``: after its output, ``isneginf(x)`` (a bool per element),
    ``all`` of it over ``dim`` (a bool per row) and a 0-d scalar of the output's dtype,
    freed on return (``aten/src/ATen/native/transformers/attention.cpp``; the H200's
    allocator trace of a float32 Llama-3.2-1B forward shows exactly these three)."""
    x = args[0]
    dim = args[1] if len(args) > 1 else kwargs["dim"]
    n = x.numel()
    along = x.shape[dim] if x.dim() else 1
    return [n, n // along if along else 0, out.element_size()]


#: op -> the bytes its CUDA kernel allocates beyond its outputs and frees before returning
KERNEL_SCRATCH: dict[Any, Any] = {torch.ops.aten._safe_softmax.default: _safe_softmax_scratch}


def fused_dropout_applies(input: torch.Tensor, p: float, train: bool) -> bool:
    """Whether CUDA's ``dropout`` takes the fused kernel (``is_fused_kernel_acceptable``).

    ``aten/src/ATen/native/Dropout.cpp``: a CUDA input (in the sim every input
    stands for one), training, ``0 < p < 1`` and at least one element. The
    in-place form (``dropout_``) never does.
    """
    return bool(train) and 0 < p < 1 and input.numel() > 0


class CudaDropout(TorchFunctionMode):
    """Run ``dropout`` as CUDA does: ``native_dropout``, which saves a boolean mask.

    On the CPU, ``F.dropout`` (out of place, in training) computes ``input *
    noise`` with a noise tensor of the input's dtype, and autograd keeps the
    noise: 4 bytes an element in float32, 2 in bfloat16. On CUDA the same call
    runs the fused ``native_dropout`` kernel, which returns the output and a
    ``bool`` mask, and its backward (``native_dropout_backward``) keeps the mask
    alone: 1 byte an element. ``elements`` counts the elements routed (tests).
    """

    def __init__(self) -> None:
        super().__init__()
        self.elements = 0

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if func is F.dropout:
            return self._dropout(*args, **kwargs)
        if func is torch.dropout:
            return self._dropout(*args, **{**kwargs, "inplace": False})
        return func(*args, **kwargs)

    def _dropout(
        self,
        input: torch.Tensor,
        p: float = 0.5,
        training: bool = True,
        inplace: bool = False,
        *,
        train: bool | None = None,
    ) -> torch.Tensor:
        training = training if train is None else train
        if inplace or not isinstance(input, torch.Tensor) or not fused_dropout_applies(input, p, training):
            return F.dropout(input, p, training, inplace)
        self.elements += input.numel()
        return torch.native_dropout(input, p, True)[0]


def grouped_mm_output(
    mat_a: torch.Tensor, mat_b: torch.Tensor, offs: torch.Tensor | None, out_dtype: torch.dtype | None
) -> torch.Tensor:
    """The output CUDA's ``_grouped_mm`` allocates (``create_grouped_gemm_output_tensor``).

    Any floating dtype: bfloat16 runs the CUTLASS kernel on sm90/sm100, every other
    dtype and GPU the fallback that loops ``mm_out`` over the groups into the same
    output (``_grouped_mm_cuda`` in ``aten/src/ATen/native/cuda/GroupedBlas.cpp``),
    so the memory is the output alone. Its last dimension's stride is padded to 16
    bytes, as on CUDA. (The meta function of torch 2.13 still refuses non-bfloat16
    inputs, a CUDA rule of older releases, and pads only on CUDA builds.)
    """
    a2, b2 = mat_a.dim() == 2, mat_b.dim() == 2
    if a2 and b2:
        if offs is None:
            raise RuntimeError("_grouped_mm: 2D x 2D needs offs")
        size = [offs.size(0), mat_a.size(0), mat_b.size(1)]
    elif a2:
        size = [mat_a.size(0), mat_b.size(-1)]
    elif b2:
        if offs is None:
            raise RuntimeError("_grouped_mm: 3D x 2D needs offs")
        size = [mat_a.size(1), mat_b.size(1)]
    else:
        size = [mat_a.size(0), mat_a.size(1), mat_b.size(-1)]
    dtype = out_dtype or mat_a.dtype
    align = max(1, 16 // torch.empty((), dtype=dtype, device="meta").element_size())
    padded = (size[-1] + align - 1) // align * align
    stride = [size[1] * padded, padded, 1] if a2 == b2 else [padded, 1]
    return torch.empty_strided(size, stride, dtype=dtype, device=mat_a.device)


class CudaGroupedMM(TorchDispatchMode):
    """``aten._grouped_mm`` (the experts of transformers' MoE models) as CUDA runs it: see :func:`grouped_mm_output`."""

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if func is torch.ops.aten._grouped_mm.default:
            mat_a, mat_b = args[0], args[1]
            offs = args[2] if len(args) > 2 else kwargs.get("offs")
            out_dtype = args[4] if len(args) > 4 else kwargs.get("out_dtype")
            return grouped_mm_output(mat_a, mat_b, offs, out_dtype)
        return func(*args, **kwargs)


#: rows (tokens) up to which bitsandbytes' CUDA ``gemm_4bit`` always runs its fused kernel
#: (``_GEMM_4BIT_CUSTOM_FLOOR_M`` in ``bitsandbytes/backends/cuda/ops.py``)
GEMM_4BIT_FUSED_ROWS = 4


class CudaGemm4bit(TorchFunctionMode):
    """``bitsandbytes::gemm_4bit`` as bitsandbytes' CUDA dispatch runs it for more than a few rows.

    The op's fake kernel allocates the output only. On CUDA (``backends/cuda/ops.py``)
    bitsandbytes runs its fused kernel (output only) up to 4 rows, and past 1536 rows
    (or a blocksize-misaligned K) the unfused fallback: the nested absmax dequantized
    (float32), the weight dequantized to the compute dtype (``[N, K]``), then
    ``F.linear``. Between, a per-GPU heuristic picks; for most shapes above 32 rows on
    Hopper it is the fallback, and a training step's rows (tokens) are in the
    thousands. The projection takes the fallback above 4 rows and runs bitsandbytes'
    own unfused implementation (its default backend's, the same ops and sizes as the
    CUDA fallback), so the step holds the temporaries CUDA's does. The backward
    (``MatMul4Bit``) already dequantizes with ordinary ops. ``calls`` counts the paths.
    """

    def __init__(self) -> None:
        super().__init__()
        self.calls: Counter[str] = Counter()

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if getattr(func, "namespace", None) == "bitsandbytes" and func._opname == "gemm_4bit":
            a = args[0]
            if a.numel() // max(1, a.shape[-1]) > GEMM_4BIT_FUSED_ROWS:
                from bitsandbytes.backends.default.ops import _gemm_4bit_default_impl

                self.calls["dequantize+linear"] += 1
                return _gemm_4bit_default_impl(*args, **kwargs)
            self.calls["fused"] += 1
        return func(*args, **kwargs)
