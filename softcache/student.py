"""The student: finding, building or loading it, checking it against a store, saving it for ``from_pretrained``.

A student is any Hugging Face causal LM, named by a config.json (random init), a model directory,
a LoRA adapter directory (its base with the adapter merged in) or a hub id found in the local
Hugging Face cache (softcache.hub). It must be able to emit every id the store holds (its output
vocabulary at least the teacher's), and, unless the user overrides it, tokenize text the same way
as the teacher. The saved model carries the store's tokenizer, so ``AutoTokenizer`` works on it.

:func:`build_student` is the one boundary for the files a user hands us as a student (config.json,
weights, tokenizer files are checked in :func:`check_compatible`): each is parsed and checked there,
and any problem is one :class:`SoftcacheError` naming the file, rather than whatever transformers or
safetensors raise several calls later.
"""

from __future__ import annotations

import contextlib
import difflib
import json
import shutil
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from softcache.errors import SoftcacheError, one_line
from softcache.hub import HubModel, find_hub_model, looks_like_hub_id
from softcache.models import max_positions, output_vocab
from softcache.store import Store
from softcache.tokenizer import tokenizer_fingerprint

ADAPTER_CONFIG = "adapter_config.json"
"""What makes a directory a LoRA adapter (peft's file), e.g. a LoRA run's final/."""


@dataclass(frozen=True)
class StudentSource:
    """Where the files of a ``--student`` are on this machine."""

    spec: str
    """What the user typed."""
    path: Path
    """A config file, or a model directory (for a hub id, its snapshot in the Hugging Face cache)."""
    hub: HubModel | None = None

    @property
    def directory(self) -> Path | None:
        return self.path if self.path.is_dir() else None

    @property
    def weights(self) -> list[Path]:
        return _weight_files(self.path) if self.path.is_dir() else []

    @property
    def base_name(self) -> str:
        """How a LoRA adapter names this student as its base: the hub id, or the absolute directory."""
        return self.hub.repo_id if self.hub else str(self.path.resolve())


def find_student(spec: str, flag: str = "--student") -> StudentSource:
    """The files ``spec`` names: a config file or model directory on this machine, or else a hub id
    from the local Hugging Face cache (softcache.hub). A hub id must bring its weights."""
    path = Path(spec).expanduser()
    if path.exists():
        return StudentSource(spec, path)
    if not looks_like_hub_id(spec):
        raise SoftcacheError(f"{flag} {spec} does not exist (give a config.json, a model directory or a hub id)")
    hub = find_hub_model(spec, flag)
    source = StudentSource(spec, hub.directory, hub)
    if not source.weights:
        raise SoftcacheError(f"{flag} {spec}: its snapshot in the Hugging Face cache ({hub.directory}) holds no "
                             "weights; download them (hf download " + spec + "), or give a config.json to start "
                             "from random weights")
    return source


def build_student(spec: str, seed: int, flag: str = "--student", dtype: torch.dtype = torch.float32):
    """The student ``spec`` names: a config.json (random init, seeded), a model directory (its weights
    when present, else random init), a LoRA adapter directory (its base with the adapter merged in) or
    a hub id in the local Hugging Face cache (its weights), with weights of ``dtype``. The boundary
    for every student file: whatever is wrong with the config, the weights or their fit raises one
    :class:`SoftcacheError` naming ``flag``, the file and what to do."""
    from transformers import AutoModelForCausalLM

    source = find_student(spec, flag)
    path = source.path
    if path.is_dir() and (path / ADAPTER_CONFIG).is_file() and not (path / "config.json").exists():
        return _load_adapter(path, spec, seed, flag, dtype)
    config_file = path / "config.json" if path.is_dir() else path
    if not config_file.is_file():
        raise SoftcacheError(f"{flag} {spec} has no config.json (give a config.json, a model directory or a hub id)")
    config = _read_config(config_file, flag)
    weights = source.weights
    torch.manual_seed(seed)
    if weights:
        return _load_weights(path, weights, config, flag, dtype)
    try:
        with _quiet_transformers():
            return AutoModelForCausalLM.from_config(config, dtype=dtype)
    except Exception as err:  # any architecture's constructor: its own checks raise many types
        raise SoftcacheError(f"{flag} {config_file}: transformers could not build a {config.model_type} causal LM "
                             f"from it ({one_line(err)}); fix the config") from err


