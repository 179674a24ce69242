"""Synthetic inputs for a model's task, and the loss of a training step.

:func:`memprof.models.build_model` returns an :class:`InputBuilder` with the model;
the step runner builds each step's inputs with it (on whichever device or tensor
mode the engine has set up) and calls the model with :func:`call_model`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from memprof.errors import InputError

if TYPE_CHECKING:
    from memprof.models import ResolvedModel

#: the tasks whose inputs pair images with text
IMAGE_TEXT_TASKS = ("contrastive-image-text", "image-text-to-text")


class InputBuilder:
    """Synthetic inputs for a model's task, and the loss of a training step."""

    def __init__(
        self, rm: ResolvedModel, custom: Callable[..., Any] | None = None, dtype: torch.dtype = torch.float32
    ):
        self.rm = rm
        self.custom = custom
        self.dtype = dtype

    def validate(self, batch_size: int, seq_len: int) -> None:
        """Raise InputError on shapes the model cannot take."""
        if batch_size < 1:
            raise InputError(f"--batch-size must be at least 1, got {batch_size}")
        if seq_len < 1:
            raise InputError(f"--seq-len must be at least 1, got {seq_len}")
        limit = self.rm.position_limit()
        if limit is not None and seq_len > limit and self.rm.task != "image-classification":
            raise InputError(
                f"--seq-len {seq_len} is past {self.rm.name}'s position limit of {limit}; use --seq-len {limit} or less"
            )
        if self.custom is None and self.rm.task == "image-text-to-text":
            self.image_plan(seq_len)

    def _custom_inputs(self, builder: Callable[..., Any], batch_size: int, seq_len: int) -> Any:
        """What a factory's input builder returns, checked: a dict of tensors, a tensor, or a tuple of them.

        Raises:
            InputError: the builder raised, or returned something else.
        """
        spec = self.rm.spec
        try:
            raw = builder(batch_size, seq_len)
        except Exception as e:  # the user's code: its failure is the input's
            if not users_failure(e):
                raise
            first = (str(e).strip().splitlines() or [""])[0][:200]
            raise InputError(
                f"{spec}: the input builder raised {type(e).__name__}" + (f": {first}" if first else "")
            ) from None
        values = (
            list(raw.values())
            if isinstance(raw, Mapping)
            else raw
            if isinstance(raw, (tuple, list))
            else [raw]
        )
        if isinstance(raw, Mapping) and not all(isinstance(k, str) for k in raw):
            ok = False
        else:
            ok = bool(values) and any(isinstance(v, torch.Tensor) for v in values)
        if not ok:
            raise InputError(
                f"{spec}: the input builder must return a dict of tensors (keyword inputs), a tensor or a "
                f"tuple of tensors; builder({batch_size}, {seq_len}) returned {type(raw).__name__}"
            )
        return raw

    def image_plan(self, seq_len: int) -> ImagePlan:
        """The image each sequence of an image-text-to-text step holds, and its tokens.

        Raises:
            InputError: a model whose image inputs memprof does not know, or a
                sequence too short for one image's tokens.
        """
        return image_plan(self.rm, seq_len)

    def build(
        self, batch_size: int, seq_len: int, device: torch.device | str, *, with_labels: bool = True
    ) -> dict[str, Any]:
        """The keyword inputs of one step, on ``device`` (call inside the engine's tensor mode)."""
        if self.custom is not None:
            return _to_device(self._custom_inputs(self.custom, batch_size, seq_len), device, self.dtype)
        c = self.rm.config
        task = self.rm.task
        g = torch.Generator().manual_seed(0)
        B, L = batch_size, seq_len
        vocab = int(getattr(c, "vocab_size", 1000) or 1000)

        def ids(b: int, n: int) -> torch.Tensor:
            return torch.randint(0, vocab, (b, n), generator=g, device="cpu").to(device)

        inputs: dict[str, Any]
        if task in IMAGE_TEXT_TASKS or (task == "feature-extraction" and _image_text_pair(c)):
            return self._image_text(B, L, device, with_labels, g)
        if task == "image-classification":
            size = getattr(c, "image_size", 224)
            size = size if isinstance(size, int) else size[0]
            ch = getattr(c, "num_channels", 3)
            inputs = {
                "pixel_values": torch.randn(B, ch, size, size, generator=g, device="cpu").to(
                    device=device, dtype=self.dtype
                )
            }
            if with_labels:
                inputs["labels"] = torch.randint(
                    0, max(1, getattr(c, "num_labels", 2)), (B,), generator=g, device="cpu"
                ).to(device)
            return inputs
        if task == "speech-seq2seq":
            frames = 2 * int(getattr(c, "max_source_positions", 1500))
            mels = int(getattr(c, "num_mel_bins", 80))
            inputs = {
                "input_features": torch.randn(B, mels, frames, generator=g, device="cpu").to(
                    device=device, dtype=self.dtype
                )
            }
            if with_labels:
                inputs["labels"] = ids(B, L)
            else:
                inputs["decoder_input_ids"] = ids(B, L)
            return inputs
        # No attention_mask: synthetic batches have no padding, and transformers
        # drops an all-ones mask itself on real tensors (it cannot tell under
        # fake tensors, and a mask would change CUDA's SDPA kernel choice).
        inputs = {"input_ids": ids(B, L)}
        if task in ("causal-lm", "masked-lm", "seq2seq-lm") and with_labels:
            inputs["labels"] = inputs["input_ids"].clone()
        elif task == "seq-classification" and with_labels:
            inputs["labels"] = torch.randint(
                0, max(1, getattr(c, "num_labels", 2)), (B,), generator=g, device="cpu"
            ).to(device)
        elif task == "seq2seq-lm" and not with_labels:
            inputs["decoder_input_ids"] = ids(B, L)
        return inputs

    def _image_text(
        self, B: int, L: int, device: torch.device | str, with_labels: bool, g: torch.Generator
    ) -> dict[str, Any]:
        c = self.rm.config
        text = getattr(c, "text_config", None) or c
        vocab = int(getattr(text, "vocab_size", 1000) or 1000)
        if self.rm.task != "image-text-to-text":
            # a pair of towers (CLIP): a batch of images and one caption each
            vc = c.vision_config
            size = _side(getattr(vc, "image_size", 224))
            ch = int(getattr(vc, "num_channels", 3))
            inputs: dict[str, Any] = {
                "input_ids": torch.randint(0, vocab, (B, L), generator=g, device="cpu").to(device),
                "pixel_values": torch.randn(B, ch, size, size, generator=g, device="cpu").to(
                    device=device, dtype=self.dtype
                ),
            }
            if with_labels and self.rm.task == "contrastive-image-text":
                inputs["return_loss"] = True  # the contrastive loss over the batch's pairs
            return inputs
        plan = self.image_plan(L)
        if plan.note not in self.rm.notes:
            self.rm.notes.append(plan.note)
        # text tokens never collide with the special ones: the model counts its image tokens
        specials = sorted(plan.special_ids)
        ids = torch.randint(0, vocab - len(specials), (B, L), generator=g, device="cpu")
        for sid in specials:
            ids = ids + (ids >= sid).long()
        ids = ids.to(device)
        start = 0
        if plan.start_id is not None:
            ids[:, 0] = plan.start_id
            start = 1
        ids[:, start : start + plan.tokens] = plan.image_id
        if plan.end_id is not None:
            ids[:, start + plan.tokens] = plan.end_id
        vision_end = start + plan.tokens + (plan.end_id is not None)
        inputs = {"input_ids": ids}
        if plan.kind == "grid":
            t, h, w = plan.grid
            inputs["pixel_values"] = torch.randn(
                B * t * h * w, plan.patch_values, generator=g, device="cpu"
            ).to(device=device, dtype=self.dtype)
            # A Python list: under fake tensors its values stay known (the vision tower reads them)
            inputs["image_grid_thw"] = torch.tensor([[t, h, w]] * B, device=device)
            inputs["position_ids"] = _mrope_positions(plan, B, L, device)
        else:
            inputs["pixel_values"] = torch.randn(
                B, plan.channels, plan.side, plan.side, generator=g, device="cpu"
            ).to(device=device, dtype=self.dtype)
        if with_labels:
            labels = ids.clone()
            labels[:, :vision_end] = -100  # as processors do: no loss on the image's tokens
            inputs["labels"] = labels
        return inputs

    @staticmethod
    def loss(output: Any) -> torch.Tensor:
        """The scalar a training step differentiates.

        The model's own loss when it returns one (labels were passed); else the
        output itself when scalar; else the mean square of the first output, a
        stand-in loss for headless models that keeps every activation in the graph.
        """
        loss = getattr(output, "loss", None)
        if isinstance(loss, torch.Tensor):
            return loss
        if isinstance(output, torch.Tensor):
            return output if output.dim() == 0 else output.float().pow(2).mean()
        if isinstance(output, Mapping):
            first = next(iter(output.values()))
        elif isinstance(output, (tuple, list)):
            first = output[0]
        else:
            first = output
        if not isinstance(first, torch.Tensor):
            raise InputError("the model output has no tensor to derive a training loss from")
        return first.float().pow(2).mean()


