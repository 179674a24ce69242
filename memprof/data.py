"""Sample data: texts and their token lengths, and what padding does to them.

``--data FILE`` gives real samples: a text file (one sample a line) or JSONL
(one object a line with a text field), tokenized with the model's own
tokenizer. ``--lengths`` gives a length distribution instead (no text). Both
become a :class:`Samples`; :func:`padding_plan` turns its lengths into the
batches a data loader would make (fixed padding, padding to the longest of
each batch, or length-grouped batches) and counts the padding.
"""

from __future__ import annotations

import json
import math
import random
import re
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from memprof.bounds import MAX_POSITIONS, MAX_SAMPLES
from memprof.errors import InputError

STRATEGIES = ("fixed", "longest", "grouped")


@dataclass
class Samples:
    """Token lengths of a data sample, and the texts when they came from a file."""

    lengths: list[int]
    source: str
    texts: list[str] = field(default_factory=list)

    def describe(self) -> str:
        L = self.lengths
        return (
            f"{self.source}: {len(L)} samples, {sum(L):,} tokens, length min {min(L)} / median "
            f"{statistics.median(L):g} / max {max(L)}"
        )


def read_texts(path: str | Path, field_name: str = "text") -> list[str]:
    """The samples of a text file (one a line) or a JSONL file (``field_name`` of each object).

    Raises:
        InputError: unreadable file, no samples, a bad JSON line or a missing field (with its line number).
    """
    p = Path(path)
    try:
        raw = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"{path}: cannot read it as UTF-8 text ({e.__class__.__name__})") from None
    lines = [(i, line) for i, line in enumerate(raw.splitlines(), 1) if line.strip()]
    if not lines:
        raise InputError(f"{path}: no samples (the file is empty)")
    jsonl = p.suffix.lower() in (".jsonl", ".json") or lines[0][1].lstrip().startswith("{")
    if not jsonl:
        return [line for _, line in lines]
    texts = []
    for i, line in lines:
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise InputError(f"{path}:{i}: not a JSON object ({e.msg})") from None
        if not isinstance(obj, dict) or field_name not in obj:
            raise InputError(f"{path}:{i}: no {field_name!r} field (choose it with --text-field)")
        value = obj[field_name]
        if not isinstance(value, str):
            raise InputError(f"{path}:{i}: field {field_name!r} is not a string")
        texts.append(value)
    return texts


def load_tokenizer(folder: str | Path | None, name: str) -> Any:
    """The tokenizer in ``folder`` (a model folder or a tokenizer folder).

    Raises:
        InputError: no folder, or no tokenizer files in it.
    """
    if folder is None:
        raise InputError(
            f"{name} has no tokenizer (a bundled config or a config file): pass --tokenizer DIR, "
            "or give a length distribution with --lengths"
        )
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(folder))
    except (OSError, ValueError) as e:
        raise InputError(
            f"{folder}: no tokenizer it can load ({str(e).splitlines()[0][:160]}); pass --tokenizer DIR"
        ) from None


def from_file(path: str | Path, tokenizer: Any, field_name: str = "text") -> Samples:
    """Texts of ``path`` and their lengths in ``tokenizer``'s tokens (special tokens included, untruncated)."""
    texts = read_texts(path, field_name)
    ids = tokenizer(texts, add_special_tokens=True, truncation=False)["input_ids"]
    return Samples(lengths=[len(x) for x in ids], source=Path(path).name, texts=texts)


#: the log of the longest length a draw keeps (a larger exponent would overflow exp)
_LOG_MAX_LENGTH = math.log(MAX_POSITIONS) + 1

_DIST = re.compile(r"^(uniform|normal|lognormal)\(([^,()]+),([^,()]+)\)$")


def samples_problem(n: int) -> None:
    """Refuse a count of draws below 1 or past :data:`memprof.bounds.MAX_SAMPLES`.

    Raises:
        InputError: what is wrong with ``n``.
    """
    if n < 1:
        raise InputError(f"--samples must be at least 1, got {n}")
    if n > MAX_SAMPLES:
        raise InputError(
            f"--samples {n} is more than memprof draws ({MAX_SAMPLES}): the padding of a distribution "
            "settles long before; use fewer"
        )