def _load_adapter(directory: Path, spec: str, seed: int, flag: str, dtype: torch.dtype):
    """A LoRA adapter directory (a LoRA run's final/): the student it names as its base, with the adapter
    merged into its weights."""
    where = f"{flag} {spec}"
    try:
        base = json.loads((directory / ADAPTER_CONFIG).read_bytes().decode("utf-8")).get("base_model_name_or_path")
    except (UnicodeDecodeError, json.JSONDecodeError, AttributeError) as err:
        raise SoftcacheError(f"{where}: {ADAPTER_CONFIG} is not a JSON mapping ({one_line(err)}); restore the "
                             "file") from err
    if not isinstance(base, str) or not base:
        raise SoftcacheError(f"{where}: {ADAPTER_CONFIG} names no base model (base_model_name_or_path); set it to the "
                             "student the adapter was trained on")
    model = build_student(base, seed, f"{where}: the adapter's base", dtype)
    try:
        from peft import PeftModel
    except ImportError:
        raise SoftcacheError(f"{where} is a LoRA adapter, which needs the peft package: pip install "
                             "'softcache[lora]'") from None
    try:
        with _quiet_transformers():
            return PeftModel.from_pretrained(model, directory).merge_and_unload()
    except Exception as err:  # a damaged or foreign adapter file raises many types
        raise SoftcacheError(f"{where}: the adapter does not load onto its base {base} ({one_line(err)}); give the "
                             "adapter's original base, or the merged model (--merge-lora)") from err


