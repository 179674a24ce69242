"""Sample data (--data, --lengths), padding plans, dynamic padding and the text quality probe."""

from __future__ import annotations

import json
import random

import pytest

from memprof import bounds, data, optimizations
from memprof.cli import main
from memprof.compare import compare
from memprof.engines import CpuEngine
from memprof.errors import InputError
from memprof.models import resolve
from memprof.recipes import from_names
from memprof.workload import StepSetup, Workload
from tests.conftest import REPO, tiny

SAMPLE = REPO / "configs" / "data" / "python-docs.jsonl"


def test_read_texts_plain_and_jsonl(tmp_path):
    plain = tmp_path / "a.txt"
    plain.write_text("first sample\n\nsecond one\n")
    assert data.read_texts(plain) == ["first sample", "second one"]
    js = tmp_path / "b.jsonl"
    js.write_text('{"body": "x y"}\n{"body": "z"}\n')
    assert data.read_texts(js, "body") == ["x y", "z"]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("", "no samples"),
        ('{"text": "ok"}\n{not json\n', ":2: not a JSON object"),
        ('{"text": "ok"}\n{"other": 1}\n', ":2: no 'text' field"),
        ('{"text": 3}\n', "is not a string"),
    ],
)
def test_read_texts_says_which_line_is_wrong(tmp_path, content, message):
    f = tmp_path / "d.jsonl"
    f.write_text(content)
    with pytest.raises(InputError, match=message):
        data.read_texts(f)


def test_lengths_from_the_command_line():
    assert data.from_spec("120, 340,88").lengths == [120, 340, 88]
    u = data.from_spec("uniform(10,20)", n=500)
    assert len(u.lengths) == 500 and min(u.lengths) >= 10 and max(u.lengths) <= 20
    assert data.from_spec("normal(200,80)", n=50).lengths == data.from_spec("normal(200,80)", n=50).lengths
    for bad in ("a,b", "uniform(0,5)", "poisson(3)", "0,4"):
        with pytest.raises(InputError):
            data.from_spec(bad)


@pytest.mark.parametrize("spec", ["normal(1e400,1)", "normal(nan,1)", "uniform(1,inf)", "lognormal(1,-inf)"])
def test_lengths_of_a_distribution_with_a_non_finite_parameter_are_refused(spec):
    # normal(1e400,1) was: OverflowError: cannot convert float infinity to integer (exit 70)
    with pytest.raises(InputError, match="the parameters must be finite numbers"):
        data.from_spec(spec)


def test_draws_past_any_position_are_clipped_and_said():
    # lognormal(1000,1) was: OverflowError: math range error (exit 70)
    for spec in ("lognormal(1000,1)", "normal(1e308,1e308)", "uniform(1,1e300)"):
        s = data.from_spec(spec, n=200)
        assert min(s.lengths) >= 1 and max(s.lengths) == bounds.MAX_POSITIONS, spec
        assert "draws clipped to 268,435,456 tokens" in s.source
    # within the positions: the draws of random's own lognormvariate, unclipped
    rng = random.Random(0)
    assert data.from_spec("lognormal(5,1)", n=50).lengths == [
        max(1, round(rng.lognormvariate(5, 1))) for _ in range(50)
    ]
    assert "clipped" not in data.from_spec("lognormal(5,1)").source


def test_padding_plans_count_the_padding_of_the_whole_sample():
    rng = random.Random(1)
    lengths = [rng.randint(5, 300) for _ in range(2000)]
    plans = {s: data.padding_plan(lengths, 16, 256, s) for s in data.STRATEGIES}
    real = sum(min(n, 256) for n in lengths)
    assert all(p.real_tokens == real for p in plans.values())
    assert plans["fixed"].padded_tokens == 256 * 2000
    assert plans["fixed"].truncated == sum(n > 256 for n in lengths)
    # the longest batch pads to the longest (truncated) sample in every dynamic strategy: the same peak
    assert plans["longest"].worst == plans["grouped"].worst == 256
    # ...but grouping by length pads far less
    assert plans["fixed"].waste > plans["longest"].waste > plans["grouped"].waste
    assert plans["grouped"].padded_tokens < 0.8 * plans["longest"].padded_tokens
    eight = data.padding_plan(lengths, 16, 256, "longest", multiple_of=8)
    assert all(p % 8 == 0 for p in eight.padded)


