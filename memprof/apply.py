"""``memprof apply``: write an optimized checkpoint that transformers loads.

What persists in a checkpoint goes into it: the weights (safetensors) in the
recipe's storage dtype, ``config.json`` with the settings that live there
(``dtype``, ``attn_implementation``, ``use_cache``), the tokenizer files of the
source. What belongs to the training loop (checkpointing, autocast,
accumulation, optimizer, offload) goes into ``memprof.json`` as transformers
``TrainingArguments`` fields, and into the README of the output as a snippet;
environment variables (the allocator's ``PYTORCH_CUDA_ALLOC_CONF``) go into
``memprof.json`` as ``environment`` and into the README as ``export`` lines.
A LoRA step leaves the base weights as they are and writes its initialised adapter
to ``adapter/`` as PEFT saves it (``PeftModel.from_pretrained`` loads it): beside
the base files, ``from_pretrained`` would load it into the base model by itself.

The write is atomic: everything goes to a temporary folder beside ``DIR``
(``.DIR.memprof-PID-XXXX``), which is renamed into place only when complete.
``--force`` replaces an existing ``DIR`` so that at every instant the path holds
the complete old folder or the complete new one: on Linux both are exchanged in
one ``renameat2(RENAME_EXCHANGE)``, then the old one is deleted. Where that call
is missing (another system, a file system without it), the old folder is renamed
aside to ``.DIR.memprof-PID-old`` first: a run killed between the two renames
leaves ``DIR`` missing, and the next ``apply`` to ``DIR`` renames the old folder
back before anything else (:func:`recover`). That next run also deletes the
temporary folders of killed runs (those whose process is gone). The source is
only read.
"""

from __future__ import annotations

import contextlib
import copy
import ctypes
import datetime as _dt
import errno
import functools
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import torch

from memprof._version import __version__
from memprof.allocator_model import ENV_VAR, alloc_conf_string
from memprof.compare import output_difference, tokenizer_folder
from memprof.data import DataSpec
from memprof.engines.base import Engine
from memprof.engines.sim import SimEngine
from memprof.errors import InputError
from memprof.files import check_output_folder, leftovers, write_atomic
from memprof.models import DTYPES, TASKS, build_model
from memprof.optimizations.registry import for_setup
from memprof.prepare import fake_model, prepare, stack
from memprof.profile import Profile
from memprof.recipes import Recipe
from memprof.sharding import Launch
from memprof.surgery.quantization import quiet_imports
from memprof.units import format_bytes
from memprof.workload import StepSetup, Workload, main_output

SCHEMA = "memprof.apply/1"

# Files that make up a tokenizer (or processor) in a Hugging Face folder.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "spiece.model",
    "sentencepiece.bpe.model",
    "tokenizer.model",
    "preprocessor_config.json",
    "processor_config.json",
)


@dataclass
class ApplyResult:
    """What was written, and the numbers behind it."""

    output: Path
    files: list[str]
    setup: StepSetup
    skipped: list[str]
    before: Profile | None
    after: Profile | None
    verification: dict[str, Any] | None
    notes: list[str] = field(default_factory=list)


