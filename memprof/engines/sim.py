"""The sim engine: the step under fake tensors, projected to a CUDA GPU.

No weights are loaded and no real memory is used, so any size of model can be
profiled on a laptop. The step runs on CPU fake tensors (fake tensors on
"cuda" crash in backward on CPU-only builds) and :mod:`cuda_semantics` applies
what CUDA does differently: the SDPA kernel choice, the allocator's 512-byte
blocks, the multi-tensor (foreach) optimizer that CUDA defaults to, and the
cuBLAS workspace reported beside the peak; under autocast the step gets CUDA's
autocast policy (:mod:`cuda_autocast`: softmax, layer_norm, the losses, sums and
several pointwise ops in float32, as PyTorch's AutocastCUDA kernels run them),
not the CPU's. The peak reserved memory is an
estimate: the measured step's allocations and frees, replayed through a model
of the caching allocator (:mod:`memprof.allocator_model`) with the step's allocator
settings. The same replay gives allocated and reserved over the step and the
fragmentation at their peaks; a second replay with ``expandable_segments`` says
whether that setting would help; with a ``snapshot_path`` the model's state and
history are written as a CUDA allocator snapshot (:mod:`memprof.snapshot`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import torch

from memprof.allocator_model import AllocatorEstimate, AllocatorSettings, expandable_segments_hint, replay
from memprof.budget import DEFAULT_CONTEXT_BYTES, cublas_handles, non_tensor
from memprof.engines.base import Engine, RunResult
from memprof.engines.cuda_autocast import AutocastBanned, CudaAutocastPolicy
from memprof.engines.cuda_semantics import (
    CUDA_BLOCK_ROUNDING,
    KERNEL_SCRATCH,
    CudaDropout,
    CudaGemm4bit,
    CudaGroupedMM,
    CudaSDPA,
    cublas_workspace_bytes,
)
from memprof.engines.fake_fidelity import SimFakeMode, host_constants
from memprof.engines.moe import assumed_routing, experts_modules
from memprof.errors import MemprofError, NotSupported
from memprof.gpus import GpuPreset
from memprof.inputs import IMAGE_TEXT_TASKS
from memprof.sharding import fake_group
from memprof.snapshot import model_snapshot, write_snapshot
from memprof.tracking import TraceEvent
from memprof.units import format_bytes
from memprof.workload import StepSetup, Workload

if TYPE_CHECKING:
    from memprof.models import ResolvedModel


#: how the note on the allocator model's estimate starts (memprof.engines.depth replaces it)
RESERVED_NOTE = "peak reserved is an estimate, not a measurement"
#: how the note on SDPA's kernels starts
KERNELS_NOTE = "SDPA kernel calls projected: "


def kernel_note(kernels: dict[str, int]) -> str:
    """The note on the SDPA kernels a step called, and how often."""
    return KERNELS_NOTE + ", ".join(f"{k} x{v:,}" for k, v in sorted(kernels.items()))


class SimEngine(Engine):
    """Fake-tensor step projected to CUDA (default target: a Hopper-class GPU, sm 9.x)."""

    name = "sim"
    simulated = True
    block_rounding = CUDA_BLOCK_ROUNDING
    load_weights = False
    init_weights = False  # fake tensors have no values to initialise
    foreach = True  # torch's default for CUDA tensors
    record_trace = True  # replayed through the allocator model

    def __init__(
        self,
        sm_major: int = 9,
        device_memory_bytes: int | None = None,
        snapshot_path: str | None = None,
        cuda_sdpa: bool = True,
        cuda_autocast: bool = True,
        gpu: GpuPreset | None = None,
        cuda_dropout: bool = True,
        context_bytes: int | None = None,
    ) -> None:
        """
        Args:
            sm_major: the compute capability projected (SDPA kernel choice).
            device_memory_bytes: the GPU memory the allocator model may reserve;
                it enables the model's garbage collection and out-of-memory
                retries (None: unlimited).
            snapshot_path: write the allocator model's snapshot of the measured
                step there (``torch.cuda.memory._dump_snapshot``'s format).
            cuda_sdpa: route ``scaled_dot_product_attention`` to the kernel CUDA
                would pick; False leaves it to the CPU dispatcher (see :func:`sim_engine`).
            cuda_autocast: autocast applies CUDA's policy (:mod:`cuda_autocast`);
                False leaves the CPU's (see :func:`sim_engine`).
            cuda_dropout: dropout runs CUDA's fused kernel, which saves a boolean
                mask (:class:`CudaDropout`); False leaves the CPU's (see :func:`sim_engine`).
            gpu: the GPU preset projected (``--gpu``): its compute capability and
                memory replace ``sm_major`` and ``device_memory_bytes`` (the allocator
                model may reserve its memory less the context and the workspace), and
                its CUDA context estimate is reported.
            context_bytes: the CUDA context reported (``--context-overhead``); None: the
                preset's estimate, else :data:`memprof.budget.DEFAULT_CONTEXT_BYTES`.
        """
        super().__init__()
        self.preset = gpu
        #: the allocator model's capacity came from the preset: take a training step's
        #: second cuBLAS workspace off it too (:func:`cublas_handles`)
        self._second_workspace_off = False
        if context_bytes is not None:
            self.context_bytes, self.context_source = context_bytes, "given (--context-overhead)"
        elif gpu is not None:
            self.context_bytes = gpu.context_bytes
            self.context_source = (
                gpu.context_source
                if gpu.context_measured
                else f"estimate for the {gpu.name} (memprof's, not measured; --context-overhead sets it)"
            )
        else:
            self.context_bytes = DEFAULT_CONTEXT_BYTES
            self.context_source = "assumed (memprof's default; measure it with --engine cuda)"
        if gpu is not None:
            sm_major = gpu.sm_major
            if device_memory_bytes is None:
                # one workspace here; a training step's second is taken off at the replay
                device_memory_bytes = gpu.memory_bytes - self.context_bytes - cublas_workspace_bytes(sm_major)
                self._second_workspace_off = True
        self.sm_major = sm_major
        self.cuda_sdpa = cuda_sdpa
        self.cuda_autocast = cuda_autocast
        self.cuda_dropout = cuda_dropout
        #: CUDA's autocast policy while the step runs (None: the CPU's)
        self._autocast: CudaAutocastPolicy | None = None
        self.device_memory_bytes = device_memory_bytes
        self.snapshot_path = snapshot_path
        self._sdpa: CudaSDPA | None = None
        self._dropout: CudaDropout | None = None
        #: bitsandbytes' 4-bit matmul as CUDA runs it (QLoRA base layers)
        self._gemm4 = CudaGemm4bit()
        #: the mixture-of-experts routing mode of the model being run (memprof.engines.moe)
        self._routing: Any = None
        self._estimate: AllocatorEstimate | None = None
        #: the last measured step's estimate with expandable segments: the hint's
        #: replay, or the step's own when its settings already have them (None: no step yet)
        self.expandable_estimate: AllocatorEstimate | None = None
        self._hint: dict[str, Any] | None = None
        #: convolution modules of the model being run (a cuDNN workspace when above 0)
        self._convolutions = 0
        self._world_size = 1
        self._training = False

    def saw_model(self, model: torch.nn.Module, setup: StepSetup) -> None:
        self._convolutions = sum(isinstance(m, torch.nn.modules.conv._ConvNd) for m in model.modules())
        self._world_size = setup.workload.world_size
        self._training = setup.workload.training

    def kernel_scratch(self) -> dict[Any, Any] | None:
        """CUDA kernels' scratch (:data:`KERNEL_SCRATCH`), with CUDA's SDPA routing: the math
        kernel's softmax; off with CPU semantics, as the cpu engine cannot see it."""
        return KERNEL_SCRATCH if self.cuda_sdpa else None

    def workspace_bytes(self, training: bool = False) -> int:
        """The cuBLAS workspaces projected beside the peak (not in it): one per handle."""
        return cublas_workspace_bytes(self.sm_major) * cublas_handles(training)

    def device_name(self) -> str:
        if self.preset is not None:
            return f"simulated {self.preset.name} (sm {self.preset.sm} semantics, CPU fake tensors)"
        return f"simulated CUDA GPU (sm {self.sm_major}.x semantics, CPU fake tensors)"

    @contextlib.contextmanager
    def context(self) -> Iterator[None]:
        self._sdpa = CudaSDPA(self.sm_major) if self.cuda_sdpa else None
        self._autocast = CudaAutocastPolicy() if self.cuda_autocast else None
        self._dropout = CudaDropout() if self.cuda_dropout else None
        with (
            SimFakeMode(allow_non_fake_inputs=True),
            self._sdpa if self._sdpa is not None else contextlib.nullcontext(),
            self._dropout if self._dropout is not None else contextlib.nullcontext(),
            self._gemm4,
            self._autocast if self._autocast is not None else contextlib.nullcontext(),
            one_sequence_per_row(),
        ):
            yield

    def _build(
        self, rm: ResolvedModel, setup: StepSetup, allow_pickle: bool, seed: int
    ) -> tuple[torch.nn.Module, Any]:
        # construction constants computed on the host keep their values (fake_fidelity)
        with host_constants():
            return super()._build(rm, setup, allow_pickle, seed)

    def run_detailed(self, rm: ResolvedModel, workload: Workload | StepSetup, **kwargs: Any) -> RunResult:
        """As :meth:`Engine.run_detailed`; image-text models run with :func:`known_small_values`."""

        if rm.model_type in MAMBA_TYPES:
            workload = StepSetup.of(workload)
            workload.notes.append(MAMBA_NOTE)
        with known_small_values() if rm.task in IMAGE_TEXT_TASKS else contextlib.nullcontext():
            return super().run_detailed(rm, workload, **kwargs)

    @contextlib.contextmanager
    def mesh(self, setup: StepSetup) -> Iterator[Any]:
        """A sharded step runs on a fake process group of ``world_size`` ranks (this is rank 0)."""

        with fake_group(setup.workload.world_size) as mesh:
            yield mesh

    def launcher(self) -> str:
        return "fake process group: one process, no communication"

    def sharding_notes(self) -> list[str]:
        return [
            "sharded step projected on rank 0 of a fake process group: the real FSDP2 code runs, its "
            "collectives move nothing (shapes and buffers as on real ranks); rank 0 holds the largest "
            "shard when sizes do not divide; the optimizer steps the rank's local shards (the ops DTensor "
            "would dispatch, without its sharding propagation)"
        ]

    @contextlib.contextmanager
    def experts_context(self, model: Any, setup: StepSetup) -> Iterator[Any]:
        """Mixture-of-experts layers: CUDA's grouped matmul, and the routing assumption (memprof.engines.moe)."""

        if not experts_modules(model):
            yield None
            return
        with CudaGroupedMM(), assumed_routing(model, setup.workload.moe_routing) as info:
            self._routing = info.mode if info is not None else None
            try:
                yield info
            finally:
                self._routing = None

    def recompute_context(self) -> Callable[[], Any] | None:
        # Torch function modes are not active while autograd runs backward, where
        # checkpointing recomputes: re-enter the SDPA routing there.
        # The fused dropout, the mixture-of-experts routing and bitsandbytes' 4-bit
        # matmul (function modes too) go with it.
        modes = [m for m in (self._sdpa, self._dropout, self._routing, self._gemm4) if m is not None]

        @contextlib.contextmanager
        def recompute_modes() -> Iterator[None]:
            with contextlib.ExitStack() as stack:
                for m in modes:
                    stack.enter_context(m)
                yield

        return recompute_modes

    def before_measure(self) -> None:
        super().before_measure()
        self._estimate = None
        self.expandable_estimate = None
        self._hint = None
        if self._sdpa is not None:
            self._sdpa.kernels.clear()  # count the measured step's kernels only
        self._gemm4.calls.clear()

    def after_measure(self, extra: dict[str, Any]) -> None:
        ws = cublas_workspace_bytes(self.sm_major)
        named = non_tensor(
            cublas_workspace_bytes=ws,
            convolutions=self._convolutions,
            world_size=self._world_size,
            context_bytes=self.context_bytes,
            context_source=self.context_source,
            handles=cublas_handles(self._training),
        )
        extra["overheads"] = {
            "cublas_workspace_bytes": named["cublas_workspace_bytes"],
            "cuda_context_bytes": self.context_bytes,
            "included_in_peak": False,
            "sdpa_kernels": dict(self._sdpa.kernels) if self._sdpa else {},
            "non_tensor": named,
            "gpu": self.preset.to_dict() if self.preset is not None else None,
        }

    def replay_trace(self, trace: list[TraceEvent], setup: StepSetup, extra: dict[str, Any]) -> None:
        """Replay the step's allocations through the allocator model (twice without expandable segments).

        Raises:
            InputError: the snapshot cannot be written.
        """
        settings = AllocatorSettings.from_dict(setup.alloc_conf)
        capacity = self.device_memory_bytes
        if capacity is not None and self._second_workspace_off:
            capacity -= cublas_workspace_bytes(self.sm_major) * (cublas_handles(self._training) - 1)
        if self.snapshot_path:
            est, snap = model_snapshot(trace, settings, capacity_bytes=capacity, timeline=True)
            write_snapshot(snap, self.snapshot_path)
        else:
            est = replay(trace, settings, capacity_bytes=capacity, timeline=True)
        self._estimate = est
        hint = None
        if settings.expandable_segments:
            self.expandable_estimate = est
        else:
            # the same allocations with the other setting: one more replay, no new run
            exp = replay(trace, replace(settings, expandable_segments=True), capacity_bytes=capacity)
            self.expandable_estimate = exp
            hint = expandable_segments_hint(est, exp)
        self._hint = hint
        extra["allocator"] = {"source": "model", **est.to_dict(), "expandable_segments_hint": hint}

    def translate_error(self, e: Exception, model: str, where: str) -> MemprofError | None:
        """Fake tensors' known limits: a step that reads tensor values, an op without a fake kernel."""
        from torch._subclasses.fake_tensor import (
            DataDependentOutputException,
            DynamicOutputShapeException,
            UnsupportedOperatorException,
        )

        at = f" ({where})" if where else ""
        if isinstance(e, AutocastBanned):
            return NotSupported(
                model,
                f"CUDA's autocast refuses binary_cross_entropy (torch.nn.BCELoss){at}; use "
                "binary_cross_entropy_with_logits (torch.nn.BCEWithLogitsLoss), as on a GPU",
                engine="sim",
            )
        if isinstance(e, (DataDependentOutputException, DynamicOutputShapeException)):
            why = f"the step reads tensor values{at}"
        elif isinstance(e, UnsupportedOperatorException):
            why = f"the step runs an op fake tensors cannot run{at}"
        else:
            return None
        return NotSupported(model, f"{why}; use --engine cpu to measure it", engine="sim")

    def peak_reserved(self) -> int | None:
        return self._estimate.peak_reserved_bytes if self._estimate is not None else None

    def replay_notes(self) -> list[str]:
        """The notes on the last replay: the allocator model's estimate, the expandable segments hint."""
        est, out = self._estimate, []
        if est is not None:
            out.append(
                f"{RESERVED_NOTE}: the step's allocations replayed through a "
                f"model of the CUDA caching allocator ({est.conf or 'default settings'}; "
                f"{format_bytes(est.fragmentation_bytes)} reserved beyond the allocated peak, "
                f"{est.segments} segments)"
            )
        if self._hint is not None and self._hint["message"]:
            out.append(self._hint["message"])
        return out

    def notes(self) -> list[str]:
        ws = cublas_workspace_bytes(self.sm_major) / 2**20
        kernels = dict(self._sdpa.kernels) if self._sdpa else {}
        off = self.cpu_semantics()
        out = [
            "sim engine: fake tensors, no weights; CUDA semantics applied (512-byte allocator blocks, "
            "CUDA's SDPA kernel choice, CUDA's autocast policy, foreach optimizer, fused dropout)"
            if not off
            else f"sim engine: fake tensors, no weights; CPU semantics instead of CUDA's for: {', '.join(off)}",
            f"not in the peak: the cuBLAS workspaces ({ws:.1f} MiB per handle and stream, allocated on a "
            "thread's first matmul: the forward's, and in training autograd's) and the CUDA context "
            "(driver-dependent; measure it with --engine cuda)",
        ]
        est = self._estimate
        out += self.replay_notes()
        if self.snapshot_path and est is not None:
            out.append(
                f"allocator snapshot of the model written to {self.snapshot_path} (open it at "
                "pytorch.org/memory_viz; a model's replay, not a measurement; time is the op counter)"
            )
        if kernels:
            out.append(kernel_note(kernels))
        if self._autocast is not None:
            out.extend(self._autocast.notes)
        if self._gemm4.calls:
            out.append(
                "bitsandbytes 4-bit matmuls projected as CUDA runs them: "
                + ", ".join(f"{k} x{v:,}" for k, v in sorted(self._gemm4.calls.items()))
            )
        return out

    def cpu_semantics(self) -> list[str]:
        """Which of the CUDA semantics are switched off (:func:`sim_engine`); empty as shipped."""
        off = []
        if self.block_rounding != CUDA_BLOCK_ROUNDING:
            off.append(f"{self.block_rounding}-byte blocks")
        if self.foreach is not True:
            off.append("the CPU's optimizer implementation")
        if not self.cuda_sdpa:
            off.append("SDPA as the CPU dispatches it")
        if not self.cuda_autocast:
            off.append("the CPU's autocast policy")
        if not self.cuda_dropout:
            off.append("dropout as the CPU runs it")
        return off


def sim_engine(
    *,
    exact_bytes: bool = False,
    cpu_optimizer: bool = False,
    cuda_sdpa: bool = True,
    cuda_autocast: bool = True,
    sm_major: int = 9,
    cuda_dropout: bool = True,
) -> SimEngine:
    """The sim engine, optionally with some of its CUDA semantics switched off.

    Comparing the sim engine with the cpu engine (a real CPU step) mixes two
    things: how faithfully the fake-tensor trace follows the real step, and the
    CUDA semantics the sim applies on purpose. Switching all of the latter off
    leaves the former: the sim with CPU semantics should agree with the cpu engine
    byte for byte (``bench/validate.py``, ``tests/test_coverage.py``).

    Args:
        exact_bytes: ``block_rounding = 1`` (exact bytes, as the cpu engine counts)
            instead of the CUDA allocator's 512-byte blocks.
        cpu_optimizer: ``foreach = None``: torch's default optimizer implementation
            for the CPU (a per-parameter loop) instead of CUDA's multi-tensor one.
        cuda_sdpa: route ``scaled_dot_product_attention`` to the kernel CUDA would
            pick; False leaves it to the CPU dispatcher, as a CPU step runs it.
        cuda_autocast: autocast applies CUDA's policy (which ops run in float32 or
            the low-precision dtype); False leaves the CPU's, as a CPU step runs it.
        sm_major: the compute capability projected (CUDA's SDPA kernel choice).
        cuda_dropout: dropout runs CUDA's fused kernel (a one-byte mask kept for
            backward); False leaves the CPU's (a mask of the input's dtype).
    """
    engine = SimEngine(
        sm_major=sm_major, cuda_sdpa=cuda_sdpa, cuda_autocast=cuda_autocast, cuda_dropout=cuda_dropout
    )
    if exact_bytes:
        engine.block_rounding = 1
    if cpu_optimizer:
        engine.foreach = None  # type: ignore[assignment]  # Engine.foreach is bool | None; SimEngine narrows it
    return engine


def cpu_semantics_sim() -> SimEngine:
    """The sim engine with every CUDA semantic switched off: the trace-fidelity check against the cpu engine."""
    return sim_engine(
        exact_bytes=True, cpu_optimizer=True, cuda_sdpa=False, cuda_autocast=False, cuda_dropout=False
    )


#: model types whose selective-scan layers have fused CUDA kernels in mamba_ssm / causal_conv1d
MAMBA_TYPES = {
    "mamba",
    "mamba2",
    "falcon_mamba",
    "jamba",
    "bamba",
    "zamba",
    "zamba2",
    "falcon_h1",
    "granitemoehybrid",
    "nemotron_h",
}
MAMBA_NOTE = (
    "mamba layers: projected on transformers' slow path (the scan in PyTorch ops, as on a GPU without "
    "mamba_ssm and causal_conv1d); with those installed the fused CUDA kernels run instead and take less memory"
)

#: elements up to which fake tensors made from Python numbers keep their values (a batch's image grids)
KNOWN_VALUES_NUMEL = 4096


@contextlib.contextmanager
def known_small_values() -> Iterator[None]:
    """Small tensors made from Python numbers keep their values; transformers' value checks are off.

    Image-text models read values that fake tensors lack: Qwen2-VL's vision tower
    splits its patches by the (t, h, w) grid of each image (``tolist``), and LLaVA
    checks that the image tokens in ``input_ids`` match the image features
    (``torch_compilable_check``: a data-dependent branch). FakeTensorMode keeps the
    value of a tensor built with ``torch.tensor`` and of ops on such tensors, up to
    ``CONSTANT_NUMEL_LIMIT`` elements (1 by default): raised here so a batch's grid
    stays known. The checks are off through transformers' own switch
    (``TRANSFORMERS_DISABLE_TORCH_CHECK``): memprof's inputs satisfy them by
    construction, and the cpu engine runs them. Both are restored on exit.
    """
    import os

    from torch._subclasses import fake_tensor

    limit = fake_tensor.CONSTANT_NUMEL_LIMIT
    env = os.environ.get("TRANSFORMERS_DISABLE_TORCH_CHECK")
    fake_tensor.CONSTANT_NUMEL_LIMIT = max(limit, KNOWN_VALUES_NUMEL)
    os.environ["TRANSFORMERS_DISABLE_TORCH_CHECK"] = "1"
    try:
        yield
    finally:
        fake_tensor.CONSTANT_NUMEL_LIMIT = limit
        if env is None:
            os.environ.pop("TRANSFORMERS_DISABLE_TORCH_CHECK", None)
        else:
            os.environ["TRANSFORMERS_DISABLE_TORCH_CHECK"] = env


@contextlib.contextmanager
def one_sequence_per_row() -> Iterator[None]:
    """transformers' packed-sequence check answers "none" for fake position ids, as for real ones.

    Without a KV cache and an attention mask (training with checkpointing, which turns
    the cache off) transformers looks for several sequences packed in one row of the
    position ids (``masking_utils.find_packed_sequence_indices``). Fake tensors have no
    values, so the check cannot conclude and a batch x 1 x seq x seq mask is built that
    the real step does not have (and that SDPA gets instead of ``is_causal``). memprof's
    inputs hold one sequence per row: the same ops run, and the answer is the real one.
    The function is restored on exit.
    """
    try:
        from transformers import masking_utils
    except ImportError:  # pragma: no cover - transformers without masking_utils (< 4.53)
        yield
        return
    orig = getattr(masking_utils, "find_packed_sequence_indices", None)
    if orig is None:  # pragma: no cover
        yield
        return
    from torch._subclasses.fake_tensor import FakeTensor

    def find_packed_sequence_indices(position_ids: Any) -> Any:
        out = orig(position_ids)  # the ops a real step runs
        return None if isinstance(position_ids, FakeTensor) else out

    masking_utils.find_packed_sequence_indices = find_packed_sequence_indices
    try:
        yield
    finally:
        masking_utils.find_packed_sequence_indices = orig