# --------------------------------------------------------------- image-text inputs
#: image-text-to-text models whose vision tower takes flattened patches and a (t, h, w) grid
_GRID_VL_TYPES = {"qwen2_vl", "qwen2_5_vl"}
#: models whose every image becomes a fixed number of tokens, with how to count them
_FIXED_VL_TYPES = {"llava", "gemma3", "paligemma"}
#: the image side (pixels) of a grid model's synthetic image, as a processor would resize to
_GRID_IMAGE_SIDE = 448


@dataclass
class ImagePlan:
    """One synthetic image per sequence: its pixels and the tokens it takes in ``input_ids``."""

    kind: str  # "grid" (Qwen2-VL) | "fixed" (LLaVA)
    tokens: int  # image tokens in each sequence
    image_id: int
    start_id: int | None = None  # a token before the image's (Qwen2-VL's vision_start)
    end_id: int | None = None
    side: int = 0  # fixed: the image's side in pixels
    channels: int = 3
    grid: tuple[int, int, int] = (1, 1, 1)  # grid: (t, h, w) patches
    patch_values: int = 0  # grid: the values of one flattened patch
    merge: int = 1  # grid: patches merged per side into one token
    note: str = ""

    @property
    def special_ids(self) -> set[int]:
        return {i for i in (self.image_id, self.start_id, self.end_id) if i is not None}


