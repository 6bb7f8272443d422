"""The teacher job end to end on a tiny random Llama teacher."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from softcache import SoftcacheError, StoreError, open_store
from softcache.cache_job import run_cache
from softcache.store import StoreWriter
from softcache.store.manifest import MANIFEST_SEAL, seal_problem

from conftest import interrupted as interrupted_run
from conftest import store_files


def teacher_logits(teacher, input_ids: np.ndarray) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(teacher).eval()
    with torch.inference_mode():
        return model(input_ids=torch.from_numpy(input_ids)).logits.float()


def by_id(ids: np.ndarray, values: np.ndarray):
    order = np.argsort(ids, axis=-1, kind="stable")
    return np.take_along_axis(ids, order, -1), np.take_along_axis(values, order, -1)


@pytest.mark.parametrize("format_name,ids,values", [("zarr", "plain", "float16"), ("arrow", "plain", "float16"),
                                                    ("zarr", None, None), ("arrow", "bitpack", "log8")])
def test_stored_targets_equal_teacher_topk(cache_config, tiny_teacher, format_name, ids, values):
    config = cache_config(format=format_name, temperature=0.7, ids=ids, values=values)
    result = run_cache(config)
    store = open_store(config.out)
    assert len(store) == 24 and store.complete
    assert result.manifest["layout"]["num_sequences"] == 24
    assert result.manifest["encoding"]["ids"] == (ids or {"zarr": "ranked", "arrow": "delta"}[format_name])
    data = store.read(0, len(store))
    logits = teacher_logits(tiny_teacher, data["input_ids"])
    reference = torch.log_softmax(logits / 0.7, dim=-1).topk(8, dim=-1)
    if ids == "plain":  # stored in the teacher's order
        np.testing.assert_array_equal(data["target_ids"], reference.indices.numpy())
    stored_ids, stored_values = by_id(data["target_ids"], data["target_logprobs"])
    want_ids, want_values = by_id(reference.indices.numpy(), reference.values.numpy())
    np.testing.assert_array_equal(stored_ids, want_ids)
    if values in ("log8", None):  # 1-byte codes (the default): within half a step, plus the renormalising shift
        assert np.abs(stored_values - want_values).max() < 0.1
    else:  # float16 rounding: relative error 2**-11 of the value
        np.testing.assert_allclose(stored_values, want_values, rtol=2**-10, atol=1e-3)
    assert store.manifest["targets"]["temperature"] == 0.7
    # The teacher's own cross-entropy on the corpus (temperature 1, positions with a next token).
    ids = torch.from_numpy(data["input_ids"])
    ce = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
    assert store.manifest["totals"]["teacher_ce"] == pytest.approx(ce.item(), rel=1e-5)
    assert store.manifest["encoding"]["dtypes"]["input_ids"] == "uint16"
    assert store.verify() == []


def test_topp_store_keeps_the_mass_it_promises(cache_config, tiny_teacher):
    config = cache_config(targets="topp", top_p=0.5, k=8)
    run_cache(config)
    store = open_store(config.out)
    data = store.read(0, len(store))
    real = data["target_logprobs"] > -np.inf
    assert real[..., 0].all() and (real.sum(-1) < 8).any()
    head = np.exp(data["target_logprobs"].astype(np.float64)).sum(-1)
    truncated = real.sum(-1) < 8  # a position cut before k ids reaches p (up to the 1-byte code's error)
    assert (head[truncated] > 0.5 - 1e-2).all()
    logits = teacher_logits(tiny_teacher, data["input_ids"])
    top = torch.softmax(logits, dim=-1).topk(8, dim=-1)
    for position in zip(*np.nonzero(truncated)[:2]):
        n = int(real[position].sum())
        assert sorted(data["target_ids"][position][:n].tolist()) == sorted(top.indices[position][:n].tolist())


def test_sampled_store_is_unbiased_and_independent_of_the_batch_size(cache_config, tiny_teacher, tmp_path):
    a = cache_config(targets="sampled", samples=40, seed=3, out=str(tmp_path / "a"))
    b = cache_config(targets="sampled", samples=40, seed=3, batch_size=3, out=str(tmp_path / "b"))
    run_cache(a)
    run_cache(b)
    store_a, store_b = open_store(a.out), open_store(b.out)
    assert store_a.manifest["totals"]["content_sha256"] == store_b.manifest["totals"]["content_sha256"]
    assert store_a.manifest["targets"]["kind"] == "sampled" and store_a.manifest["encoding"]["values"] == "counts"
    data = store_a.read(0, len(store_a))
    probs = np.exp(data["target_logprobs"].astype(np.float64))
    np.testing.assert_allclose(probs.sum(-1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(probs * 40, np.rint(probs * 40), atol=1e-4)  # counts / 40
    # Averaged over all positions, the draws' frequencies match the teacher's probabilities.
    teacher = torch.softmax(teacher_logits(tiny_teacher, data["input_ids"]), dim=-1).double().numpy()
    estimate = np.zeros_like(teacher)
    np.put_along_axis(estimate, data["target_ids"], 0.0, -1)
    flat_estimate = estimate.reshape(-1, estimate.shape[-1])
    np.add.at(flat_estimate, (np.repeat(np.arange(len(flat_estimate)), data["target_ids"].shape[-1]),
                              data["target_ids"].reshape(-1)), probs.reshape(-1))
    assert np.abs(flat_estimate.mean(0) - teacher.reshape(flat_estimate.shape).mean(0)).max() < 0.01
    c = cache_config(targets="sampled", samples=40, seed=4, out=str(tmp_path / "c"))
    run_cache(c)
    assert open_store(c.out).manifest["totals"]["content_sha256"] != store_a.manifest["totals"]["content_sha256"]


@pytest.mark.parametrize("targets", ["sampled", "topk"])
def test_a_teacher_with_nan_logits_is_refused_before_its_shard_is_written(cache_config, tiny_teacher, tmp_path, targets):
    """One NaN logit makes a row's targets meaningless, and sampled draws from it would still look valid."""
    import shutil

    from transformers import AutoModelForCausalLM

    broken = tmp_path / "nan-teacher"
    shutil.copytree(tiny_teacher, broken)
    model = AutoModelForCausalLM.from_pretrained(broken)
    with torch.no_grad():
        model.lm_head.weight[5] = float("nan")  # id 5's logit is NaN at every position
    model.save_pretrained(broken)
    config = cache_config(teacher=str(broken), targets=targets)
    with pytest.raises(SoftcacheError, match=r"^the teacher's logits are NaN in sequences 0 to 3: their targets would "
                                             r"be meaningless .*, so shard 0 is not written; a float16 teacher can "
                                             r"overflow: rerun with --dtype bfloat16 or float32"):
        run_cache(config)
    assert not open_store(config.out, allow_incomplete=True).complete


