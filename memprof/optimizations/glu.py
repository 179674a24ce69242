"""Gated feed-forward (GeGLU / SwiGLU) in place of a plain GELU MLP, for models built from a config."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from memprof.choices import GLU_ACTIVATIONS
from memprof.optimizations.registry import Optimization, option, register
from memprof.workload import StepSetup

if TYPE_CHECKING:
    import torch


@register
class Glu(Optimization):
    """Replace each block's plain MLP with a gated one, ``down(act(gate(x)) * up(x))``, at equal parameters.

    The gated hidden size is 2/3 of the plain one (three matrices instead of
    two), so parameters and matmul FLOPs stay equal. With the same fused
    activation kernel its backward keeps more: the gate's output (the
    activation's input), the activation's output and the up projection's output
    (both saved by the product) and the product (the down projection's input):
    four tensors of 2/3 size against the plain MLP's two (the GELU's input and
    output), about 4/3 of the MLP's saved activations. An activation written as
    a chain of Python ops (GPT-2's ``gelu_new``) saves several tensors of its
    own, and then the smaller gated hidden size wins: ``activation: model``
    (the default) keeps the MLP's own activation so only the gating differs.
    memprof measures it either way.

    It is a different function with new random weights: an architecture choice
    when training from a config, never a conversion of trained weights (it
    refuses a step that runs on pretrained weights), and ``memprof apply``
    refuses it (the stock class cannot reload a gated MLP into a GPT-2 or BERT).
    """

    name = "glu"
    summary = (
        "gated MLP (GeGLU/SwiGLU) at equal parameters and FLOPs, models from a config: "
        "4/3 of the MLP activations with a fused activation, measured"
    )
    modes = ("train", "infer")
    rewrites_model = True

    @dataclass
    class Config:
        activation: str = option(
            "model",
            "the gate's activation: model (the MLP's own, so only the gating differs), gelu (torch's "
            "fused GELU: GeGLU), silu (SwiGLU)",
            choices=GLU_ACTIVATIONS,
        )

    def why_not(self, model: Any, setup: StepSetup) -> str | None:
        from memprof.surgery.glu import glu_layout

        if setup.pretrained:
            return (
                "the model runs on pretrained weights: a gated MLP replaces them with new random ones "
                "(glu is an architecture choice for training from a config; the sim engine never loads weights)"
            )
        if setup.has_step(self.name):
            return "the MLP is already gated by an earlier step"
        if model is not None:
            return glu_layout(model)
        return None

    def apply(self, setup: StepSetup) -> None:
        pass  # the model changes in transform_model

    def transform_model(self, model: torch.nn.Module, setup: StepSetup) -> str | None:
        from memprof.surgery.glu import gated_mlp

        return gated_mlp(model, self.config.activation)

    def checkpoint_problem(self) -> str | None:
        # The gated MLP is a different function with new random weights; the stock
        # architecture class would rebuild a plain MLP from config.json, so no file
        # memprof could write reloads as the model that was measured.
        return (
            "glu replaces the MLP with a gated one that the model's stock transformers class cannot "
            "build from config.json: a written checkpoint would not reload as the measured model "
            "(measure it with memprof compare; build the gated model in your own code)"
        )
