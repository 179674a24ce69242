"""Resolving MODEL specs, building inputs per task, and the errors on bad specs."""

from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from memprof.errors import EnvironmentProblem, InputError
from memprof.model_config import check_spec, spec_kind
from memprof.models import TASKS, build_model, bundled_models, resolve
from tests.conftest import tiny


@pytest.mark.parametrize(
    "name,task",
    [
        ("gpt2", "causal-lm"),
        ("llama", "causal-lm"),
        ("bert", "masked-lm"),
        ("bert-cls", "seq-classification"),
        ("t5", "seq2seq-lm"),
        ("vit", "image-classification"),
        ("whisper", "speech-seq2seq"),
    ],
)
def test_task_from_architectures(name, task):
    rm = resolve(tiny(name))
    assert rm.task == task
    assert rm.source == "config"


def test_task_override_and_unknown_task():
    assert resolve(tiny("bert"), task="feature-extraction").task == "feature-extraction"
    with pytest.raises(InputError, match="unknown task"):
        resolve(tiny("bert"), task="dancing")


def test_head_the_model_type_lacks_is_named():
    with pytest.raises(InputError, match="has no image-classification head"):
        resolve(tiny("gpt2"), task="image-classification")


def test_bundled_names_resolve():
    names = bundled_models()
    assert {"gpt2", "llama-3-8b", "mistral-7b", "t5-small", "vit-base", "bert-base"} <= set(names)
    for n in names:
        rm = resolve(n)
        assert rm.source == "bundled" and rm.task in TASKS


def test_directory_with_and_without_weights(tmp_path, minilm_dir):
    rm = resolve(str(minilm_dir))
    assert rm.source == "directory" and rm.weight_format == "safetensors" and rm.task == "feature-extraction"
    d = tmp_path / "cfg-only"
    d.mkdir()
    (d / "config.json").write_text(Path(tiny("llama")).read_text())
    rm2 = resolve(str(d))
    assert rm2.weight_format is None and rm2.name == "cfg-only"


def test_errors_for_bad_paths_and_configs(tmp_path):
    with pytest.raises(InputError, match="no such file"):
        resolve(str(tmp_path / "missing"))
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(InputError, match="not valid JSON"):
        resolve(str(bad))
    unk = tmp_path / "unknown.json"
    unk.write_text(json.dumps({"model_type": "no-such-arch"}))
    with pytest.raises(InputError, match="unknown model_type 'no-such-arch'"):
        resolve(str(unk))
    empty_dir = tmp_path / "empty"
    empty_dir.mkdir()
    with pytest.raises(InputError, match="no config.json"):
        resolve(str(empty_dir))
    txt = tmp_path / "weights.txt"
    txt.write_text("x")
    with pytest.raises(InputError, match="expected a model directory or a config.json"):
        resolve(str(txt))