def test_dynamic_padding_needs_lengths():
    why = optimizations.make("dynamic_padding").applies_to(None, StepSetup.of(Workload()))
    assert "--data FILE" in why


def _padded_run(lengths, seq_len=64):
    wl = Workload(batch_size=4, seq_len=seq_len)
    base = StepSetup.of(wl)
    base.data_lengths = lengths
    trial = base.copy()
    opt = optimizations.make("dynamic_padding")
    assert opt.applies_to(None, trial) is None
    opt.apply(trial)
    eng = CpuEngine()
    return eng.run(resolve(tiny("llama")), base), eng.run(resolve(tiny("llama")), trial), trial


def test_dynamic_padding_lowers_the_peak_when_every_batch_is_short():
    base, padded, setup = _padded_run([8, 12, 16, 20] * 10)
    assert setup.workload.seq_len == 20  # the longest batch is the step measured
    assert padded.peak_bytes < 0.6 * base.peak_bytes
    assert setup.padding["padding_waste"] < 0.4


def test_one_long_sample_keeps_the_peak_where_it_was():
    base, padded, setup = _padded_run([8, 12, 16, 20] * 10 + [64])
    assert setup.workload.seq_len == 64
    assert padded.peak_bytes == base.peak_bytes  # memory: nothing saved...
    assert setup.padding["padded_tokens"] < 0.5 * 41 * 64  # ...compute: most of the padding gone
    assert any("one long sample keeps the peak" in n for n in setup.notes)


def test_data_without_a_tokenizer_is_one_clear_line(capsys):
    code = main(["compare", "gpt2", "--engine", "sim", "--data", str(SAMPLE), "--step", "dynamic_padding"])
    err = capsys.readouterr().err
    assert code == 2 and "has no tokenizer" in err and "--lengths" in err
    code = main(
        [
            "compare",
            "gpt2",
            "--engine",
            "sim",
            "--data",
            str(SAMPLE),
            "--lengths",
            "4,5",
            "--step",
            "dynamic_padding",
        ]
    )
    assert code == 2 and "not both" in capsys.readouterr().err


def test_compare_with_lengths_in_sim(capsys):
    code = main(
        ["compare", tiny("llama"), "--engine", "sim", "-b", "4", "-s", "64", "--lengths", "uniform(4,24)",
         "--step", "dynamic_padding:group_by_length=true", "--json", "-"]
    )  # fmt: skip
    assert code == 0
    d = json.loads(capsys.readouterr().out)
    assert d["steps"][0]["profile"]["workload"]["seq_len"] == 24
    assert d["steps"][0]["profile"]["peak_bytes"] < d["baseline"]["peak_bytes"]
    assert any("padded to a fixed length" in n for n in d["baseline"]["notes"])


def test_text_probe_scores_pruning_by_embedding_cosine(minilm_dir, tmp_path):
    texts = tmp_path / "t.txt"
    texts.write_text("A cat sat on the mat.\nPython is a programming language.\nIt rains today.\n")
    c = compare(
        str(minilm_dir),
        from_names(["pruning:amount=0.5", "dynamic_padding"]),
        Workload(mode="infer", batch_size=3, seq_len=32),
        engine="cpu",
        timing_steps=0,
        data=data.DataSpec(path=str(texts)),
    )
    pruned, padded = c.steps
    q = pruned.quality
    assert q["texts"] == 3 and 0 < q["text_cosine_min"] <= q["text_cosine_mean"] < 0.999
    # padding is masked: the pooled embeddings do not move
    assert padded.quality["text_cosine_mean"] == pytest.approx(q["text_cosine_mean"], abs=1e-6)
    assert padded.profile.workload["seq_len"] < 32


def test_apply_takes_the_data_for_dynamic_padding(tmp_path):
    from tests.test_apply import save_tiny

    src = save_tiny("llama", tmp_path / "src")
    out = tmp_path / "out"
    code = main(
        ["apply", str(src), "-o", str(out), "-e", "cpu", "-b", "4", "-s", "64", "--lengths", "uniform(4,24)",
         "--step", "dynamic_padding:group_by_length=true"]
    )  # fmt: skip
    assert code == 0
    meta = json.loads((out / "memprof.json").read_text())
    assert meta["training_args"]["group_by_length"] is True
    assert meta["profile_after"]["workload"]["seq_len"] == 24
    assert meta["profile_after"]["peak_bytes"] < meta["profile_before"]["peak_bytes"]
    assert "DataCollatorWithPadding" in (out / "README.md").read_text()