def from_spec(spec: str, n: int = 1000, seed: int = 0) -> Samples:
    """Lengths from the command line: ``120,340,88`` (the samples themselves), or ``n`` draws of
    ``uniform(MIN,MAX)``, ``normal(MEAN,SD)`` or ``lognormal(MU,SIGMA)`` (seeded; at least 1 token).

    Raises:
        InputError: a spec it cannot read.
    """
    text = spec.replace(" ", "")
    m = _DIST.match(text)
    rng = random.Random(seed)
    if m:
        kind = m.group(1)
        try:
            a, b = float(m.group(2)), float(m.group(3))
        except ValueError:
            raise InputError(f"--lengths {spec!r}: the parameters must be numbers") from None
        if not (math.isfinite(a) and math.isfinite(b)):  # float() reads nan, inf and 1e400 (inf)
            raise InputError(f"--lengths {spec!r}: the parameters must be finite numbers")
        samples_problem(n)
        if kind == "uniform":
            if not 1 <= a <= b:
                raise InputError(f"--lengths {spec!r}: uniform(MIN,MAX) needs 1 <= MIN <= MAX")
            draws = [rng.uniform(a, b) for _ in range(n)]
        elif kind == "normal":
            if b < 0:
                raise InputError(f"--lengths {spec!r}: the standard deviation must be 0 or more")
            draws = [rng.gauss(a, b) for _ in range(n)]
        else:
            if b < 0:
                raise InputError(f"--lengths {spec!r}: sigma must be 0 or more")
            # rng.lognormvariate's draws (exp of a normal draw), the exponent capped where exp overflows
            draws = [math.exp(min(rng.normalvariate(a, b), _LOG_MAX_LENGTH)) for _ in range(n)]
        # a draw is at least 1 token and at most MAX_POSITIONS (no model has more positions;
        # a sample longer than --seq-len is truncated to it in any case)
        clipped = sum(1 for x in draws if x > MAX_POSITIONS)
        source = f"{kind}{m.group(0)[len(kind) :]} x {n}"
        if clipped:
            source += f" ({clipped} draws clipped to {MAX_POSITIONS:,} tokens)"
        return Samples(lengths=[round(min(max(x, 1.0), MAX_POSITIONS)) for x in draws], source=source)
    try:
        lengths = [int(x) for x in text.split(",") if x]
    except ValueError:
        raise InputError(
            f"--lengths {spec!r}: give token lengths (120,340,88) or uniform(MIN,MAX), normal(MEAN,SD), "
            "lognormal(MU,SIGMA)"
        ) from None
    if not lengths or min(lengths) < 1:
        raise InputError(f"--lengths {spec!r}: lengths must be 1 or more")
    return Samples(lengths=lengths, source=f"{len(lengths)} lengths from the command line")


@dataclass
class PaddingPlan:
    """The batches of one pass over the samples, and their padding."""

    strategy: str
    batch_size: int
    max_length: int
    #: the padded length of every batch, in loader order
    padded: list[int]
    real_tokens: int
    padded_tokens: int
    truncated: int

    @property
    def waste(self) -> float:
        """Fraction of the processed tokens that are padding."""
        return 1 - self.real_tokens / self.padded_tokens if self.padded_tokens else 0.0

    @property
    def worst(self) -> int:
        """The longest padded batch: the step that sets the peak."""
        return max(self.padded)

    def to_dict(self) -> dict[str, Any]:
        return {
            "strategy": self.strategy,
            "batch_size": self.batch_size,
            "max_length": self.max_length,
            "batches": len(self.padded),
            "real_tokens": self.real_tokens,
            "padded_tokens": self.padded_tokens,
            "padding_waste": round(self.waste, 6),
            "worst_batch_length": self.worst,
            "median_batch_length": statistics.median(self.padded),
            "truncated_samples": self.truncated,
        }

    def describe(self) -> str:
        return (
            f"{self.strategy}: {len(self.padded)} batches, longest {self.worst} / median "
            f"{statistics.median(self.padded):g} tokens, {self.padded_tokens:,} tokens processed, "
            f"{self.waste:.1%} padding"
        )