def test_spec_kind_names_what_a_spec_points_to(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    config = tmp_path / "model.json"
    config.write_text(Path(tiny("llama")).read_text())
    assert spec_kind(str(folder)) == "directory"  # its config.json is check_spec's to look for
    assert spec_kind(str(config)) == "config"
    assert spec_kind("mypackage.models:build") == "factory"  # not imported here
    assert spec_kind("gpt2") == "bundled"
    assert spec_kind("some-org/some-model") == "hub"  # not looked up
    for spec in ("no-such-model", "./no/such/dir", "no-such.json", "no:such:thing"):
        with pytest.raises(InputError, match="no such file or directory"):
            spec_kind(spec)
    with pytest.raises(InputError, match="no config.json"):
        check_spec(str(folder))
    assert check_spec(str(config)) == "config"


@pytest.mark.parametrize(
    "data",
    [
        "{not json",
        "[1]",
        json.dumps({"n_layer": 2}),
        json.dumps({"model_type": 3}),
        json.dumps({"model_type": "llama", "auto_map": {"AutoConfig": "x.Y"}}),
    ],
)
def test_check_spec_refuses_what_resolve_refuses_with_its_message(tmp_path, data):
    path = tmp_path / "config.json"
    path.write_text(data)
    for spec in (str(path), str(tmp_path)):
        with pytest.raises(InputError) as before_torch:
            check_spec(spec)
        with pytest.raises(InputError) as resolved:
            resolve(spec)
        assert str(before_torch.value) == str(resolved.value)


def test_remote_code_needs_consent(tmp_path):
    d = tmp_path / "remote"
    d.mkdir()
    cfg = json.loads(Path(tiny("llama")).read_text()) | {"auto_map": {"AutoConfig": "x.Y"}}
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(InputError, match="--trust-remote-code"):
        resolve(str(d))


def test_pickle_checkpoint_refused_without_flag(tmp_path):
    d = tmp_path / "pickled"
    d.mkdir()
    (d / "config.json").write_text(Path(tiny("llama")).read_text())
    (d / "pytorch_model.bin").write_bytes(b"not really a pickle")
    rm = resolve(str(d))
    assert rm.weight_format == "pickle"
    with pytest.raises(InputError, match="--allow-pickle"):
        build_model(rm, load_weights=True)


def _fake_hub_cache(root: Path, repo: str, config: dict) -> None:
    folder = root / "hub" / ("models--" + repo.replace("/", "--"))
    snap = folder / "snapshots" / "0123456789abcdef0123456789abcdef01234567"
    snap.mkdir(parents=True)
    (snap / "config.json").write_text(json.dumps(config))
    (folder / "refs").mkdir()
    (folder / "refs" / "main").write_text("0123456789abcdef0123456789abcdef01234567")


def test_hub_id_from_local_cache(tmp_path, monkeypatch):
    _fake_hub_cache(tmp_path, "acme/tiny-llama", json.loads(Path(tiny("llama")).read_text()))
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    rm = resolve("acme/tiny-llama")
    assert rm.source == "hub" and rm.task == "causal-lm" and rm.name == "acme/tiny-llama"
    with pytest.raises(EnvironmentProblem, match="HF_HUB_OFFLINE=1"):
        resolve("acme/not-cached")


def test_factory_spec(tmp_path, monkeypatch):
    pkg = tmp_path / "toyfactory.py"
    pkg.write_text(
        textwrap.dedent(
            """
            import torch

            def make():
                model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
                def inputs(batch_size, seq_len):
                    return (torch.randn(batch_size, 16),)
                return model, inputs

            def no_builder():
                return torch.nn.Linear(2, 2)

            NOT_CALLABLE = 3
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    rm = resolve("toyfactory:make")
    model, builder = build_model(rm)
    inputs = builder.build(3, 1, "cpu")
    assert isinstance(model, torch.nn.Module) and inputs["__args__"][0].shape == (3, 16)
    with pytest.raises(InputError, match="no input builder"):
        build_model(resolve("toyfactory:no_builder"))
    with pytest.raises(InputError, match="no callable"):
        resolve("toyfactory:NOT_CALLABLE")
    with pytest.raises(InputError, match="cannot import"):
        resolve("no_such_module_xyz:make")
    sys.modules.pop("toyfactory", None)


@pytest.mark.parametrize("name", ["gpt2", "llama", "bert", "bert-cls", "t5", "vit", "whisper"])
def test_inputs_run_through_the_model(name):
    rm = resolve(tiny(name))
    model, builder = build_model(rm, attn="eager")
    inputs = builder.build(2, 8, "cpu")
    out = model(**inputs)
    loss = builder.loss(out)
    assert loss.dim() == 0 and torch.isfinite(loss)


def test_shape_validation():
    rm = resolve(tiny("gpt2"))
    _, builder = build_model(rm)
    with pytest.raises(InputError, match="position limit of 128"):
        builder.validate(1, 129)
    with pytest.raises(InputError, match="at least 1"):
        builder.validate(0, 8)
    with pytest.raises(InputError, match="at least 1"):
        builder.validate(1, 0)