def apply(
    spec: str,
    recipe: Recipe,
    output: str | Path,
    workload: Workload,
    *,
    force: bool = False,
    engine: str | Engine = "auto",
    task: str | None = None,
    profile: bool = True,
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
    data: DataSpec | None = None,
    progress: Callable[[str], None] | None = None,
) -> ApplyResult:
    """Write the checkpoint of ``spec`` with ``recipe`` applied to ``output``.

    Args:
        spec: a transformers MODEL spec (directory, config.json, bundled name, Hub id).
        recipe: the validated recipe.
        output: the folder to create.
        workload: the step the before/after profiles measure (and the training arguments describe).
        force: replace an existing ``output``.
        engine: the engine of the before/after profiles (``auto``: sim, a projection of
            the memory; the written checkpoint is verified on the real model either way).
        profile: measure the before/after profiles (False: write only).
        data: a data sample (``--data`` / ``--lengths``) for dynamic padding, whose
            training-loop settings (``group_by_length``, the collator) go into the README.

    Raises:
        InputError: the output exists (without ``force``), is a file, cannot be
            created, or is inside the source; a model that is not from
            transformers; invalid recipe for this model.
    """
    say = progress or (lambda msg: None)
    workload.validate()
    if workload.mode == "distill":
        raise InputError(
            "memprof apply writes one model; profile a distillation step with analyze or compare"
        )
    out = Path(output).expanduser().resolve()
    # before any work: what killed runs left beside DIR, then whether DIR can be written at all
    recovered = recover(out)
    try:
        check_output_folder(out, "--output", force=force)
    except InputError as e:
        raise InputError("; ".join([str(e), *recovered])) from None
    rm, eng = prepare(spec, workload, engine, task=task, trust_remote_code=trust_remote_code, progress=say)
    workload = workload.for_model(rm)
    if rm.factory is not None:
        raise InputError(
            f"{spec}: memprof apply writes transformers checkpoints; a module:factory model has no config to save"
        )
    src_dir = rm.folder or rm.weights_dir
    if src_dir is not None:
        src = Path(src_dir).resolve()
        if out == src or src in out.parents or out in src.parents:
            raise InputError(f"{out}: overlaps the source model folder {src}; choose another output folder")

    samples = data.load(tokenizer_folder(rm), rm.name) if data else None
    setup, skipped = stack(
        recipe,
        workload,
        fake_model(rm, workload),
        pretrained=rm.has_weights,
        data_lengths=samples.lengths if samples else None,
    )
    if not setup.steps:
        raise InputError(
            "no step of the recipe applies to this model and workload: "
            + "; ".join(skipped or ["empty recipe"])
        )
    # Refuse before any profiling: a checkpoint that does not reload as the measured model is worse than none.
    steps = for_setup(setup)
    unsaveable = [why for o in steps if (why := o.checkpoint_problem())]
    if unsaveable:
        raise InputError(f"{spec}: cannot write this checkpoint: " + "; ".join(unsaveable))
    # The transforms in the form a checkpoint holds (masks folded in, BERT's heads zeroed
    # rather than removed): the "after" profile then measures what the written model takes.
    setup.checkpoint_form = True
    before = after = None
    if profile:
        prof_eng = eng
        if engine == "auto":
            # memory only, so projected by default: the real reloaded model is still run for the
            # output check below; --engine cpu/cuda measures the two profiles on real tensors
            prof_eng = SimEngine()
            prof_eng.reason = (
                "apply: the before/after memory is projected in sim by default (--engine to measure)"
            )
        elif setup.shard and not eng.simulated and Launch.from_env() is None:
            # real ranks need torchrun: the sharded step (and its baseline) is projected
            prof_eng = SimEngine()
            prof_eng.reason = "apply: a sharded step is projected (real ranks run under torchrun)"
        # memory only: memprof.json keeps the two profiles (FLOPs and time are memprof compare's job)
        say("Profiling the baseline")
        before = prof_eng.run(rm, StepSetup.of(workload), allow_pickle=allow_pickle)
        say("Profiling the optimized step")
        after = prof_eng.run(rm, setup, allow_pickle=allow_pickle)

    dtype = setup.workload.dtype
    notes: list[str] = []
    has_weights = bool(rm.has_weights)
    source: torch.nn.Module | None = None
    builder: Any = None
    adapter: dict[str, Any] | None = None
    if has_weights:
        say("Loading the weights")
        saved_notes = list(rm.notes)
        try:
            with torch.no_grad():
                source, builder = build_model(
                    rm, dtype=workload.dtype, attn=workload.attn, load_weights=True, allow_pickle=allow_pickle
                )
        finally:
            rm.notes[:] = saved_notes
    else:
        # Never materialise random weights: a config's model may not fit in RAM.
        notes.append(
            "the source has no weights (a config): the output holds config.json, memprof.json and README.md; "
            "build it with AutoModel*.from_config(AutoConfig.from_pretrained(DIR))"
        )

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=_temp_prefix(out), dir=out.parent))
    try:
        say("Writing the checkpoint")
        if source is not None:
            model = source
            rewrites = [o for o in steps if o.rewrites_model]
            # quantization (and qlora's 4-bit base) is written below through transformers' own quantizer
            quant = [q for o in rewrites if (q := checkpoint_quantization(o)) is not None]
            if dtype != workload.dtype or rewrites:
                # a changed copy: the source model stays as loaded, for the verification below
                model = copy.deepcopy(source)
                for o in rewrites:
                    if checkpoint_quantization(o) is not None or o.name in ("lora", "qlora"):
                        # below: transformers' own quantizer writes the reloadable format; PEFT the adapters
                        continue
                    note = o.transform_model(model, setup)
                    if note:
                        notes.append(note)
                model = model.to(DTYPES[dtype])
            if quant:
                notes.append(_save_quantized(model, quant[0], tmp, out))
            else:
                model.save_pretrained(tmp, safe_serialization=True)  # type: ignore[operator]
            lora = next((o for o in rewrites if o.name in ("lora", "qlora")), None)
            if lora is not None:
                # qlora: the same adapters over the 4-bit base (saved from the unquantized layers: same shapes)
                adapters = cast(Any, lora).adapters() if lora.name == "qlora" else lora
                adapter = _save_adapter(model, adapters, tmp / ADAPTER_FOLDER, out / ADAPTER_FOLDER)
                adapter["method"] = lora.name
        else:
            rm.config.save_pretrained(tmp)
        _update_config(tmp / "config.json", setup, dtype)
        if src_dir is not None:
            for name in TOKENIZER_FILES:
                f = Path(src_dir) / name
                if f.is_file():
                    shutil.copy2(f, tmp / name)
        verification = None
        if source is not None:
            say("Verifying: reload with from_pretrained and compare outputs")
            verification = _verify(rm, tmp, source, builder, workload)
            if adapter is not None and adapter["method"] == "lora":
                # (qlora's base reloads in 4-bit: its output is the quantized model's, checked above)
                verification.update(_verify_adapter(rm, tmp, source, builder))
        meta = {
            "schema": SCHEMA,
            "memprof_version": __version__,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "source": {"spec": spec, "name": rm.name, "source": rm.source},
            "recipe": recipe.to_dict(),
            "applied": setup.steps,
            "skipped": skipped,
            "storage_dtype": dtype,
            "config_updates": setup.config_updates,
            "training_args": setup.training_args,
            "adapter": adapter,
            "environment": environment(setup),
            "notes": setup.notes + notes,
            "workload": workload.to_dict(),
            "verification": verification,
            "profile_before": before.to_dict() if before else None,
            "profile_after": after.to_dict() if after else None,
        }
        write_atomic(tmp / "memprof.json", json.dumps(meta, indent=2) + "\n")
        write_atomic(
            tmp / "README.md",
            readme(
                rm.name,
                recipe,
                setup,
                skipped,
                before,
                after,
                verification,
                notes,
                adapter,
                TASKS.get(rm.task or ""),
            ),
        )
        files = sorted(str(p.relative_to(tmp)) for p in tmp.rglob("*") if p.is_file())
        _normal_permissions(tmp)
        _step("written")
        _swap_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return ApplyResult(
        output=out,
        files=files,
        setup=setup,
        skipped=skipped,
        before=before,
        after=after,
        verification=verification,
        notes=recovered + notes,
    )