def _side(size: Any) -> int:
    return int(size if isinstance(size, int) else size[0])


def _image_text_pair(config: Any) -> bool:
    return (
        getattr(config, "text_config", None) is not None
        and getattr(config, "vision_config", None) is not None
    )


def image_plan(rm: ResolvedModel, seq_len: int) -> ImagePlan:
    """The synthetic image of an image-text-to-text model (see :meth:`InputBuilder.image_plan`)."""
    c = rm.config
    mt = rm.model_type
    vc = getattr(c, "vision_config", None)
    image_id = getattr(c, "image_token_id", None)
    if vc is None or not isinstance(image_id, int) or mt not in _GRID_VL_TYPES | _FIXED_VL_TYPES:
        raise InputError(
            f"{rm.spec}: memprof does not build image inputs for {mt!r} yet "
            "(it knows LLaVA, Gemma 3, PaliGemma, Qwen2-VL and Qwen2.5-VL); "
            "profile it with a module:factory spec that builds its inputs"
        )
    if mt in _GRID_VL_TYPES:
        patch, merge = int(vc.patch_size), int(vc.spatial_merge_size)
        tp = int(getattr(vc, "temporal_patch_size", 1))
        ch = int(getattr(vc, "in_channels", getattr(vc, "num_channels", 3)))
        room = seq_len - 2  # vision_start, the image's tokens, vision_end
        side = max(merge, _GRID_IMAGE_SIDE // patch // merge * merge)  # patches per side
        if (side // merge) ** 2 > room:
            side = int(room**0.5) * merge
        if side < merge:
            raise InputError(
                f"--seq-len {seq_len} leaves no room for an image ({mt} needs 2 tokens around at least one image token)"
            )
        tokens = (side // merge) ** 2
        return ImagePlan(
            "grid",
            tokens,
            image_id,
            start_id=getattr(c, "vision_start_token_id", None),
            end_id=getattr(c, "vision_end_token_id", None),
            grid=(1, side, side),
            patch_values=ch * tp * patch * patch,
            merge=merge,
            note=f"inputs: one {side * patch}x{side * patch} image per sequence ({side}x{side} patches "
            f"of {patch} px, {tokens} image tokens) and {seq_len - tokens - 2} text tokens",
        )
    side = _side(vc.image_size)
    patch = _side(getattr(vc, "patch_size", 1))
    given = getattr(c, "mm_tokens_per_image", None) or getattr(vc, "num_image_tokens", None)
    if isinstance(given, int):
        tokens = given
    else:
        tokens = (side // patch) ** 2
        if getattr(c, "vision_feature_select_strategy", "default") == "full":
            tokens += 1  # the CLS token's feature too
    if tokens >= seq_len:
        raise InputError(
            f"--seq-len {seq_len} cannot hold {rm.name}'s {tokens} image tokens and a text token; "
            f"use --seq-len {tokens + 1} or more"
        )
    return ImagePlan(
        "fixed",
        tokens,
        image_id,
        side=side,
        channels=int(getattr(vc, "num_channels", 3)),
        note=f"inputs: one {side}x{side} image per sequence ({tokens} image tokens) "
        f"and {seq_len - tokens} text tokens",
    )


def _mrope_positions(plan: ImagePlan, B: int, L: int, device: torch.device | str) -> torch.Tensor:
    """Qwen2-VL's 3-D (time, height, width) positions of ``[start][image][end][text]``.

    What ``get_rope_index`` computes from ``input_ids``, built from the layout so
    that it runs under fake tensors (whose values are unknown) too.
    """
    _, h, w = plan.grid
    hh, ww = h // plan.merge, w // plan.merge
    first = torch.zeros(3, 1, dtype=torch.long)  # vision_start
    image = torch.stack(
        [
            torch.zeros(plan.tokens, dtype=torch.long),
            torch.arange(hh).repeat_interleave(ww),
            torch.arange(ww).repeat(hh),
        ]
    )
    text = torch.arange(L - 1 - plan.tokens).expand(3, -1) + (1 + max(hh, ww))
    pos = torch.cat([first, image + 1, text], dim=1)
    return pos.unsqueeze(1).expand(3, B, L).to(device)


def users_failure(e: Exception) -> bool:
    """True for an exception of the user's code (a factory, an input builder), False for memprof's or torch's own.

    Fake tensors' limits (torch's exception types) are the engine's to explain, and
    memprof's typed errors already say what is wrong.
    """
    module = type(e).__module__ or ""
    return not module.startswith(("torch", "memprof"))


def _to_device(raw: Any, device: torch.device | str, dtype: torch.dtype) -> dict[str, Any]:
    def move(t: Any) -> Any:
        if isinstance(t, torch.Tensor):
            t = t.to(device)
            return t.to(dtype) if t.is_floating_point() and dtype != torch.float32 else t
        return t

    if isinstance(raw, Mapping):
        return {k: move(v) for k, v in raw.items()}
    if isinstance(raw, (tuple, list)):
        return {"__args__": [move(v) for v in raw]}
    return {"__args__": [move(raw)]}


def call_model(model: torch.nn.Module, inputs: dict[str, Any]) -> Any:
    """Call the model with inputs from :class:`InputBuilder` (keywords or positional)."""
    if "__args__" in inputs:
        return model(*inputs["__args__"])
    return model(**inputs)