def _read_config(file: Path, flag: str):
    """``file`` parsed as a Hugging Face model config: UTF-8 JSON, a mapping, a ``model_type``
    transformers knows that has a causal LM, values its config class accepts."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    where = f"{flag} {file}"
    try:
        text = file.read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        raise SoftcacheError(f"{where} is not UTF-8 text (byte {err.start} is {err.object[err.start]:#04x}); "
                             "give a model config.json") from None
    except OSError as err:
        raise SoftcacheError(f"{where} cannot be read ({err.strerror or err})") from None
    try:
        settings = json.loads(text)
    except json.JSONDecodeError as err:
        raise SoftcacheError(f"{where} is not valid JSON: {err.msg} (line {err.lineno}, column {err.colno}); "
                             "give a model config.json") from None
    if not isinstance(settings, dict):
        raise SoftcacheError(f"{where} must hold a mapping of config keys, not a {type(settings).__name__}")
    model_type = settings.get("model_type")
    if not isinstance(model_type, str) or not model_type:
        raise SoftcacheError(f"{where} has no model_type; add one (e.g. \"model_type\": \"llama\") so transformers "
                             "knows the architecture")
    if model_type not in CONFIG_MAPPING:
        close = difflib.get_close_matches(model_type, list(CONFIG_MAPPING.keys()), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise SoftcacheError(f"{where}: model_type {model_type!r} is not one this transformers knows{hint}; use a "
                             "known model_type or upgrade transformers")
    if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise SoftcacheError(f"{where}: model_type {model_type!r} has no causal LM in transformers; give a "
                             "decoder-only model (e.g. llama, gpt2, qwen2)")
    try:
        return CONFIG_MAPPING[model_type].from_dict(settings)
    except Exception as err:  # each config class validates its own fields, raising many types
        raise SoftcacheError(f"{where} is not a valid {model_type} config ({one_line(err)}); fix the "
                             "value it names") from err


def _weight_files(directory: Path) -> list[Path]:
    """The weight files (and shard indexes) of a model directory."""
    return sorted(p for pattern in ("*.safetensors", "*.bin", "*.index.json") for p in directory.glob(pattern))


def _load_weights(directory: Path, files: list[Path], config, flag: str, dtype: torch.dtype):
    """The model of ``config`` with the weights in ``directory``; every weight it needs present with
    the shape the config gives it."""
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    for file in files:
        if file.suffix == ".safetensors":  # the header names each tensor's shape and where it lies
            try:
                with safe_open(str(file), framework="pt"):
                    pass
            except Exception as err:  # SafetensorError, OSError: a truncated or foreign file
                raise SoftcacheError(f"{flag} {directory}: the weights file {file.name} is damaged or not a "
                                     f"safetensors file ({one_line(err)}); replace it, or give a config.json to "
                                     "start from random weights") from err
    try:
        with _quiet_transformers():
            model, info = AutoModelForCausalLM.from_pretrained(directory, config=config, dtype=dtype,
                                                               output_loading_info=True, ignore_mismatched_sizes=True)
    except Exception as err:  # a damaged .bin or index raises many types
        raise SoftcacheError(f"{flag} {directory}: its weights could not be loaded ({one_line(err)}); replace "
                             "them, or give a config.json to start from random weights") from err
    if info["mismatched_keys"]:
        name, saved, wanted = sorted(info["mismatched_keys"])[0]
        raise SoftcacheError(f"{flag} {directory}: its weights do not fit its config.json ({len(info['mismatched_keys'])} "
                             f"tensors of a different shape, e.g. {name} is {list(saved)} in the weights but {list(wanted)} "
                             "by the config); give the config the weights were saved with")
    if info["missing_keys"]:
        missing = sorted(info["missing_keys"])
        raise SoftcacheError(f"{flag} {directory}: its weights lack {len(missing)} tensor(s) the model needs (e.g. {missing[0]}); "
                             "give the complete weights, or a config.json to start from random weights")
    return model


@contextlib.contextmanager
def _quiet_transformers():
    """transformers' own report of a failed load (a table on stderr) would follow our one line; the
    load's outcome is checked and reported here instead. Its deprecation notices about what peft
    calls are not the user's to act on either."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            yield
    finally:
        hf_logging.set_verbosity(level)


def check_compatible(model, store: Store, student_spec: str, tokenizers: str = "same", flag: str = "--student",
                     student_files: bool = True, view=None) -> None:
    """Refuse a student that is not a causal LM, admits fewer positions than it will read, cannot hold the
    ids it will read, or (with ``tokenizers="same"``) tokenizes differently from the store's teacher.
    ``view`` (softcache.view.View, with ``tokenizers="cross"``): the student reads the view's sequences and
    ids, not the store's. ``student_files=False``: ``student_spec`` only names a model built in Python (no
    files to find, no tokenizer among them)."""
    check_causal(model, student_spec, flag=flag)
    length, of = (view.max_length, f"the view {view.path}'s longest sequence has") if view else \
        (store.layout.seq_len, "the store's sequences have")
    if (limit := max_positions(model)) is not None and length > limit:
        raise SoftcacheError(f"{flag} {student_spec} admits {limit:,} positions but {of} {length:,} "
                             f"tokens; give the student max_position_embeddings >= {length:,}")
    needed, whose = (view.student_vocab, "its tokenizer") if view else (store.tokenizer.vocab_size, "the store's teacher")
    if output_vocab(model) < needed:
        raise SoftcacheError(
            f"{flag} {student_spec} has {output_vocab(model):,} output ids but {whose} uses "
            f"{needed:,}; give the student vocab_size >= {needed:,}"
        )
    if tokenizers != "same":
        return
    directory = find_student(student_spec, flag).directory if student_files else None
    if directory is None or not (directory / "tokenizer_config.json").exists():
        return
    mine = tokenizer_fingerprint(_load_tokenizer(directory, student_spec, flag,
                                                 "without tokenizer_config.json the store's tokenizer is used"))
    if mine != store.tokenizer.fingerprint:
        raise SoftcacheError(
            f"{flag} {student_spec} has a different tokenizer from the store's teacher; the targets' ids would "
            "mean other tokens (train it through a view with --tokenizers cross, or use a student with the teacher's "
            "tokenizer; --tokenizers trust-ids if its ids do mean the teacher's)"
        )