def checkpoint_quantization(opt: Any) -> dict[str, Any] | None:
    """The quantization a step leaves in the checkpoint (a :func:`quantization_config` spec), or None.

    ``quantization``: its backend and bits. ``qlora``: its 4-bit base weights, as
    bitsandbytes 4-bit with the step's data type, double quantization and compute
    dtype (its LoRA adapters are not part of the base checkpoint).
    """
    if opt.name == "quantization":
        return {"backend": opt.backend, "bits": opt.config.bits}
    if opt.name == "qlora":
        c = opt.config
        return {
            "backend": "bitsandbytes",
            "bits": 4,
            "quant_type": c.quant_type,
            "double_quant": c.double_quant,
            "compute_dtype": c.compute_dtype,
        }
    return None


#: the subfolder of the initialised LoRA adapter (beside the base checkpoint, from_pretrained
#: would load the adapter into the base model itself, and PeftModel.from_pretrained a second one)
ADAPTER_FOLDER = "adapter"


def _save_adapter(model: torch.nn.Module, lora: Any, folder: Path, final: Path) -> dict[str, Any]:
    """Write the step's initialised LoRA adapter as PEFT saves it (``adapter_config.json``,
    ``adapter_model.safetensors``); what memprof.json records of it."""
    with quiet_imports():
        from peft import get_peft_model

    base = copy.deepcopy(model)
    torch.manual_seed(0)  # lora_A's initialisation (lora_B is zero: the output is the base model's)
    upcast = lora.config.adapter_dtype == "float32"
    peft_model = get_peft_model(base, lora.peft_config(base), autocast_adapter_dtype=upcast)
    # the base checkpoint written beside it (PEFT reads its config while saving); its final place in the file
    peft_model.peft_config["default"].base_model_name_or_path = str(folder.parent)
    peft_model.save_pretrained(str(folder), safe_serialization=True)
    (folder / "README.md").unlink(missing_ok=True)  # PEFT's empty model card: the folder's README says it all
    config_file = folder / "adapter_config.json"
    config = json.loads(config_file.read_text())
    config["base_model_name_or_path"] = str(final.parent)
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    trainable, total = peft_model.get_nb_trainable_parameters()
    return {
        "folder": folder.name,
        "method": "lora",
        "trainable_parameters": int(trainable),
        "total_parameters": int(total),
        "peft_call": lora.peft_call(),
        "adapter_config": config,
    }


