"""LoRA students: low-rank adapters (peft) trained on a frozen pretrained student.

peft puts the adapter layers inside the student's own modules, so the job goes on calling the
Hugging Face model itself: the fused loss (its head is still a plain linear map of the base model's
hidden states unless the head is given an adapter), DDP and evaluation see the same object as for a
full student, and peft's wrapper is kept only to save the adapter.

The trade-off: only the adapter trains, so the optimiser state and every checkpoint hold only the
adapter (megabytes, not the model), and a resumed run reads the frozen weights from ``--student``
again. To make that safe a checkpoint records the sha256 of the frozen weights, and a student that
changed since (edited in place, a newer snapshot in the hub cache) is refused instead of resumed
on other weights. Hashing costs one pass over the weights at start.

``final/`` holds the adapter as peft saves it (``PeftModel.from_pretrained(base, final)``; its config
names the student as base: the hub id and revision, or the directory), with ``merge`` also
``final/merged``, the student with the adapter merged into its weights for ``AutoModelForCausalLM``;
both with the store's tokenizer.
"""

from __future__ import annotations

import hashlib
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from softcache.config import ALL_LINEAR, TrainConfig
from softcache.errors import SoftcacheError, one_line
from softcache.student import StudentSource, check_saved, copy_tokenizer, write_final

MERGED = "merged"
"""The subdirectory of final/ that holds the merged student (--merge-lora)."""


@dataclass(frozen=True)
class LoraSettings:
    """The adapters' shape: rank, scaling (the update is alpha / r x B A), dropout, target modules."""

    r: int
    alpha: float
    dropout: float
    targets: str | tuple[str, ...]
    """``"all-linear"`` or module names, each matching a module whose path ends with it."""

    @classmethod
    def of(cls, config: TrainConfig) -> LoraSettings:
        return cls(config.lora_r, config.lora_alpha or 2.0 * config.lora_r, config.lora_dropout,
                   config.lora_targets())


def attach(model, settings: LoraSettings, source: StudentSource):
    """Freeze ``model`` and put adapters on the modules ``settings`` names, in place; returns peft's
    wrapper (for saving). The student must be pretrained: an adapter on random weights could not be
    loaded again anywhere but here."""
    if not source.weights:
        raise SoftcacheError(f"--lora-r trains an adapter on a pretrained student, but --student {source.spec} has no "
                             "weights (it would start from random ones); give a model directory with weights or a hub "
                             "id, or train every weight (--lora-r 0)")
    check_targets(model, settings.targets, source.spec)
    from peft import LoraConfig, get_peft_model

    targets = settings.targets if settings.targets == ALL_LINEAR else list(settings.targets)
    config = LoraConfig(r=settings.r, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                        target_modules=targets, task_type="CAUSAL_LM")
    with warnings.catch_warnings():  # transformers' deprecation notices about what peft calls
        warnings.simplefilter("ignore", FutureWarning)
        wrapper = get_peft_model(model, config, revision=source.hub.revision if source.hub else None)
    wrapper.peft_config["default"].base_model_name_or_path = source.base_name
    return wrapper


def linear_modules(model) -> list[str]:
    """The paths of ``model``'s linear layers (``torch.nn.Linear``, and transformers' ``Conv1D`` as in
    GPT-2): what adapters can be put on."""
    from transformers.pytorch_utils import Conv1D

    return [name for name, module in model.named_modules() if isinstance(module, (torch.nn.Linear, Conv1D))]


def check_targets(model, targets: str | tuple[str, ...], spec: str) -> None:
    """Refuse a target name that matches none of ``model``'s linear layers, listing the ones it has."""
    if targets == ALL_LINEAR:
        return
    names = linear_modules(model)
    for target in targets:
        if not any(name == target or name.endswith("." + target) for name in names):
            short = sorted({name.rsplit(".", 1)[-1] for name in names})
            raise SoftcacheError(f"--lora-target-modules: {target!r} is not a linear module of --student {spec}; its "
                                 f"linear modules are {', '.join(short)} (or give {ALL_LINEAR})")


