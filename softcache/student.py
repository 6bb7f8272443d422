"""The student: building or loading it, checking it against a store, saving it for ``from_pretrained``.

A student is any Hugging Face causal LM. It must be able to emit every id the store holds (its
output vocabulary at least the teacher's), and, unless the user overrides it, tokenize text the
same way as the teacher. The saved model carries the store's tokenizer, so ``AutoTokenizer``
works on it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from softcache.errors import SoftcacheError
from softcache.models import output_vocab
from softcache.store import Store
from softcache.tokenizer import tokenizer_fingerprint


def build_student(spec: str, seed: int):
    """A model from a config.json (random init, seeded) or a model directory (weights if present)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(spec)
    if not path.exists():
        raise SoftcacheError(f"--student {spec} does not exist (give a config.json or a model directory)")
    config_file = path / "config.json" if path.is_dir() else path
    if not config_file.is_file():
        raise SoftcacheError(f"--student {spec} has no config.json")
    try:
        settings = json.loads(config_file.read_text())
        config = AutoConfig.for_model(**settings) if path.is_file() else AutoConfig.from_pretrained(path)
    except (ValueError, KeyError, json.JSONDecodeError) as err:
        raise SoftcacheError(f"--student {spec}: not a usable model config ({str(err).splitlines()[0]})") from err
    has_weights = path.is_dir() and (any(path.glob("*.safetensors")) or any(path.glob("*.bin")))
    torch.manual_seed(seed)
    try:
        if has_weights:
            return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        return AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    except (ValueError, OSError) as err:
        raise SoftcacheError(f"--student {spec}: could not build the model ({str(err).splitlines()[0]})") from err


def check_compatible(model, store: Store, student_spec: str, allow_tokenizer_mismatch: bool) -> None:
    """Refuse a student that is not a causal LM, cannot hold the store's ids, or tokenizes differently
    (unless allowed)."""
    check_causal(model, student_spec)
    needed = store.tokenizer.vocab_size
    if output_vocab(model) < needed:
        raise SoftcacheError(
            f"--student {student_spec} has {output_vocab(model):,} output ids but the store's teacher uses "
            f"{needed:,}; give the student vocab_size >= {needed:,}"
        )
    directory = Path(student_spec)
    if allow_tokenizer_mismatch or not directory.is_dir() or not (directory / "tokenizer_config.json").exists():
        return
    from transformers import AutoTokenizer

    mine = tokenizer_fingerprint(AutoTokenizer.from_pretrained(directory))
    if mine != store.tokenizer.fingerprint:
        raise SoftcacheError(
            f"--student {student_spec} has a different tokenizer from the store's teacher; the targets' ids would "
            "mean other tokens (use a student with the teacher's tokenizer, or --allow-tokenizer-mismatch)"
        )


def check_causal(model, student_spec: str, length: int = 8) -> None:
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
        raise SoftcacheError(f"--student {student_spec} ({kind}, {type(model).__name__}) is not a causal language "
                             "model: its earlier positions see later tokens; give a decoder-only model (for an "
                             "encoder that supports it, set is_decoder: true in its config)")


class Trunk(torch.nn.Module):
    """The student without its output projection: ``forward(input_ids)`` returns the final hidden
    states, for :func:`softcache.losses.linear_distillation_loss`. It holds the whole model, so
    DistributedDataParallel around it sees every parameter, the projection's included."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.base_model(input_ids=input_ids).last_hidden_state

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
    """``save_pretrained`` plus the store's tokenizer, proven loadable (:func:`check_saved`), then swapped
    into place atomically."""
    staging = directory.with_name(directory.name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        model.save_pretrained(staging)
        if store.tokenizer_path.is_dir():
            for item in store.tokenizer_path.iterdir():
                shutil.copy2(item, staging / item.name)
    except OSError as err:
        shutil.rmtree(staging, ignore_errors=True)
        raise SoftcacheError(f"could not save the student to {staging} ({err.strerror or err}); the checkpoints are "
                             "kept: free space or fix the problem and rerun with --resume") from err
    check_saved(model, staging, with_tokenizer=store.tokenizer_path.is_dir())
    shutil.rmtree(directory, ignore_errors=True)
    staging.rename(directory)


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
        raise SoftcacheError(f"the saved student in {directory} does not load back ({type(err).__name__}: "
                             f"{str(err).splitlines()[0] if str(err) else ''}); the checkpoints are kept: "
                             "rerun with --resume") from err

