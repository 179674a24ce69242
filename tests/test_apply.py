"""memprof apply: an atomic, loadable optimized checkpoint; the source untouched."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForMaskedLM

from memprof import apply as apply_mod
from memprof import recipes
from memprof.cli import main
from memprof.workload import Workload
from tests.conftest import tiny


def digest(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def save_tiny(name: str, folder: Path, auto: type = AutoModelForCausalLM) -> Path:
    """A tiny model (a causal LM unless ``auto`` says otherwise) saved with random weights."""
    torch.manual_seed(0)
    auto.from_config(AutoConfig.from_pretrained(tiny(name))).save_pretrained(folder)
    return folder


def apply_infer(src: Path, steps: list[str], out: Path, **kw):
    """``memprof apply`` of ``steps`` for a small inference step on the cpu engine."""
    return apply_mod.apply(
        str(src),
        recipes.from_names(steps),
        out,
        Workload(mode="infer", batch_size=2, seq_len=32),
        engine="cpu",
        **kw,
    )


@pytest.fixture(scope="module")
def tiny_lm_dir(tmp_path_factory) -> Path:
    return save_tiny("llama", tmp_path_factory.mktemp("src") / "tiny-llama")


def test_apply_tiny_lm_reloads_with_the_same_outputs(tiny_lm_dir, tmp_path):
    before = digest(tiny_lm_dir)
    out = tmp_path / "opt"
    r = recipes.from_names(["attention:implementation=eager", "checkpointing", "grad_accumulation:steps=2"])
    res = apply_mod.apply(str(tiny_lm_dir), r, out, Workload(batch_size=4, seq_len=32), engine="cpu")
    assert digest(tiny_lm_dir) == before  # the source is only read
    assert {"model.safetensors", "config.json", "memprof.json", "README.md"} <= set(res.files)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["attn_implementation"] == "eager" and cfg["dtype"] == "float32"
    meta = json.loads((out / "memprof.json").read_text())
    assert meta["schema"] == "memprof.apply/1"
    assert meta["training_args"] == {
        "gradient_checkpointing": True,
        "gradient_checkpointing_kwargs": {"use_reentrant": False},
        "per_device_train_batch_size": 2,
        "gradient_accumulation_steps": 2,
    }
    assert meta["profile_after"]["peak_bytes"] < meta["profile_before"]["peak_bytes"]
    assert "TrainingArguments(" in (out / "README.md").read_text()
    # loads with from_pretrained and computes what the source computes
    src = AutoModelForCausalLM.from_pretrained(tiny_lm_dir).eval()
    new = AutoModelForCausalLM.from_pretrained(out).eval()
    assert new.config._attn_implementation == "eager"
    ids = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(new(ids).logits, src(ids).logits, atol=1e-5, rtol=1e-5)
    assert meta["verification"]["output_max_abs_diff"] < 1e-5


def test_apply_minilm_pure_bf16_with_tokenizer(minilm_dir, tmp_path):
    before = digest(minilm_dir)
    out = tmp_path / "minilm-bf16"
    code = main(
        [
            "apply",
            str(minilm_dir),
            "--step",
            "mixed_precision:pure=true",
            "--output",
            str(out),
            "-b",
            "2",
            "-s",
            "32",
            "-e",
            "cpu",
        ]
    )
    assert code == 0
    assert digest(minilm_dir) == before
    assert (out / "tokenizer.json").is_file() or (out / "vocab.txt").is_file()
    new = AutoModel.from_pretrained(out)
    assert new.dtype == torch.bfloat16
    src = AutoModel.from_pretrained(minilm_dir).eval()
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out)  # the copied tokenizer works
    batch = tok(["memory is the limit", "a second sentence"], return_tensors="pt", padding=True)
    with torch.no_grad():
        a = src(**batch).last_hidden_state
        b = new.eval()(**batch).last_hidden_state.float()
    cos = torch.nn.functional.cosine_similarity(a.mean(1), b.mean(1)).min()
    assert cos > 0.999
    assert (out / "model.safetensors").stat().st_size < 0.6 * (
        minilm_dir / "model.safetensors"
    ).stat().st_size


def test_apply_bundled_config_writes_a_config_only_folder(tmp_path, capsys):
    out = tmp_path / "llama-cfg"
    code = main(
        [
            "apply",
            "llama-3-8b",
            "--recipe",
            "low-memory-finetune",
            "-o",
            str(out),
            "-e",
            "sim",
            "-b",
            "1",
            "-s",
            "64",
            "--no-profile",
        ]
    )
    assert code == 0, capsys.readouterr().err
    assert not list(out.glob("*.safetensors"))
    cfg = AutoConfig.from_pretrained(out)
    assert str(cfg.dtype).endswith("bfloat16")
    meta = json.loads((out / "memprof.json").read_text())
    assert [s["name"] for s in meta["applied"]][-1] == "optimizer_in_backward"
    assert any("attention" in s and "already uses sdpa" in s for s in meta["skipped"])


def test_existing_output_needs_force(tiny_lm_dir, tmp_path, capsys):
    out = tmp_path / "exists"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    args = [
        "apply",
        str(tiny_lm_dir),
        "--step",
        "checkpointing",
        "-o",
        str(out),
        "-e",
        "cpu",
        "-b",
        "2",
        "-s",
        "8",
        "--no-profile",
    ]
    assert main(args) == 2
    assert "pass --force" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "mine"
    assert main([*args, "--force"]) == 0
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").is_file()
    assert not list(tmp_path.glob(".exists*"))  # no temporary or old folders left


def test_failure_midway_leaves_nothing(tiny_lm_dir, tmp_path, monkeypatch):
    before = digest(tiny_lm_dir)

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(apply_mod, "_verify", boom)
    out = tmp_path / "never"
    with pytest.raises(RuntimeError, match="disk full"):
        apply_mod.apply(
            str(tiny_lm_dir),
            recipes.from_names(["checkpointing"]),
            out,
            Workload(batch_size=2, seq_len=8),
            engine="cpu",
            profile=False,
        )
    assert not out.exists()
    assert not list(tmp_path.iterdir())
    assert digest(tiny_lm_dir) == before


def test_output_inside_the_source_is_refused(tiny_lm_dir, capsys):
    args = ["apply", str(tiny_lm_dir), "--step", "checkpointing", "-o", str(tiny_lm_dir / "out"), "-e", "cpu"]
    assert main(args) == 2
    # refused before any work, with the other inputs an output must not clobber
    assert "is inside the model folder (MODEL) this command reads" in capsys.readouterr().err


def test_nothing_applies_is_an_error(tiny_lm_dir, tmp_path, capsys):
    args = ["apply", str(tiny_lm_dir), "--step", "inference_mode", "-o", str(tmp_path / "o"), "-e", "cpu"]
    assert main(args) == 2
    assert "no step of the recipe applies" in capsys.readouterr().err


def test_apply_structured_pruning_reloads_at_its_new_size(minilm_dir, tmp_path):
    out = tmp_path / "minilm-pruned"
    res = apply_infer(minilm_dir, ["pruning:amount=0.25"], out)
    model = AutoModel.from_pretrained(out)
    assert model.config.intermediate_size == 1152  # 1536 x 0.75
    assert sum(p.numel() for p in model.parameters()) < 22_713_216
    v = res.verification
    assert v["compared"] and v["output_max_rel_diff"] > 0 and v["output_min_cosine"] > 0.5
    assert res.after.peak_bytes < res.before.peak_bytes


def test_apply_persists_the_sliding_window(tmp_path):
    src = save_tiny("mistral", tmp_path / "mistral")
    out = tmp_path / "local"
    apply_mod.apply(
        str(src),
        recipes.from_names(["local_attention:window=32"]),
        out,
        Workload(batch_size=2, seq_len=64),
        engine="cpu",
        profile=False,
    )
    assert AutoConfig.from_pretrained(out).sliding_window == 32


def test_apply_int8_quantized_minilm_reloads_quantized(minilm_dir, tmp_path):
    pytest.importorskip("torchao")
    out = tmp_path / "minilm-int8"
    res = apply_infer(minilm_dir, ["pruning:amount=0.25", "quantization"], out, profile=False)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["quantization_config"]["quant_method"] == "torchao"
    model = AutoModel.from_pretrained(out)
    w = model.encoder.layer[0].attention.self.query.weight
    assert hasattr(type(w), "__tensor_flatten__") and w.qdata.dtype == torch.int8  # reloaded quantized
    assert model.config.intermediate_size == 1152  # the pruning before it persisted too
    v = res.verification
    assert v["quantized_layers"] == 6 * 6 + 1  # q, k, v, attention output, FFN in and out per layer; pooler
    assert v["output_max_rel_diff"] > 0 and v["output_min_cosine"] > 0.5
    # on disk: the int8 Linear weights instead of float32 ones
    assert (out / "model.safetensors").stat().st_size < 0.8 * (
        minilm_dir / "model.safetensors"
    ).stat().st_size


def test_apply_refuses_a_quantization_it_cannot_save(tiny_lm_dir, tmp_path, capsys):
    out = tmp_path / "q"
    code = main(
        [
            "apply",
            str(tiny_lm_dir),
            "--recipe",
            str(_recipe(tmp_path, "quantization", {"backend": "torch.ao"})),
            "--output",
            str(out),
            "--mode",
            "infer",
            "--engine",
            "cpu",
        ]
    )
    assert code == 2 and not out.exists()
    err = capsys.readouterr().err
    assert "cannot be saved in a format transformers reloads" in err and len(err.strip().splitlines()) == 1


def _recipe(folder: Path, name: str, options: dict) -> Path:
    import yaml

    f = folder / "recipe.yaml"
    f.write_text(yaml.safe_dump({"optimizations": [{"name": name, **options}]}))
    return f


def _pruned_in_memory(auto: type, src: Path) -> torch.nn.Module:
    from memprof.surgery.pruning import prune_heads

    model = auto.from_pretrained(src).eval()
    prune_heads(model, 0.5)
    return model


def test_apply_head_pruning_llama_reloads_smaller(tmp_path, tiny_lm_dir):
    out = tmp_path / "llama-heads"
    res = apply_infer(tiny_lm_dir, ["pruning:method=heads"], out)
    cfg = AutoConfig.from_pretrained(out)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (2, 1, 16)
    new = AutoModelForCausalLM.from_pretrained(out).eval()
    src = AutoModelForCausalLM.from_pretrained(tiny_lm_dir)
    # one of two KV groups per layer: 2 x (q 32x64 + k 16x64 + v 16x64 + o 64x32)
    assert sum(p.numel() for p in src.parameters()) - sum(p.numel() for p in new.parameters()) == 12288
    assert (out / "model.safetensors").stat().st_size < (tiny_lm_dir / "model.safetensors").stat().st_size
    ids = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(
            new(ids).logits, _pruned_in_memory(AutoModelForCausalLM, tiny_lm_dir)(ids).logits
        )
    assert res.after.peak_bytes < res.before.peak_bytes


def test_apply_head_pruning_bert_writes_zeroed_heads_that_reload(tmp_path):
    src = save_tiny("bert", tmp_path / "bert", AutoModelForMaskedLM)
    out = tmp_path / "bert-heads"
    code = main(
        [
            "apply",
            str(src),
            "--step",
            "pruning:method=heads",
            "-o",
            str(out),
            "-e",
            "cpu",
            "-b",
            "2",
            "-s",
            "32",
        ]
    )
    assert code == 0
    new = AutoModelForMaskedLM.from_pretrained(out).eval()
    # BERT's config cannot express fewer heads: same size, half the query rows zero
    assert sum(p.numel() for p in new.parameters()) == sum(
        p.numel() for p in AutoModelForMaskedLM.from_pretrained(src).parameters()
    )
    q = new.bert.encoder.layer[0].attention.self.query.weight
    assert int((q.abs().sum(1) == 0).sum()) == 32
    ids = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():  # ...and computes what the heads-removed model computes
        torch.testing.assert_close(new(ids).logits, _pruned_in_memory(AutoModelForMaskedLM, src)(ids).logits)
    meta = json.loads((out / "memprof.json").read_text())
    assert any("not smaller" in n for n in meta["notes"])
    # the "after" profile measures the model as written: no smaller than before
    assert meta["profile_after"]["peak_bytes"] == meta["profile_before"]["peak_bytes"]
    assert meta["verification"]["output_max_abs_diff"] > 0


def test_apply_lora_writes_the_base_and_an_adapter_peft_loads(tiny_lm_dir, tmp_path):
    peft = pytest.importorskip("peft")
    before = digest(tiny_lm_dir)
    out = tmp_path / "lora"
    res = apply_mod.apply(
        str(tiny_lm_dir),
        recipes.from_names(["lora:rank=8,alpha=16", "checkpointing"]),
        out,
        Workload(batch_size=2, seq_len=32),
        engine="cpu",
    )
    assert digest(tiny_lm_dir) == before
    assert {"model.safetensors", "adapter/adapter_config.json", "adapter/adapter_model.safetensors"} <= set(
        res.files
    )
    # the base checkpoint: the source's weights, unchanged, and no adapter for from_pretrained to pick up
    src = AutoModelForCausalLM.from_pretrained(tiny_lm_dir).eval()
    base = AutoModelForCausalLM.from_pretrained(out).eval()
    assert not any("lora_" in n for n, _ in base.named_parameters())
    for (n, a), (_, b) in zip(src.state_dict().items(), base.state_dict().items(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=n)
    cfg = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert (cfg["peft_type"], cfg["r"], cfg["lora_alpha"]) == ("LORA", 8, 16)
    # PEFT loads base + adapter; lora_B is zero, so it computes what the source computes
    model = peft.PeftModel.from_pretrained(base, str(out / "adapter"), is_trainable=True)
    named = {n: p.detach() for n, p in model.named_parameters()}
    assert all(float(p.abs().max()) == 0 for n, p in named.items() if "lora_B" in n)
    assert all(float(p.abs().max()) > 0 for n, p in named.items() if "lora_A" in n)
    trainable = model.get_nb_trainable_parameters()[0]
    # rank 8 on q, k, v, o, gate, up, down of two layers: 8 x (in + out) each
    assert trainable == 2 * 8 * (128 + 96 + 96 + 128 + 192 + 192 + 192) == res.after.parameters["adapters"]
    ids = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(ids).logits, src(ids).logits)
    meta = json.loads((out / "memprof.json").read_text())
    assert meta["adapter"]["adapter_config"]["r"] == 8 and meta["adapter"]["folder"] == "adapter"
    assert meta["verification"]["adapter_output_max_abs_diff"] == 0
    assert meta["training_args"]["gradient_checkpointing"] is True
    readme = (out / "README.md").read_text()
    assert 'PeftModel.from_pretrained(base, "THIS_FOLDER/adapter", is_trainable=True)' in readme
    assert "LoraConfig(r=8, lora_alpha=16" in readme
    assert (
        res.after.categories_at_peak["optimizer_state"]
        < 0.2 * res.before.categories_at_peak["optimizer_state"]
    )


def test_apply_lora_on_minilm_attention(minilm_dir, tmp_path):
    peft = pytest.importorskip("peft")
    out = tmp_path / "minilm-lora"
    res = apply_mod.apply(
        str(minilm_dir),
        recipes.from_names(["lora:targets=attention"]),
        out,
        Workload(batch_size=2, seq_len=32),
        engine="cpu",
        profile=False,
    )
    assert res.verification["adapter_output_max_abs_diff"] == 0
    model = peft.PeftModel.from_pretrained(AutoModel.from_pretrained(out), str(out / "adapter"))
    adapted = {n.split(".lora_")[0].rpartition(".")[2] for n, _ in model.named_parameters() if "lora_A" in n}
    assert adapted == {"query", "key", "value"}