def frozen_sha256(model) -> str:
    """sha256 over the frozen parameters' names, dtypes, shapes and bytes, in the model's order."""
    digest = hashlib.sha256()
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            continue
        tensor = parameter.detach().to("cpu").contiguous().reshape(-1)
        digest.update(f"{name}:{tensor.dtype}:{tuple(parameter.shape)};".encode())
        digest.update(tensor.view(torch.uint8).numpy())  # the tensor's own bytes, not a copy
    return digest.hexdigest()


def adapter_state(model) -> dict[str, torch.Tensor]:
    """The parameters that train (the adapter's), by name: what a checkpoint holds of a LoRA student."""
    return {name: parameter.detach() for name, parameter in model.named_parameters() if parameter.requires_grad}


def load_adapter_state(model, state: dict[str, torch.Tensor]) -> None:
    """Copy a checkpoint's :func:`adapter_state` into ``model``; ValueError or RuntimeError when it does
    not fit (other names or shapes)."""
    parameters = {name: p for name, p in model.named_parameters() if p.requires_grad}
    if set(state) != set(parameters):
        extra, missing = sorted(set(state) - set(parameters)), sorted(set(parameters) - set(state))
        raise ValueError(f"adapter tensors differ: {len(missing)} missing (e.g. {missing[:1]}), "
                         f"{len(extra)} unexpected (e.g. {extra[:1]})")
    with torch.no_grad():
        for name, parameter in parameters.items():
            parameter.copy_(state[name])


def save_adapter(wrapper, store, directory: Path, merge: bool) -> None:
    """The adapter into ``directory`` (peft's files and the store's tokenizer), with ``merge`` also the
    merged student into ``directory/merged``; each proven to load back before ``directory`` is swapped
    into place. Merging changes the job's model in place: this is the job's last step."""
    from peft import get_peft_model_state_dict

    expected = {name: tuple(t.shape) for name, t in
                get_peft_model_state_dict(wrapper, save_embedding_layers=False).items()}
    merged = []

    def save(staging: Path) -> None:
        wrapper.save_pretrained(staging, save_embedding_layers=False)
        if merge:
            merged.append(wrapper.merge_and_unload())
            merged[0].save_pretrained(staging / MERGED)
            copy_tokenizer(store, staging / MERGED)

    def check(staging: Path) -> None:
        check_saved_adapter(expected, staging, with_tokenizer=store.tokenizer_path.is_dir())
        if merge:
            check_saved(merged[0], staging / MERGED, with_tokenizer=store.tokenizer_path.is_dir())

    write_final(store, directory, save, check)


def check_saved_adapter(expected: dict[str, tuple], directory: Path, with_tokenizer: bool) -> None:
    """Raise :class:`SoftcacheError` unless ``directory`` holds a LoRA config peft reads and exactly the
    ``expected`` adapter tensors (names and shapes, read from the safetensors header), and the tokenizer."""
    from peft import PeftConfig
    from safetensors import safe_open
    from transformers import AutoTokenizer

    try:
        PeftConfig.from_pretrained(directory)
        with safe_open(str(directory / "adapter_model.safetensors"), framework="pt") as handle:
            shapes = {name: tuple(handle.get_slice(name).get_shape()) for name in handle.keys()}
        if shapes != expected:
            wrong = sorted(set(shapes.items()) ^ set(expected.items()))
            raise ValueError(f"adapter tensors differ from the trained ones, e.g. {wrong[:1]}")
        if with_tokenizer:
            AutoTokenizer.from_pretrained(directory)
    except Exception as err:  # any loader's failure means the saved adapter is not usable
        raise SoftcacheError(f"the saved adapter in {directory} does not load back ({one_line(err)}); the checkpoints "
                             "are kept: rerun with --resume") from err