def _verify_adapter(rm: Any, folder: Path, source: torch.nn.Module, builder: Any) -> dict[str, Any]:
    """Load base + adapter with ``PeftModel.from_pretrained``: B is zero, so the output is the source's."""
    import transformers

    with quiet_imports():
        from peft import PeftModel

    auto = getattr(transformers, TASKS[rm.task]) if rm.task in TASKS else transformers.AutoModel
    model = PeftModel.from_pretrained(auto.from_pretrained(str(folder)), str(folder / ADAPTER_FOLDER)).eval()
    inputs = builder.build(2, 16, torch.device("cpu"), with_labels=False)
    with torch.no_grad():
        a, b = main_output(source.eval()(**inputs)), main_output(model(**inputs))
    diff = output_difference(b, a)[0] if a is not None and b is not None else None
    return {"adapter_loaded": True, "adapter_output_max_abs_diff": diff}


def quantization_config(spec: dict[str, Any]) -> Any:
    """The transformers quantization config for ``{"backend", "bits"}`` (bitsandbytes 4-bit: also
    ``quant_type``, ``double_quant``, ``compute_dtype``), or InputError if none can be saved."""
    backend, bits = spec["backend"], spec.get("bits", 8)
    if backend == "torchao":
        from transformers import TorchAoConfig

        with quiet_imports():
            from torchao.quantization import Int8WeightOnlyConfig
        return TorchAoConfig(Int8WeightOnlyConfig())
    if backend == "bitsandbytes":
        from transformers import BitsAndBytesConfig

        if bits == 4:
            return BitsAndBytesConfig(
                load_in_4bit=True,
                bnb_4bit_quant_type=spec.get("quant_type", "nf4"),
                bnb_4bit_use_double_quant=spec.get("double_quant", False),
                bnb_4bit_compute_dtype=DTYPES[spec["compute_dtype"]] if "compute_dtype" in spec else None,
            )
        return BitsAndBytesConfig(load_in_8bit=True)
    raise InputError(f"{backend} quantization has no checkpoint format")


def _save_quantized(model: Any, spec: dict[str, Any], tmp: Path, out: Path) -> str:
    """Write ``model`` quantized, through transformers' own quantizer so that from_pretrained reloads it.

    transformers saves a quantized model only when it loaded it quantized: the
    (already pruned, cast) model is written to a staging folder, loaded back with
    the quantization config, and that model is saved.
    """
    qconfig = quantization_config(spec)
    stage = Path(tempfile.mkdtemp(prefix=_temp_prefix(out) + "stage-", dir=out.parent))
    try:
        model.save_pretrained(stage, safe_serialization=True)
        quantized = type(model).from_pretrained(str(stage), quantization_config=qconfig, dtype=model.dtype)
        quantized.save_pretrained(tmp, safe_serialization=True)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    size = sum(f.stat().st_size for f in tmp.glob("*.safetensors"))

    return (
        f"quantized with transformers' {type(qconfig).__name__} ({spec['backend']}, {spec.get('bits', 8)}-bit); "
        f"weights on disk {format_bytes(size)}; config.json carries quantization_config, so from_pretrained "
        "reloads it quantized"
    )


