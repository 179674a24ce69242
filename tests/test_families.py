"""Model families beyond the text LMs: configs memprof completes or refuses, image-text
models, the model's own attention, and mamba's note.

Each config is built with transformers' own config class, tiny (2 layers, hidden 32),
and written to a config.json: the path users take.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import pytest

import memprof
from memprof.cli import main
from memprof.models import build_model, resolve
from tests.conftest import tiny

TEXT = dict(
    hidden_size=32,
    num_attention_heads=4,
    num_key_value_heads=2,
    num_hidden_layers=2,
    intermediate_size=64,
    vocab_size=128,
    max_position_embeddings=64,
)


def write(tmp_path: Path, name: str, config: Any, **drop_or_set: Any) -> str:
    """The config as config.json (``key=None`` drops a key), with its model_type."""
    d = config.to_dict()
    for k, v in drop_or_set.items():
        if v is None:
            d.pop(k, None)
        else:
            d[k] = v
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(d))
    return str(path)


def t5(tmp_path: Path) -> str:
    from transformers import T5Config

    cfg = T5Config(d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, vocab_size=128)
    cfg.architectures = ["T5ForConditionalGeneration"]
    return write(tmp_path, "t5", cfg, decoder_start_token_id=None)


def clip(tmp_path: Path) -> str:
    from transformers import CLIPConfig

    cfg = CLIPConfig(
        text_config=dict(TEXT, num_key_value_heads=None, max_position_embeddings=32, eos_token_id=2),
        vision_config=dict(
            hidden_size=32,
            num_attention_heads=4,
            num_hidden_layers=2,
            intermediate_size=64,
            image_size=32,
            patch_size=8,
        ),
        projection_dim=16,
    )
    cfg.architectures = ["CLIPModel"]
    return write(tmp_path, "clip", cfg)


def llava(tmp_path: Path) -> str:
    from transformers import LlavaConfig

    cfg = LlavaConfig(
        text_config=dict(TEXT, model_type="llama"),
        vision_config=dict(
            model_type="clip_vision_model",
            hidden_size=32,
            num_attention_heads=4,
            num_hidden_layers=2,
            intermediate_size=64,
            image_size=32,
            patch_size=8,
        ),
        image_token_id=127,
    )
    cfg.architectures = ["LlavaForConditionalGeneration"]
    return write(tmp_path, "llava", cfg)


def qwen2_vl(tmp_path: Path) -> str:
    from transformers import Qwen2VLConfig

    cfg = Qwen2VLConfig(
        text_config=dict(TEXT, rope_scaling={"type": "mrope", "mrope_section": [1, 1, 2]}),
        vision_config=dict(
            depth=2,
            embed_dim=32,
            hidden_size=32,
            num_heads=4,
            patch_size=4,
            spatial_merge_size=2,
            in_channels=3,
        ),
        image_token_id=124,
        video_token_id=125,
        vision_start_token_id=126,
        vision_end_token_id=127,
    )
    cfg.architectures = ["Qwen2VLForConditionalGeneration"]
    return write(tmp_path, "qwen2_vl", cfg)


def run(capsys: Any, *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


# ------------------------------------------------------------ config defaults
@pytest.mark.parametrize("engine", ["sim", "cpu"])
def test_t5_without_decoder_start_token_trains(tmp_path, engine):
    prof = memprof.analyze(t5(tmp_path), engine=engine, mode="train", batch_size=2, seq_len=16)
    assert prof.peak_bytes > 0
    assert any("decoder starts from the pad token (0)" in n for n in prof.notes)


def test_token_ids_outside_the_vocabulary_are_one_line_exit_2(tmp_path, capsys):
    from transformers import Phi3Config

    cfg = Phi3Config(**{k: v for k, v in TEXT.items() if k != "max_position_embeddings"})
    cfg.architectures = ["Phi3ForCausalLM"]
    path = write(tmp_path, "phi3", cfg, pad_token_id=None)  # Phi-3's default pad token is 32000
    code, out, err = run(capsys, "analyze", path, "--engine", "sim", "-b", "1", "-s", "8")
    assert code == 2
    assert err.strip().count("\n") == 0 and "pad_token_id 32000 is outside the vocabulary of 128" in err
    assert "phi3's default" in err
    assert "Traceback" not in err and "AssertionError" not in err


@pytest.mark.parametrize(
    "change,message",
    [
        (
            dict(hidden_size=30, num_attention_heads=4, num_key_value_heads=2),
            "not divisible by num_attention_heads",
        ),
        (dict(num_key_value_heads=3), "not a multiple of num_key_value_heads 3"),
        (dict(decoder_start_token_id=500), "decoder_start_token_id 500 is outside"),
    ],
)
def test_config_relations_are_checked_before_building(tmp_path, change, message):
    from transformers import Qwen2Config  # its config checks none of these itself

    data = Qwen2Config(**TEXT).to_dict() | change
    path = tmp_path / "config.json"
    path.write_text(json.dumps(data))
    with pytest.raises(memprof.errors.InputError, match=message):
        resolve(str(path))


def test_an_explicit_head_dim_lifts_the_divisibility_check(tmp_path):
    from transformers import Qwen3Config

    cfg = Qwen3Config(**(TEXT | dict(hidden_size=36, head_dim=8)))
    path = tmp_path / "config.json"
    path.write_text(json.dumps(cfg.to_dict()))
    assert resolve(str(path)).task == "causal-lm"


# ------------------------------------------------------------ image-text models
@pytest.mark.parametrize(
    "make,task",
    [(clip, "contrastive-image-text"), (llava, "image-text-to-text"), (qwen2_vl, "image-text-to-text")],
)
def test_image_text_models_train_in_sim_and_cpu_alike(tmp_path, make, task):
    spec = make(tmp_path)
    assert resolve(spec).task == task
    from memprof.engines import SimEngine

    kw: dict[str, Any] = dict(mode="train", batch_size=2, seq_len=32, attn="eager")
    # CUDA's 512-byte blocks weigh 5-10% on tensors this small: compared without them
    exact = SimEngine()
    exact.block_rounding = 1
    sim = memprof.analyze(spec, engine=exact, **kw)
    cpu = memprof.analyze(spec, engine="cpu", **kw)
    assert sim.workload["task"] == task
    assert cpu.peak_bytes == pytest.approx(sim.peak_bytes, rel=0.03)
    if task == "image-text-to-text":
        assert any(n.startswith("inputs: one ") and "image tokens" in n for n in sim.notes)


def test_image_text_inputs_hold_the_image_tokens_the_model_expects(tmp_path):
    for make, tokens in ((llava, 16), (qwen2_vl, 16)):
        rm = resolve(make(tmp_path))
        model, builder = build_model(rm, attn="eager")
        inputs = builder.build(2, 24, "cpu")
        image_id = rm.config.image_token_id
        assert ((inputs["input_ids"] == image_id).sum(dim=1) == tokens).all()
        assert (inputs["labels"][inputs["input_ids"] == image_id] == -100).all()
        model(**inputs).loss.backward()  # transformers' own token count check passes


def test_qwen2_vl_positions_are_transformers_own(tmp_path):
    import torch

    rm = resolve(qwen2_vl(tmp_path))
    model, builder = build_model(rm, attn="eager")
    inputs = builder.build(2, 24, "cpu", with_labels=False)
    types = (inputs["input_ids"] == rm.config.image_token_id).int()
    ref, _ = model.model.get_rope_index(inputs["input_ids"], types, inputs["image_grid_thw"])
    assert torch.equal(ref, inputs["position_ids"])


def test_a_sequence_too_short_for_the_image_is_refused(tmp_path, capsys):
    code, _, err = run(capsys, "analyze", llava(tmp_path), "--engine", "sim", "-b", "1", "-s", "16")
    assert code == 2 and "cannot hold" in err and "16 image tokens" in err and "--seq-len 17" in err


# ------------------------------------------------------------ the model's own attention
def gemma2(tmp_path: Path) -> str:
    from transformers import Gemma2Config

    cfg = Gemma2Config(**(TEXT | dict(head_dim=8, sliding_window=16)))
    cfg.architectures = ["Gemma2ForCausalLM"]
    return write(tmp_path, "gemma2", cfg)


def test_attn_defaults_to_the_models_own(tmp_path, capsys):
    code, out, err = run(
        capsys, "analyze", gemma2(tmp_path), "--engine", "sim", "-b", "1", "-s", "16", "--json", "-"
    )
    assert code == 0, err
    prof = json.loads(out)
    assert prof["workload"]["attn"] == "eager"
    assert any("eager, the model's default (Gemma2ForCausalLM has no sdpa" in n for n in prof["notes"])
    code, out, err = run(
        capsys, "analyze", tiny("llama"), "--engine", "sim", "-b", "1", "-s", "16", "--json", "-"
    )
    assert code == 0, err
    prof = json.loads(out)
    assert prof["workload"]["attn"] == "sdpa"
    assert not any(n.startswith("attention:") for n in prof["notes"])


def test_the_step_line_says_when_attention_is_the_models_default(tmp_path, capsys):
    code, out, err = run(
        capsys, "analyze", gemma2(tmp_path), "--engine", "sim", "-b", "1", "-s", "16", "--top", "0"
    )
    assert code == 0, err
    assert "attn eager (the model's" in out


def test_explicit_sdpa_on_a_model_without_it_is_exit_2(tmp_path, capsys):
    code, _, err = run(
        capsys, "analyze", gemma2(tmp_path), "--engine", "sim", "-b", "1", "-s", "16", "--attn", "sdpa"
    )
    assert code == 2
    assert (
        err.strip().count("\n") == 0 and "--attn sdpa is not supported" in err and "Gemma2ForCausalLM" in err
    )


def test_library_workloads_resolve_auto_too(tmp_path):
    from memprof.api import prepare
    from memprof.engines import SimEngine
    from memprof.workload import Workload

    wl = Workload(batch_size=1, seq_len=16)
    assert wl.attn == "auto"
    rm, eng = prepare(gemma2(tmp_path), wl, SimEngine())
    assert wl.for_model(rm).attn == "eager"
    assert eng.run(rm, wl).workload["attn"] == "eager"  # the engine resolves what callers did not


def test_the_attention_optimization_sees_the_resolved_implementation(tmp_path):
    from memprof import optimizations
    from memprof.api import fake_model, prepare
    from memprof.engines import SimEngine
    from memprof.workload import StepSetup, Workload

    rm, _ = prepare(gemma2(tmp_path), Workload(), SimEngine())
    wl = Workload().for_model(rm)
    why = optimizations.make("attention").why_not(fake_model(rm, wl), StepSetup.of(wl))
    assert why == "Gemma2ForCausalLM does not support sdpa attention"


# ------------------------------------------------------------ decoding, mamba
def test_decoding_uses_the_cache_keyword_without_deprecation_warnings():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        prof = memprof.analyze(
            tiny("llama"), engine="cpu", mode="infer", batch_size=1, seq_len=16, decode_tokens=2
        )
    assert prof.peak_bytes > 0
    assert not [w for w in caught if "past_key_values" in str(w.message)]


def test_mamba_in_sim_says_which_path_is_projected(tmp_path):
    from transformers import MambaConfig

    cfg = MambaConfig(hidden_size=32, num_hidden_layers=2, vocab_size=128, state_size=4)
    cfg.architectures = ["MambaForCausalLM"]
    prof = memprof.analyze(write(tmp_path, "mamba", cfg), engine="sim", batch_size=1, seq_len=16)
    assert prof.workload["attn"] == "eager"
    assert any(n.startswith("mamba layers: projected on transformers' slow path") for n in prof.notes)
