"""Config values a model cannot be built or run with: refused as the config is read, exit 2.

transformers takes each of these into its config and fails later, as the model is
built (an activation or RoPE type it has no function for) or inside the step (a
dropout probability past 1, a convolution wider than its input, a window of no
positions). Each was an internal error (exit 70) before it was checked here; the
last tests check that the checks refuse nothing transformers' own defaults have.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from memprof.errors import InputError
from memprof.model_config import config_from_dict
from tests.conftest import tiny
from tests.hostile.test_inputs import TRAIN, refused


def family(tmp_path: Path, name: str, **changes: Any) -> str:
    """The tiny ``name`` config with ``changes``, as a file."""
    data = json.loads(Path(tiny(name)).read_text())
    path = tmp_path / f"{name}-bad.json"
    path.write_text(json.dumps({**data, **changes}))
    return str(path)


@pytest.mark.parametrize(
    ("name", "changes", "says"),
    [
        ("llama", {"hidden_act": "frob"}, "hidden_act 'frob' is not an activation transformers has"),
        ("gpt2", {"activation_function": "frob"}, "activation_function 'frob' is not an activation"),
        (
            "llama",
            {"rope_scaling": {"rope_type": "frob", "factor": 2.0}},
            "rope_type 'frob' is not one transformers has for it",
        ),
        ("llama", {"rope_theta": "big"}, "rope_theta must be a number (or a list of numbers), got 'big'"),
        ("llama", {"rope_theta": -1.0}, "rope_theta must be positive, got -1.0"),
        (
            "llama",
            {"attention_dropout": 2.0},
            "attention_dropout is a dropout probability: a number from 0 to 1, got 2.0",
        ),
        ("gpt2", {"resid_pdrop": "0.1"}, "resid_pdrop is a dropout probability"),
        ("mistral", {"sliding_window": 0}, "sliding_window must be at least 1, got 0 (or null: no window)"),
        ("vit", {"patch_size": 64}, "patch_size 64 is larger than image_size 32"),
        ("vit", {"patch_size": 0}, "patch_size must be at least 1, got 0"),
        ("vit", {"num_channels": 0}, "num_channels must be at least 1, got 0"),
        ("vit", {"num_labels": 0}, "num_labels must be at least 1, got 0"),
        ("bert-cls", {"num_labels": -3}, "num_labels must be at least 1, got -3"),
        ("bert-cls", {"num_labels": 10**9}, "num_labels 1e+09 is more than memprof builds (1000000"),
        ("t5", {"relative_attention_num_buckets": 0}, "relative_attention_num_buckets must be at least 1"),
        ("whisper", {"num_mel_bins": 0}, "num_mel_bins must be at least 1, got 0"),
        ("llama", {"hidden_size": 10**400}, "has at least about 2^"),
    ],
)
def test_a_value_the_model_cannot_take_is_refused_as_the_config_is_read(
    tmp_path, capsys, name, changes, says
):
    line = refused(capsys, "analyze", family(tmp_path, name, **changes), *TRAIN)
    assert says in line, line


def test_a_number_past_the_digits_python_reads_is_refused(tmp_path, capsys):
    path = tmp_path / "config.json"
    path.write_text(
        Path(tiny("llama")).read_text().replace('"hidden_size": 64', '"hidden_size": ' + "9" * 5000)
    )
    assert '"hidden_size": 999' in path.read_text()
    assert "4300 digits" in refused(capsys, "analyze", str(path), *TRAIN)


def test_a_tower_config_is_checked_too():
    data = {"model_type": "llava", "vision_config": {"model_type": "clip_vision_model", "hidden_act": "frob"}}
    with pytest.raises(InputError, match="vision_config hidden_act 'frob'"):
        config_from_dict(data, "x.json")


def test_yaml_nested_past_the_bound_is_refused_before_it_is_composed(tmp_path, capsys):
    recipe = tmp_path / "nested.yaml"
    recipe.write_text("optimizations: " + "[" * 5000 + "]" * 5000 + "\n")
    line = refused(capsys, "recipes", "validate", str(recipe))
    assert "nested more than 32 deep" in line


# ------------------------------------------------------- nothing valid is refused
@pytest.mark.parametrize(
    "model_type", ["gemma3_text", "qwen2_moe", "sam2_video", "qwen2_vl", "whisper", "t5", "vit", "mistral"]
)
def test_transformers_defaults_pass_the_checks(model_type):
    """Per-layer-type RoPE (Gemma 3), a model's own RoPE type (SAM2's axial), a window of 0
    with use_sliding_window false (Qwen2-MoE's default): what transformers ships is accepted."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    data = CONFIG_MAPPING[model_type]().to_dict()
    config_from_dict(data, f"{model_type}.json")


@pytest.mark.parametrize(
    "rope",
    [
        {"type": "mrope", "mrope_section": [2, 1, 1]},  # Qwen2-VL's published config.json
        {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
        {"rope_type": "longrope", "short_factor": [1.0] * 4, "long_factor": [2.0] * 4},
    ],
)
def test_published_rope_parameters_pass(rope):
    data = {"model_type": "qwen2_vl" if rope.get("type") == "mrope" else "llama", "rope_scaling": rope}
    config_from_dict(data, "x.json")