def padding_plan(
    lengths: list[int],
    batch_size: int,
    max_length: int,
    strategy: str,
    *,
    multiple_of: int = 1,
    seed: int = 0,
) -> PaddingPlan:
    """Batch ``lengths`` as a data loader would, over the whole sample.

    * ``fixed``: every batch padded to ``max_length`` (``padding="max_length"``).
    * ``longest``: shuffled batches, each padded to its longest sample
      (``DataCollatorWithPadding``).
    * ``grouped``: length-grouped batches, as transformers'
      ``LengthGroupedSampler`` makes them: shuffled mega-batches of up to 50
      batches, sorted by length inside, so a batch holds similar lengths.

    Samples longer than ``max_length`` are truncated to it (in every strategy);
    ``multiple_of`` rounds a padded length up (tensor-core friendly 8, say).
    """
    if strategy not in STRATEGIES:
        raise InputError(f"padding strategy must be one of {', '.join(STRATEGIES)}, got {strategy!r}")
    if batch_size < 1 or max_length < 1 or multiple_of < 1:
        raise InputError("batch size, max length and multiple must be at least 1")
    if not lengths:
        raise InputError("no samples")
    clipped = [min(n, max_length) for n in lengths]
    truncated = sum(1 for n in lengths if n > max_length)
    order = list(range(len(clipped)))
    random.Random(seed).shuffle(order)
    if strategy == "grouped":
        mult = max(1, min(len(order) // (batch_size * 4), 50))
        mega = mult * batch_size
        groups = [sorted(order[i : i + mega], key=lambda j: -clipped[j]) for i in range(0, len(order), mega)]
        order = [j for g in groups for j in g]
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]

    def round_up(n: int) -> int:
        return min(max_length, -(-n // multiple_of) * multiple_of) if multiple_of > 1 else n

    if strategy == "fixed":
        padded = [max_length] * len(batches)
    else:
        padded = [round_up(max(clipped[j] for j in b)) for b in batches]
    return PaddingPlan(
        strategy=strategy,
        batch_size=batch_size,
        max_length=max_length,
        padded=padded,
        real_tokens=sum(clipped),
        padded_tokens=sum(p * len(b) for p, b in zip(padded, batches)),
        truncated=truncated,
    )


@dataclass
class DataSpec:
    """Where the sample comes from, as given on the command line (``--data`` or ``--lengths``)."""

    path: str | None = None
    text_field: str = "text"
    #: a tokenizer folder (default: the model's own folder)
    tokenizer: str | None = None
    lengths: str | None = None
    #: draws of a ``--lengths`` distribution
    samples: int = 1000

    def validate(self) -> None:
        if self.path and self.lengths:
            raise InputError("give --data FILE or --lengths, not both")
        if not self.path and (self.tokenizer or self.text_field != "text"):
            raise InputError("--tokenizer and --text-field go with --data FILE")
        samples_problem(self.samples)
        if self.lengths:
            from_spec(self.lengths, 1)  # a spec it cannot read, before the model loads (one draw)

    def load(self, model_folder: str | Path | None, model_name: str) -> Samples | None:
        """The samples (None when neither a file nor lengths were given).

        Raises:
            InputError: see :func:`read_texts`, :func:`load_tokenizer`, :func:`from_spec`.
        """
        self.validate()
        if self.lengths:
            return from_spec(self.lengths, self.samples)
        if not self.path:
            return None
        tok = load_tokenizer(self.tokenizer or model_folder, model_name)
        return from_file(self.path, tok, self.text_field)


def encode(texts: list[str], tokenizer_folder: str | Path, max_length: int) -> dict[str, Any]:
    """A padded, truncated batch of ``texts`` (input_ids, attention_mask) for a quality probe."""
    tok = load_tokenizer(tokenizer_folder, str(tokenizer_folder))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token or tok.unk_token
    return dict(tok(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt"))