def _update_config(path: Path, setup: StepSetup, dtype: str) -> None:
    cfg = json.loads(path.read_text())
    cfg["dtype"] = dtype
    cfg.pop("torch_dtype", None)
    for k, v in setup.config_updates.items():
        if k == "dtype":
            continue
        cfg[k] = v
    write_atomic(path, json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def _verify(
    rm: Any, folder: Path, source: torch.nn.Module, builder: Any, workload: Workload
) -> dict[str, Any]:
    """Reload the written checkpoint and compare its output with the source model's."""
    import transformers

    auto = getattr(transformers, TASKS[rm.task]) if rm.task in TASKS else transformers.AutoModel
    reloaded = auto.from_pretrained(str(folder))
    reloaded.eval()
    source.eval()
    inputs = builder.build(2, min(16, workload.seq_len), torch.device("cpu"), with_labels=False)
    with torch.no_grad():
        a = main_output(source(**inputs))
        b = main_output(reloaded(**inputs))
    if a is None or b is None:
        return {"reloaded": True, "compared": False}
    diff, rel = output_difference(b, a)
    cos = torch.nn.functional.cosine_similarity(a.float().flatten(1), b.float().flatten(1), dim=1)
    quantized = sum(
        1
        for m in reloaded.modules()
        if hasattr(type(w := getattr(m, "weight", None)), "__tensor_flatten__")
        or getattr(w, "quant_state", None) is not None  # bitsandbytes 4-bit
    )
    return {
        "output_min_cosine": float(cos.min()),
        "quantized_layers": quantized,
        "reloaded": True,
        "compared": True,
        "reloaded_dtype": str(reloaded.dtype).replace("torch.", ""),
        "output_max_abs_diff": diff,
        "output_max_rel_diff": rel,
        "inputs": f"batch 2, seq {min(16, workload.seq_len)}, eval mode",
    }


def _normal_permissions(folder: Path) -> None:
    """mkdtemp makes a private folder: give it (and its files) the permissions of a normal one."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(folder, 0o777 & ~umask)
    for f in folder.rglob("*"):
        os.chmod(f, (0o777 if f.is_dir() else 0o666) & ~umask)


#: renameat2's flags (linux/fs.h) and the "current folder" file descriptor (fcntl.h)
_AT_FDCWD = -100
_RENAME_NOREPLACE = 1
_RENAME_EXCHANGE = 2


def _temp_prefix(out: Path) -> str:
    """The name prefix of this process's temporary folders beside ``out``: ``.NAME.memprof-PID-``."""
    return f".{out.name}.memprof-{os.getpid()}-"


def _step(name: str) -> None:
    """A named point of the write (``written``, ``exchanged``, ``moved-aside``); a no-op.

    Tests replace it to kill the process at that point and check what a killed
    run leaves behind.
    """


@functools.cache
def _libc_renameat2() -> Any:
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # an old C library
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


def _renameat2(src: Path, dst: Path, flags: int) -> bool:
    """``renameat2(src, dst, flags)``: True when done, False where the system or file system lacks it.

    Raises:
        OSError: the rename itself failed.
    """
    fn = _libc_renameat2()
    if fn is None:
        return False
    if fn(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), flags) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(src), None, str(dst))


def _swap_into_place(tmp: Path, out: Path) -> None:
    """Put the complete folder ``tmp`` at ``out``; an existing ``out`` is replaced, then deleted.

    At every instant ``out`` is the complete old folder or the complete new one:
    ``renameat2(RENAME_EXCHANGE)`` swaps the two in one step (``tmp`` then holds
    the old folder, deleted last). Without it, the old folder is renamed aside to
    ``.NAME.memprof-PID-old`` and the new one renamed in: a failure between the
    two puts the old one back, and a kill there is repaired by :func:`recover`.
    """
    if not os.path.lexists(out):
        if not _renameat2(tmp, out, _RENAME_NOREPLACE):
            os.rename(tmp, out)
        return
    if _renameat2(tmp, out, _RENAME_EXCHANGE):
        _step("exchanged")
        shutil.rmtree(tmp, ignore_errors=True)  # the old folder now
        return
    old = out.parent / (_temp_prefix(out) + "old")
    if os.path.lexists(old):
        shutil.rmtree(old)
    moved = False
    try:
        os.rename(out, old)
        moved = True
        _step("moved-aside")
        os.rename(tmp, out)
    except BaseException:
        if moved and not os.path.lexists(out):
            with contextlib.suppress(OSError):
                os.rename(old, out)
        raise
    shutil.rmtree(old, ignore_errors=True)