def test_manifest_describes_the_store(cache_config):
    from transformers import AutoTokenizer

    config = cache_config()
    run_cache(config)
    store = open_store(config.out)
    m = store.manifest
    assert m["format_version"] == 5 and m["softcache_version"] and seal_problem(m, MANIFEST_SEAL) is None
    assert m["teacher"]["config_sha256"] and m["teacher"]["dtype"] == "float32"
    assert m["tokenizer"]["vocab_size"] == 384 and len(m["tokenizer"]["fingerprint"]) == 64
    assert m["corpus"]["fingerprint"] and m["corpus"]["documents"] > 0
    assert m["config"]["k"] == 8 and m["config"]["batch_size"] == 4
    assert [(s["first"], s["count"]) for s in m["shards"]] == [(0, 5), (5, 5), (10, 5), (15, 5), (20, 4)]
    assert m["totals"]["tokens"] == 24 * 32
    tokenizer = AutoTokenizer.from_pretrained(store.tokenizer_path)
    assert tokenizer.eos_token_id == m["tokenizer"]["eos_token_id"]
    # Sequences are consecutive slices of the tokenized corpus.
    first_doc = json.loads(open(config.data).readline())["text"]
    expected = tokenizer(first_doc, add_special_tokens=False)["input_ids"][: 24 * 32]
    assert store.read(0, 24)["input_ids"].reshape(-1).tolist() == expected


def test_resume_after_interruption_is_byte_identical(cache_config, tmp_path, monkeypatch):
    reference = cache_config(out=str(tmp_path / "reference"))
    run_cache(reference)

    interrupted = cache_config(out=str(tmp_path / "interrupted"))
    interrupted_run(monkeypatch, StoreWriter, "write_shard", 3, lambda: run_cache(interrupted))  # during shard 2
    with pytest.raises(StoreError, match="incomplete"):
        open_store(interrupted.out)
    assert len(open_store(interrupted.out, allow_incomplete=True).shards) == 2

    result = run_cache(interrupted)
    assert result.sequences_written == 14  # shards 2, 3 and 4 only
    assert store_files(tmp_path / "interrupted") == store_files(tmp_path / "reference")
    assert open_store(interrupted.out).manifest["totals"] == open_store(reference.out).manifest["totals"]
    assert not (tmp_path / "interrupted" / "progress").exists()

    again = run_cache(interrupted)
    assert again.already_complete and "already complete" in again.summary()


