"""The teacher job end to end on a tiny random Llama teacher."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from softcache import SoftcacheError, StoreError, open_store
from softcache.cache_job import run_cache
from softcache.store import StoreWriter

from conftest import store_files


@pytest.mark.parametrize("format_name", ["zarr", "arrow"])
def test_stored_targets_equal_teacher_topk(cache_config, tiny_teacher, format_name):
    from transformers import AutoModelForCausalLM

    config = cache_config(format=format_name, temperature=0.7)
    result = run_cache(config)
    store = open_store(config.out)
    assert len(store) == 24 and store.complete
    assert result.manifest["layout"]["num_sequences"] == 24
    data = store.read(0, len(store))
    model = AutoModelForCausalLM.from_pretrained(tiny_teacher).eval()
    with torch.inference_mode():
        logits = model(input_ids=torch.from_numpy(data["input_ids"])).logits
    reference = torch.log_softmax(logits.float() / 0.7, dim=-1).topk(8, dim=-1)
    np.testing.assert_array_equal(data["target_ids"], reference.indices.numpy())
    # float16 rounding: relative error 2**-11 of the value
    np.testing.assert_allclose(data["target_logprobs"], reference.values.numpy(), rtol=2**-10, atol=1e-3)
    assert store.manifest["targets"]["temperature"] == 0.7
    # The teacher's own cross-entropy on the corpus (temperature 1, positions with a next token).
    ids = torch.from_numpy(data["input_ids"])
    ce = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
    assert store.manifest["totals"]["teacher_ce"] == pytest.approx(ce.item(), rel=1e-5)
    assert store.manifest["storage"]["ids"] == "uint16"
    assert store.verify() == []


def test_manifest_describes_the_store(cache_config):
    from transformers import AutoTokenizer

    config = cache_config()
    run_cache(config)
    store = open_store(config.out)
    m = store.manifest
    assert m["format_version"] == 1 and m["softcache_version"]
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
    original = StoreWriter.write_shard

    def crash_on_third_shard(self, index, arrays, **stats):
        if index == 2:
            raise KeyboardInterrupt("simulated kill")
        return original(self, index, arrays, **stats)

    monkeypatch.setattr(StoreWriter, "write_shard", crash_on_third_shard)
    with pytest.raises(KeyboardInterrupt):
        run_cache(interrupted)
    monkeypatch.setattr(StoreWriter, "write_shard", original)
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