def recover(out: Path) -> list[str]:
    """Repair what killed runs left beside ``out``; say what was done (one line each).

    A missing ``out`` with an old folder renamed aside (a kill between the two
    renames of the fallback replace) gets the old folder back; every other
    leftover temporary folder is deleted.
    """
    notes = []
    left = leftovers(out)
    olds = [p for p in left if p.name.endswith("-old") and p.is_dir()]
    if olds and not os.path.lexists(out):
        newest = max(olds, key=lambda p: p.stat().st_mtime)
        os.rename(newest, out)
        left.remove(newest)
        notes.append(f"restored {out} from {newest.name} (an interrupted apply --force had moved it aside)")
    removed = 0
    for p in left:
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                p.unlink()
        removed += not os.path.lexists(p)
    if removed:
        notes.append(f"removed {removed} temporary folder(s) of interrupted runs beside {out}")
    return notes


def environment(setup: StepSetup) -> dict[str, str]:
    """Environment variables the recipe's settings need (set before the training process starts)."""
    conf = alloc_conf_string(setup.alloc_conf) if setup.alloc_conf else ""
    return {ENV_VAR: conf} if conf else {}


def trainer_snippet(setup: StepSetup) -> str:
    """A TrainingArguments snippet with the recipe's training-loop settings."""
    args = {"output_dir": "out", **setup.training_args}
    lines = ["from transformers import TrainingArguments", "", "args = TrainingArguments("]
    for k, v in args.items():
        lines.append(f"    {k}={v!r},")
    lines.append(")")
    return "\n".join(lines)


def readme(
    name: str,
    recipe: Recipe,
    setup: StepSetup,
    skipped: list[str],
    before: Profile | None,
    after: Profile | None,
    verification: dict[str, Any] | None,
    notes: list[str],
    adapter: dict[str, Any] | None = None,
    auto_class: str | None = None,
) -> str:

    lines = [
        f"# {name}, optimized by memprof",
        "",
        f"Recipe: {recipe.description or 'recipe'} ({recipe.source or 'inline'}).",
        "",
        "Applied, in order: "
        + ", ".join(f"`{s['name']}` {s['options'] or ''}".strip() for s in setup.steps)
        + ".",
    ]
    if skipped:
        lines += ["", "Skipped (did not apply): " + "; ".join(skipped) + "."]
    if before and after:
        w = before.workload
        ratio = before.peak_bytes / after.peak_bytes if after.peak_bytes else float("inf")
        lines += [
            "",
            f"Peak memory of one {w.get('mode')} step (batch {w.get('batch_size')}, seq {w.get('seq_len')}, "
            f"{before.engine} engine): {format_bytes(before.peak_bytes)} before, "
            f"{format_bytes(after.peak_bytes)} after ({ratio:.2f}x less). Full profiles in `memprof.json`.",
        ]
    lines += [
        "",
        "## Load it",
        "",
        "```python",
        "from transformers import AutoConfig, AutoModel",
        "",
        'model = AutoModel.from_pretrained("THIS_FOLDER")  # or the AutoModelFor... class of your task',
        "```",
    ]
    if adapter is not None:
        auto = auto_class or "AutoModel"
        lines += [
            "",
            f"The LoRA adapter, initialised (B = 0: the output is the base model's), is in `{adapter['folder']}/`; "
            f"{adapter['trainable_parameters']:,} trainable parameters of {adapter['total_parameters']:,} "
            f"(`{adapter['peft_call']}`). Load both to train it:",
            "",
            "```python",
            "from peft import PeftModel",
            f"from transformers import {auto}",
            "",
            f'base = {auto}.from_pretrained("THIS_FOLDER")',
            f'model = PeftModel.from_pretrained(base, "THIS_FOLDER/{adapter["folder"]}", is_trainable=True)',
            "```",
        ]
    if verification and verification.get("compared"):
        lines += [
            "",
            f"Verified when written: reloaded with from_pretrained ({verification['reloaded_dtype']}), the output "
            f"differs from the source model's by at most {verification['output_max_abs_diff']:.3g} "
            f"({verification['output_max_rel_diff']:.2e} relative; {verification['inputs']}).",
        ]
    if setup.training_args:
        lines += [
            "",
            "## Train with it",
            "",
            "The training-loop part of the recipe, as transformers `TrainingArguments` fields:",
            "",
            "```python",
            trainer_snippet(setup),
            "```",
        ]
    env = environment(setup)
    if env:
        lines += [
            "",
            "## Environment",
            "",
            "Set before the process starts (PyTorch reads it when CUDA initialises):",
            "",
            "```sh",
            *[f"export {k}={v}" for k, v in env.items()],
            "```",
        ]
    extra = setup.notes + notes
    if extra:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in extra]
    return "\n".join(lines) + "\n"