def test_changed_settings_are_refused(cache_config):
    run_cache(cache_config())
    with pytest.raises(StoreError, match=r"targets\.k: store has 8, this run 16"):
        run_cache(cache_config(k=16))
    with pytest.raises(StoreError, match=r"layout\.num_sequences: store has 24, this run 12"):
        run_cache(cache_config(max_sequences=12))
    with pytest.raises(StoreError, match=r"storage\.format"):
        run_cache(cache_config(format="arrow"))
    # A top-k store met by a job of the default kind (as an old top-k store meets the new default): the kind
    # alone, not the dozen fields that follow from it.
    with pytest.raises(StoreError, match=r"holds a different store \(targets\.kind: store has \"topk\", this run "
                                         r"\"sampled\"\); use another directory"):
        run_cache(cache_config(targets="sampled"))


def test_teacher_problems_name_the_flag(cache_config, tmp_path):
    with pytest.raises(SoftcacheError, match="--k 999 is larger than the teacher's vocabulary"):
        run_cache(cache_config(k=999))
    with pytest.raises(SoftcacheError, match="--seq-len 512 exceeds the teacher's 256 positions"):
        run_cache(cache_config(seq_len=512, max_sequences=1))
    with pytest.raises(SoftcacheError, match="--teacher .* is not a directory"):
        run_cache(cache_config(teacher=str(tmp_path / "missing")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(SoftcacheError, match="has no config.json"):
        run_cache(cache_config(teacher=str(tmp_path / "empty")))
    assert not (tmp_path / "store").exists()  # nothing written before the checks pass


def test_one_teacher_pass_writes_several_stores_as_separate_jobs_would(cache_config, tmp_path):
    from softcache.cache_job import TeacherJob, cache_many

    configs = {"topk": cache_config(out=str(tmp_path / "alone-topk")),
               "sampled": cache_config(targets="sampled", samples=10, out=str(tmp_path / "alone-sampled")),
               "arrow": cache_config(format="arrow", k=4, out=str(tmp_path / "alone-arrow"))}
    for config in configs.values():
        run_cache(config)
    together = [cache_config(**{**config.to_dict(), "out": str(tmp_path / f"together-{name}")})
                for name, config in configs.items()]
    results = cache_many(together)
    assert [r.already_complete for r in results] == [False] * 3
    for name, result in zip(configs, results):
        alone = open_store(tmp_path / f"alone-{name}").manifest
        assert result.manifest["totals"]["content_sha256"] == alone["totals"]["content_sha256"]
        assert store_files(tmp_path / f"together-{name}") == store_files(tmp_path / f"alone-{name}")
    assert all(r.already_complete for r in cache_many(together))  # a rerun has nothing to do
    with pytest.raises(SoftcacheError, match="must share seq_len"):
        TeacherJob([configs["topk"], cache_config(seq_len=16, out=str(tmp_path / "other"))])
    with pytest.raises(SoftcacheError, match="same --out"):
        TeacherJob([configs["topk"], configs["topk"]])


def test_one_pass_writes_each_stores_missing_shards_once(cache_config, tmp_path, monkeypatch):
    from softcache.cache_job import cache_many

    def configs(prefix: str) -> list:
        return [cache_config(out=str(tmp_path / f"{prefix}-topk")),
                cache_config(targets="sampled", samples=10, out=str(tmp_path / f"{prefix}-sampled"))]

    for config in configs("reference"):
        run_cache(config)
    topk, sampled = configs("resumed")
    interrupted_run(monkeypatch, StoreWriter, "write_shard", 3, lambda: run_cache(topk))  # shards 0, 1 kept
    interrupted_run(monkeypatch, StoreWriter, "write_shard", 5, lambda: run_cache(sampled))  # shards 0-3 kept
    written = []
    original = StoreWriter.write_shard

    def recorded(writer, index, *args, **kwargs):
        written.append((writer.root.name, index))
        return original(writer, index, *args, **kwargs)

    monkeypatch.setattr(StoreWriter, "write_shard", recorded)
    cache_many([topk, sampled])
    assert sorted(written) == [("resumed-sampled", 4), ("resumed-topk", 2), ("resumed-topk", 3), ("resumed-topk", 4)]
    for name in ("topk", "sampled"):
        assert store_files(tmp_path / f"resumed-{name}") == store_files(tmp_path / f"reference-{name}")
