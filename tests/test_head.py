"""The kept output layer (softcache.head): the same logits as the model's own forward, only where it
is, and the model left as it was."""

from __future__ import annotations


import pytest
import torch
from transformers import AutoModelForCausalLM

from softcache.cache_job import TeacherJob, run_cache
from softcache.head import KeptHead
from softcache.store import open_store

CPU = torch.device("cpu")


@pytest.fixture
def teacher(tiny_teacher):
    return AutoModelForCausalLM.from_pretrained(tiny_teacher).eval()


def test_the_kept_head_gives_the_models_logits_bit_for_bit_in_one_kept_buffer(teacher):
    head = KeptHead.for_model(teacher, CPU)
    assert head is not None
    g = torch.Generator().manual_seed(0)
    buffers = []
    with torch.inference_mode():
        for batch, length in ((4, 16), (2, 16), (3, 9)):  # a shorter last batch reuses the buffer
            ids = torch.randint(0, teacher.config.vocab_size, (batch, length), generator=g)
            own = teacher(input_ids=ids, use_cache=False).logits
            with head.capturing():
                empty = teacher(input_ids=ids, use_cache=False).logits
                kept = head.logits(batch, length)
            assert empty.numel() == 0 and torch.equal(kept, own)
            buffers.append(head.buffer.data_ptr())
        assert len(set(buffers)) == 1
        # Left as it was: the model's own forward again.
        assert torch.equal(teacher(input_ids=ids, use_cache=False).logits, own)
    assert "forward" not in teacher.get_output_embeddings().__dict__


def test_a_model_that_changes_its_logits_after_the_layer_keeps_its_own_forward(teacher):
    class Capped(type(teacher)):
        def forward(self, *args, **kwargs):
            output = super().forward(*args, **kwargs)
            output.logits = 30 * torch.tanh(output.logits / 30)
            return output

    teacher.__class__ = Capped
    assert KeptHead.for_model(teacher, CPU) is None
    assert "forward" not in teacher.get_output_embeddings().__dict__


def test_no_kept_head_off_the_cpu_or_for_a_head_that_is_not_a_plain_linear(teacher):
    assert KeptHead.for_model(teacher, torch.device("meta")) is None
    teacher.get_output_embeddings()._hf_hook = object()  # placed by accelerate: its hook moves weights
    assert KeptHead.for_model(teacher, CPU) is None


def test_a_job_with_the_kept_head_writes_what_the_models_own_forward_writes(cache_config, tmp_path, monkeypatch):
    kept = run_cache(cache_config(out=str(tmp_path / "kept"), targets="sampled", samples=9))
    monkeypatch.setattr(KeptHead, "for_model", classmethod(lambda cls, model, device: None))
    own = run_cache(cache_config(out=str(tmp_path / "own"), targets="sampled", samples=9))
    assert kept.manifest["totals"]["content_sha256"] == own.manifest["totals"]["content_sha256"]
    assert kept.manifest["totals"]["teacher_ce"] == own.manifest["totals"]["teacher_ce"]


def test_the_job_probes_its_head_once_with_the_teacher_and_reports_what_it_spent_besides_the_forward(
        cache_config, monkeypatch):
    config = cache_config()
    with TeacherJob([config]) as job:
        job.load()
        assert job.head is not None  # probed with the teacher's loading, not in the timed teacher pass

        def probe_again(cls, model, device):
            raise AssertionError("the teacher pass probed the head again")

        monkeypatch.setattr(KeptHead, "for_model", classmethod(probe_again))
        job.open_stores()
        job.write()
        job.finish()
    assert job.head.buffer is not None  # the pass wrote its logits into the kept buffer
    assert job.stats["targets_seconds"] > 0 and job.stats["writer_cpu_seconds"] > 0
    assert len(open_store(config.out)) == 24
