"""GPU presets: what ``--gpu NAME`` projects a step onto (plain data, no torch).

Each preset gives the compute capability (the sim engine's SDPA kernel choice and
cuBLAS workspace), the memory as ``nvidia-smi`` reports its total (the budget and the
allocator model's capacity), an estimate of the CUDA context, the memory bandwidth
and the host link (the cost of offloading to host memory), and its source.

What is a vendor figure and what is not:

* compute capability, memory bandwidth, host link (PCIe generation, x16): the
  vendor's datasheet or product page named in ``source`` (compute capability:
  NVIDIA's CUDA GPUs list, https://developer.nvidia.com/cuda-gpus);
* ``memory_bytes``: the total ``nvidia-smi`` reports (a little below the marketing
  "GB": a 24 GB RTX 4090 shows 24564 MiB), the figure commonly seen with recent
  drivers; a driver or ECC setting can move it by a few MiB;
* ``context_bytes``: memprof's **estimate** of the CUDA context and the libraries a
  PyTorch process loads (CUDA 12, lazy module loading), not a vendor figure; where
  ``context_measured`` says so, memprof's cuda engine measured it on that GPU (the
  H200: 758 MiB for a training step where the estimate was 512 MiB, so the other
  presets' estimates are likely low by as much); ``memprof analyze --engine cuda``
  measures yours (``overheads.context_and_libraries_bytes``), ``--context-overhead``
  overrides it;
* ``host_link_gbps``: the link's theoretical bandwidth per direction (x16 lanes,
  128b/130b encoding): PCIe 3.0 15.75, 4.0 31.5, 5.0 63.0 GB/s; real copies reach
  some 80% of it.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import Any

from memprof.errors import InputError

MiB = 2**20

#: PCIe x16 bandwidth per direction by generation, GB/s (theoretical)
PCIE_X16_GBPS = {3: 15.75, 4: 31.5, 5: 63.0}

CUDA_GPUS = "https://developer.nvidia.com/cuda-gpus"


@dataclass(frozen=True)
class GpuPreset:
    """One GPU model, as ``--gpu`` knows it."""

    name: str
    sm_major: int
    sm_minor: int
    #: total device memory as nvidia-smi reports it
    memory_bytes: int
    #: the CUDA context + libraries per process: memprof's estimate, or measured (``context_measured``)
    context_bytes: int
    #: device memory bandwidth, GB/s (datasheet)
    memory_bandwidth_gbps: float
    #: PCIe generation of the host link (x16)
    pcie_gen: int
    #: vendor datasheet or product page
    source: str
    aliases: tuple[str, ...] = field(default=())
    #: where memprof measured ``context_bytes`` on this GPU (empty: an estimate)
    context_measured: str = ""

    @property
    def sm(self) -> str:
        return f"{self.sm_major}.{self.sm_minor}"

    @property
    def host_link(self) -> str:
        return f"PCIe {self.pcie_gen}.0 x16"

    @property
    def host_link_gbps(self) -> float:
        return PCIE_X16_GBPS[self.pcie_gen]

    @property
    def context_source(self) -> str:
        """Where ``context_bytes`` comes from: ``measured ...`` or ``estimate ...``."""
        if self.context_measured:
            return f"measured {self.context_measured} (--context-overhead overrides it)"
        return "estimate (memprof's, not measured on this GPU; --context-overhead overrides it)"

    @property
    def usable_bytes(self) -> int:
        """The memory left after the CUDA context estimate."""
        return self.memory_bytes - self.context_bytes

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["aliases"] = list(self.aliases)
        d.update(
            sm=self.sm,
            host_link=self.host_link,
            host_link_gbps=self.host_link_gbps,
            usable_bytes=self.usable_bytes,
            context_source=self.context_source,
        )
        return d


def _mib(n: int) -> int:
    return n * MiB


PRESETS: tuple[GpuPreset, ...] = (
    GpuPreset(
        "T4", 7, 5, _mib(15360), _mib(384), 320, 3,
        "NVIDIA T4 Tensor Core GPU datasheet, "
        "https://www.nvidia.com/content/dam/en-zz/Solutions/Data-Center/tesla-t4/t4-tensor-core-datasheet-951643.pdf",
        ("tesla-t4",),
    ),
    GpuPreset(
        "L4", 8, 9, _mib(23034), _mib(448), 300, 4,
        "NVIDIA L4 Tensor Core GPU datasheet, https://www.nvidia.com/en-us/data-center/l4/",
    ),
    GpuPreset(
        "A10G", 8, 6, _mib(23028), _mib(448), 600, 4,
        "Amazon EC2 G5 instances (NVIDIA A10G), https://aws.amazon.com/ec2/instance-types/g5/; bandwidth "
        "and link from the NVIDIA A10 datasheet, https://www.nvidia.com/en-us/data-center/products/a10-gpu/",
    ),
    GpuPreset(
        "A100 40GB", 8, 0, _mib(40960), _mib(512), 1555, 4,
        "NVIDIA A100 Tensor Core GPU datasheet (SXM4 40GB), https://www.nvidia.com/en-us/data-center/a100/",
        ("a100-40gb", "a100-40g", "a100-sxm4-40gb"),
    ),
    GpuPreset(
        "A100 80GB", 8, 0, _mib(81920), _mib(512), 2039, 4,
        "NVIDIA A100 Tensor Core GPU datasheet (SXM4 80GB), https://www.nvidia.com/en-us/data-center/a100/",
        ("a100-80gb", "a100-80g", "a100-sxm4-80gb"),
    ),
    GpuPreset(
        "H100 80GB SXM", 9, 0, _mib(81559), _mib(512), 3350, 5,
        "NVIDIA H100 Tensor Core GPU datasheet (H100 SXM), https://www.nvidia.com/en-us/data-center/h100/",
        ("h100", "h100-sxm", "h100-80gb", "h100-sxm5", "h100-80gb-hbm3"),
    ),
    GpuPreset(
        "H100 80GB PCIe", 9, 0, _mib(81559), _mib(512), 2000, 5,
        "NVIDIA H100 Tensor Core GPU datasheet (H100 PCIe), https://www.nvidia.com/en-us/data-center/h100/",
        ("h100-pcie", "h100-80gb-pcie"),
    ),
    GpuPreset(
        "H200", 9, 0, _mib(143771), _mib(758), 4800, 5,
        "NVIDIA H200 Tensor Core GPU product page (H200 SXM, 141 GB), https://www.nvidia.com/en-us/data-center/h200/",
        ("h200-sxm", "h200-141gb"),
        "by memprof's cuda engine on an H200 on 2026-12-04 (a Llama-3.2-1B training step, torch 2.11 "
        "with CUDA 13.0, driver 580.159.04; an inference step: 678 MiB; docs/validation.md)",
    ),
    GpuPreset(
        "RTX 3090", 8, 6, _mib(24576), _mib(448), 936, 4,
        "NVIDIA GeForce RTX 3090 specifications, "
        "https://www.nvidia.com/en-us/geforce/graphics-cards/30-series/rtx-3090-3090ti/",
        ("3090", "geforce-rtx-3090"),
    ),
    GpuPreset(
        "RTX 4090", 8, 9, _mib(24564), _mib(448), 1008, 4,
        "NVIDIA GeForce RTX 4090 specifications, https://www.nvidia.com/en-us/geforce/graphics-cards/40-series/rtx-4090/",
        ("4090", "geforce-rtx-4090"),
    ),
    GpuPreset(
        "RTX 5090", 12, 0, _mib(32607), _mib(512), 1792, 5,
        "NVIDIA GeForce RTX 5090 specifications, https://www.nvidia.com/en-us/geforce/graphics-cards/50-series/rtx-5090/",
        ("5090", "geforce-rtx-5090"),
    ),
)  # fmt: skip


def _key(text: str) -> str:
    """Case, spaces, dashes and underscores do not matter: ``RTX 4090`` = ``rtx-4090`` = ``rtx4090``."""
    return re.sub(r"[\s_\-]+", "", text.strip().lower())


def _index() -> dict[str, GpuPreset]:
    out: dict[str, GpuPreset] = {}
    for p in PRESETS:
        for n in (p.name, *p.aliases):
            out[_key(n)] = p
    return out


def names() -> list[str]:
    return [p.name for p in PRESETS]


def lookup(name: str) -> GpuPreset:
    """The preset called ``name`` (case-insensitive; ``rtx4090``, ``4090``, ``a100-80gb``, ``h100``...).

    Raises:
        InputError: an unknown name (the message lists the known ones).
    """
    found = _index().get(_key(name))
    if found is None:
        raise InputError(f"unknown --gpu {name!r}; known: {', '.join(names())} (memprof gpus lists them)")
    return found