def student_tokenizer(student_spec: str, flag: str = "--student"):
    """The student's own tokenizer, from the files beside its config (for --tokenizers cross)."""
    directory = find_student(student_spec, flag).directory
    if directory is None or not (directory / "tokenizer_config.json").exists():
        raise SoftcacheError(f"{flag} {student_spec} has no tokenizer files (tokenizer_config.json); --tokenizers cross "
                             "aligns the store to the student's own tokenizer: save it beside the student's config")
    return _load_tokenizer(directory, student_spec, flag, "a student with another tokenizer needs it whole")


def load_tokenizer(spec: str, flag: str):
    """A tokenizer by directory or hub id (for softcache view --tokenizer)."""
    return _load_tokenizer(spec, spec, flag, "give a directory with tokenizer.json or tokenizer_config.json")


def _load_tokenizer(directory, student_spec: str, flag: str, advice: str):
    from transformers import AutoTokenizer

    try:
        with _quiet_transformers():
            return AutoTokenizer.from_pretrained(directory)
    except Exception as err:  # a damaged tokenizer file raises many types
        raise SoftcacheError(f"{flag} {student_spec}: its tokenizer files do not load ({one_line(err)}); repair or "
                             f"remove them ({advice})") from err


def check_causal(model, student_spec: str, length: int = 8, flag: str = "--student") -> None:
    """Refuse a model whose prediction at a position depends on tokens after it (a bidirectional
    encoder loaded as a causal LM, e.g. BERT without ``is_decoder``): next-token targets would leak.

    Checked by behaviour, whatever the architecture: changing the last of ``length`` random tokens
    must leave the logits of every earlier position unchanged."""
    vocab = model.get_input_embeddings().num_embeddings
    ids = torch.randint(0, vocab, (1, length), generator=torch.Generator().manual_seed(0))
    changed = ids.clone()
    changed[0, -1] = (ids[0, -1] + 1) % vocab
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            before = model(input_ids=ids.to(device)).logits[:, :-1].float()
            after = model(input_ids=changed.to(device)).logits[:, :-1].float()
    finally:
        model.train(was_training)
    if not torch.allclose(before, after, rtol=1e-4, atol=1e-5, equal_nan=True):
        kind = getattr(model.config, "model_type", type(model).__name__)
        raise SoftcacheError(f"{flag} {student_spec} ({kind}, {type(model).__name__}) is not a causal language "
                             "model: its earlier positions see later tokens; give a decoder-only model (for an "
                             "encoder that supports it, set is_decoder: true in its config)")


