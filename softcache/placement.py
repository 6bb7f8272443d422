"""Placing a teacher bigger than one device: accelerate's big-model placement, one set of devices per rank.

``--device-map`` hands the teacher to transformers' ``from_pretrained(device_map=...)``: accelerate
splits it by whole layers over GPUs, CPU memory and disk, and hooks each layer to move its inputs
(and, for offloaded layers, its weights) to where it runs. The trade-off: the layers run one after
another, so one device works at a time and offloaded weights cross PCIe (or come off disk) on every
forward pass. Placement buys fitting, not speed; a teacher that fits one device is fastest on it
(``--device``). Where the layers live changes no value: a placed teacher writes the same store.

Under torchrun each rank places its own copy of the teacher on its own GPUs: a node's GPUs are cut
into consecutive slices of ``--gpus-per-rank`` (default: the node's GPUs divided evenly among its
ranks), the rank with LOCAL_RANK r taking GPUs r x n to r x n + n - 1 (:func:`rank_gpus`). GPU
numbers in ``--max-memory`` and in a device-map file count from the rank's first GPU, as they would
under ``CUDA_VISIBLE_DEVICES`` set to that slice, so one command line serves every rank.

The parsers here take no torch import, so softcache.config can check the flags' format early;
:func:`plan` checks them against the machine.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from softcache.errors import SoftcacheError
from softcache.settings import parse_size

STRATEGIES = ("auto", "balanced", "sequential")
"""--device-map values that let accelerate choose the placement (the rest are device-map files)."""
HOST_DEVICES = ("cpu", "disk")
GPU_SHARE = 0.9
"""Of a GPU's free memory, what a --max-memory that leaves it out lets the weights take: the rest holds
the activations and the [batch, length, vocabulary] logits (accelerate's own rule for one GPU)."""
def parse_max_memory(text: str) -> dict[int | str, int]:
    """``--max-memory`` (``0=20GiB,1=20GiB,cpu=64GiB``) as {rank-relative GPU number or "cpu": bytes}."""
    budget: dict[int | str, int] = {}
    for entry in text.split(","):
        device, equals, size = (part.strip() for part in entry.partition("="))
        if not equals or not device or not size:
            raise SoftcacheError(f"--max-memory {text}: {entry.strip()!r} is not DEVICE=SIZE; give e.g. "
                                 "0=20GiB,1=20GiB,cpu=64GiB")
        key: int | str = int(device) if device.isdigit() else device.lower()
        if key != "cpu" and not isinstance(key, int):
            raise SoftcacheError(f"--max-memory {text}: unknown device {device!r}; give a GPU number of this rank "
                                 "(0, 1, ...) or cpu")
        if key in budget:
            raise SoftcacheError(f"--max-memory {text}: {device} is given twice")
        value = parse_size(size)
        if value is None:
            raise SoftcacheError(f"--max-memory {text}: {size!r} is not a size; give a number of bytes or a number "
                                 "with a unit (KB, MB, GB, TB, KiB, MiB, GiB, TiB), e.g. 20GiB")
        budget[key] = value
    return budget


def _device_value(value) -> int | str | None:
    """A device-map file's device as a rank-relative GPU number, "cpu" or "disk"; None if it is none."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    if isinstance(value, str):
        text = value.strip().lower()
        if text in HOST_DEVICES:
            return text
        if text.startswith("cuda:") and text[5:].isdigit():
            return int(text[5:])
        if text.isdigit():
            return int(text)
    return None


def read_device_map(path: str) -> dict[str, int | str]:
    """A ``--device-map`` JSON file: {module name: rank-relative GPU number, "cpu" or "disk"}."""
    where = f"--device-map {path}"
    file = Path(path)
    if not file.is_file():
        raise SoftcacheError(f"{where} is not one of {', '.join(STRATEGIES)}, nor a JSON file mapping module names "
                             "to devices" + (" (it is a directory)" if file.is_dir() else " (no such file)"))
    try:
        data = json.loads(file.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as err:
        raise SoftcacheError(f"{where} is not UTF-8 text (byte {err.start} is {err.object[err.start]:#04x})") from None
    except json.JSONDecodeError as err:
        raise SoftcacheError(f"{where} is not valid JSON: {err.msg} (line {err.lineno}, column {err.colno})") from None
    except OSError as err:
        raise SoftcacheError(f"{where} cannot be read ({err.strerror or err})") from None
    if not isinstance(data, dict) or not data:
        raise SoftcacheError(f"{where} must map module names to devices, e.g. {{\"model.embed_tokens\": 0, "
                             "\"model.layers\": 1, \"model.norm\": 1, \"lm_head\": 1}")
    placed = {}
    for module, value in data.items():
        device = _device_value(value)
        if device is None:
            raise SoftcacheError(f"{where} puts {module!r} on {value!r}; give a GPU number (0, 1, ...), cuda:N, cpu "
                                 "or disk")
        placed[module] = device
    return placed


def rank_gpus(local_rank: int, local_world: int, node_gpus: int, gpus_per_rank: int | None = None) -> range:
    """The GPUs (numbered on the node) a rank places its teacher on: ``gpus_per_rank`` consecutive ones
    (default ``node_gpus // local_world``) from ``local_rank x gpus_per_rank``. Empty without GPUs."""
    if node_gpus == 0:
        if gpus_per_rank is not None:
            raise SoftcacheError(f"--gpus-per-rank {gpus_per_rank}: this machine has no CUDA GPU")
        return range(0)
    per = gpus_per_rank or node_gpus // local_world
    if per == 0:
        raise SoftcacheError(f"--device-map: {local_world} ranks on this node cannot share its {node_gpus} GPUs; run "
                             f"at most {node_gpus} ranks per node (torchrun --nproc-per-node), or use --device")
    if per * local_world > node_gpus:
        raise SoftcacheError(f"--gpus-per-rank {per} for {local_world} ranks on this node needs {per * local_world} "
                             f"GPUs; it has {node_gpus}")
    return range(local_rank * per, (local_rank + 1) * per)


def _gpu(number: int, gpus: Sequence[int], where: str) -> int:
    """The node's number of this rank's GPU ``number``; ``where`` says who asked for it."""
    if number < len(gpus):
        return gpus[number]
    if not gpus:
        raise SoftcacheError(f"{where} GPU {number}, but this machine has no CUDA GPU")
    mine = f"GPU 0 (cuda:{gpus[0]})" if len(gpus) == 1 else f"GPUs 0-{len(gpus) - 1} (cuda:{gpus[0]}-{gpus[-1]})"
    raise SoftcacheError(f"{where} GPU {number}, but this rank has {mine}; see --gpus-per-rank")


def on_rank(device_map: dict[str, int | str], gpus: Sequence[int], flag: str) -> dict[str, int | str]:
    """A device map with rank-relative GPU numbers, renumbered to the node's GPUs ``gpus``."""
    return {module: device if device in HOST_DEVICES else _gpu(device, gpus, f"{flag} puts {module} on")
            for module, device in device_map.items()}


def memory_budget(given: dict[int | str, int], gpus: Sequence[int], gpu_free: Callable[[int], int],
                  host_free: int, local_world: int, flag: str = "--max-memory") -> dict[int | str, int]:
    """The ``max_memory`` accelerate takes, in bytes by node GPU number and "cpu": ``given`` (rank-relative
    GPU numbers) where it says, else ``GPU_SHARE`` of each of the rank's GPUs' free memory and the host's
    free memory shared by the ranks on the node. Other GPUs are left out, so accelerate uses none of them."""
    for number in given:
        if isinstance(number, int):
            _gpu(number, gpus, f"{flag} names")  # one of the rank's
    budget: dict[int | str, int] = {gpu: given.get(number, int(GPU_SHARE * gpu_free(gpu)))
                                    for number, gpu in enumerate(gpus)}
    budget["cpu"] = given.get("cpu", host_free // local_world)
    return budget


@dataclass(frozen=True)
class Placement:
    """Where one rank's teacher goes: what ``from_pretrained`` is given (node GPU numbers)."""

    name: str
    """What the user gave as --device-map."""
    device_map: str | dict[str, int | str]
    max_memory: dict[int | str, int] | None
    gpu: int | None
    """The first GPU the placement may use, or None: it runs on the CPU."""

    @property
    def compute_device(self):
        """Where the layers run (a GPU, or the CPU when the placement uses none): decides --dtype auto."""
        import torch

        return torch.device("cpu") if self.gpu is None else torch.device("cuda", self.gpu)

    def from_pretrained_kwargs(self, offload_folder: str) -> dict:
        return {"device_map": self.device_map, "max_memory": self.max_memory, "offload_folder": offload_folder}


def plan(device_map: str, max_memory: str | None, gpus_per_rank: int | None, local_rank: int = 0,
         local_world: int = 1) -> Placement:
    """The placement of ``--device-map``/``--max-memory``/``--gpus-per-rank`` for the rank with
    ``local_rank`` of ``local_world`` on this node, checked against the node's GPUs."""
    import psutil  # an accelerate dependency
    import torch

    node_gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if device_map not in STRATEGIES:
        relative = read_device_map(device_map)
        on_gpus = any(device not in HOST_DEVICES for device in relative.values())
        gpus = rank_gpus(local_rank, local_world, node_gpus, gpus_per_rank) if on_gpus else range(0)
        placed = on_rank(relative, gpus, f"--device-map {device_map}")
        used = [device for device in placed.values() if device not in HOST_DEVICES]
        return Placement(device_map, placed, None, min(used) if used else None)
    gpus = rank_gpus(local_rank, local_world, node_gpus, gpus_per_rank)
    budget = memory_budget(parse_max_memory(max_memory) if max_memory else {}, gpus,
                           lambda gpu: torch.cuda.mem_get_info(gpu)[0], psutil.virtual_memory().available, local_world,
                           f"--max-memory {max_memory}")
    used = [gpu for gpu in gpus if budget[gpu] > 0]
    return Placement(device_map, device_map, budget, used[0] if used else None)


def _execution_device(module):
    """The device accelerate's hook on ``module`` runs it on, or None when it has no such hook."""
    hook = getattr(module, "_hf_hook", None)
    for each in getattr(hook, "hooks", (hook,)):  # a SequentialHook holds several
        device = getattr(each, "execution_device", None)
        if device is not None:
            return device
    return None


def unknown_modules(device_map: dict[str, int | str], model) -> list[str]:
    """The names in a device-map file that are no module of ``model`` ("" is the whole model)."""
    modules = {name for name, _ in model.named_modules()}
    return [name for name in device_map if name not in modules]


def output_device(model):
    """Where a placed teacher computes its logits: its output head's execution device.

    accelerate's top-level hook returns the outputs on the device the inputs came from, so the teacher
    loop sends the (small) input ids there: the [batch, length, vocabulary] logits then stay where the
    head made them, the targets are extracted there, and each layer's hook moves the ids and hidden
    states to its own device on the way."""
    import torch

    head = model.get_output_embeddings()
    device = _execution_device(head)
    if device is None and head.weight.device.type != "meta":
        device = head.weight.device
    if device is None:
        device = _execution_device(model) or "cpu"
    return torch.device("cuda", device) if isinstance(device, int) else torch.device(device)


def where(model) -> str:
    """The devices a placed teacher's modules are on, in model order: ``cuda:0, cuda:1, cpu, disk``."""
    devices = getattr(model, "hf_device_map", None) or {"": str(next(model.parameters()).device)}
    named = [f"cuda:{d}" if isinstance(d, int) else str(d) for d in devices.values()]
    return ", ".join(dict.fromkeys(named))