class Trunk(torch.nn.Module):
    """The student without its output projection: ``forward(input_ids)`` returns the final hidden
    states, for :func:`softcache.losses.linear_distillation_loss`. It holds the whole model, so
    DistributedDataParallel around it sees every parameter, the projection's included."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, **inputs) -> torch.Tensor:
        """[B, L, H] final hidden states; ``inputs`` (a mask, position ids) go to the base model."""
        return self.model.base_model(input_ids=input_ids, **inputs).last_hidden_state

    @property
    def projection(self) -> torch.Tensor:
        return self.model.get_output_embeddings().weight


def fusable(model, input_ids: torch.Tensor) -> bool:
    """Whether the model's logits are exactly ``base_model(...) @ lm_head.weight.T``: a bias-free
    linear head on the base model's last hidden state, with no scaling or soft-capping after it.

    Checked by structure and then numerically on the first few tokens of ``input_ids`` [B, L]."""
    head = model.get_output_embeddings()
    base = getattr(model, "base_model", None)
    if not isinstance(head, torch.nn.Linear) or head.bias is not None or base is None or base is model:
        return False
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            sample = input_ids[:1, :8]
            logits = model(input_ids=sample).logits.float()
            fused = (Trunk(model)(sample) @ head.weight.T).float()
    except Exception:  # any model whose base cannot be called this way is simply not fused
        return False
    finally:
        model.train(was_training)
    return logits.shape == fused.shape and torch.allclose(logits, fused, rtol=1e-4, atol=1e-4)


def save_student(model, store: Store, directory: Path) -> None:
    """``save_pretrained`` plus the tokenizer of ``store`` (a store, or a view: its ``tokenizer_path``), proven loadable (:func:`check_saved`), then swapped
    into place atomically (:func:`write_final`)."""
    write_final(store, directory, model.save_pretrained,
                lambda staging: check_saved(model, staging, with_tokenizer=store.tokenizer_path.is_dir()))


def write_final(store: Store, directory: Path, save: Callable[[Path], None], check: Callable[[Path], None]) -> None:
    """``save(staging)`` and the store's tokenizer into a staging directory beside ``directory``, then
    ``check(staging)`` (raising :class:`SoftcacheError` when it does not load back), then the swap into
    place. A failed write (a full disk) raises :class:`SoftcacheError` naming ``directory`` and leaves
    neither it nor the staging directory behind."""
    staging = directory.with_name(directory.name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        save(staging)
        copy_tokenizer(store, staging)
    except Exception as err:  # OSError, or safetensors' SafetensorError wrapping one
        shutil.rmtree(staging, ignore_errors=True)
        reason = err.strerror if isinstance(err, OSError) and err.strerror else one_line(err)
        raise SoftcacheError(f"could not save the student to {directory} ({reason}); the checkpoints are kept: "
                             "free space or fix the problem and rerun with --resume") from err
    check(staging)
    shutil.rmtree(directory, ignore_errors=True)
    staging.rename(directory)


def copy_tokenizer(store: Store, directory: Path) -> None:
    """The store's tokenizer files into ``directory`` (a model directory), when the store has them."""
    if store.tokenizer_path.is_dir():
        for item in store.tokenizer_path.iterdir():
            shutil.copy2(item, directory / item.name)


def check_saved(model, directory: Path, with_tokenizer: bool) -> None:
    """Raise :class:`SoftcacheError` unless ``directory`` loads back: its config, every weight of ``model``
    with its shape (read from the safetensors headers, not into memory), and the tokenizer."""
    from safetensors import safe_open
    from transformers import AutoConfig, AutoTokenizer

    try:
        AutoConfig.from_pretrained(directory)
        shapes = {}
        for file in sorted(directory.glob("*.safetensors")):
            with safe_open(str(file), framework="pt") as handle:
                shapes.update({name: tuple(handle.get_slice(name).get_shape()) for name in handle.keys()})
        state = model.state_dict()
        saved_storage = {state[name].untyped_storage().data_ptr() for name in shapes if name in state}
        # A weight tied to another (a shared embedding and head) is saved once, under the other's name.
        missing = [name for name, tensor in state.items()
                   if name not in shapes and tensor.untyped_storage().data_ptr() not in saved_storage]
        wrong = [name for name, tensor in state.items() if name in shapes and shapes[name] != tuple(tensor.shape)]
        if missing or wrong:
            raise ValueError(f"weights missing {missing[:3]} or of the wrong shape {wrong[:3]}")
        if with_tokenizer:
            AutoTokenizer.from_pretrained(directory)
    except Exception as err:  # any loader's failure means the saved model is not usable
        raise SoftcacheError(f"the saved student in {directory} does not load back ({one_line(err)}); the "
                             "checkpoints are kept: "
                             "rerun with --resume") from err

