"""A store's batches in a student's tokens, through a view (softcache.view): what the cross-tokenizer
student trains on. Same order, partition and resume state as softcache.data (the view has one row
per store sequence); only what a batch holds changes.

Each item holds, over the student's positions (``L`` = the view's longest sequence; shorter ones are
padded and masked out): ``input_ids``, ``labels`` (the student's own next token wherever the store
teaches the text it starts in: every position of a plain store, the assistant's text of a masked
one), ``mask`` (positions with a KD term: the aligned ones that teach, and for ``projection`` only those
where some cached teacher id has a student token of the same bytes), the
teacher's targets at each aligned position carried over to the student's vocabulary
(``target_ids``, ``target_logprobs``: softcache.cross_losses.project_targets), the teacher's own
log-probabilities there for the sorted-distance loss (``teacher_logprobs``: all cached entries for
``uld``, the ones with no student id for ``hybrid``), ``segments`` for a documents store, ``step``
and ``epoch``.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from softcache.config import CROSS_LOSSES
from softcache.cross_losses import project_targets
from softcache.data import StoreDataset
from softcache.errors import SoftcacheError
from softcache.view import View

CROSS_INPUTS = ("teacher_logprobs",)
"""Batch entries beyond softcache.data's that the cross-tokenizer loss reads."""


class ViewDataset(StoreDataset):
    """:class:`softcache.data.StoreDataset` whose batches are in the student's tokens (module docstring).

    Args:
        view: path of a view of ``store``.
        cross_loss: one of :data:`CROSS_LOSSES`.
        Others as for :class:`softcache.data.StoreDataset`.
    """

    def __init__(self, store: str, view: str, batch_size: int, cross_loss: str = "projection",
                 verify_view: bool = True, **kwargs):
        super().__init__(store, batch_size, **kwargs)
        if cross_loss not in CROSS_LOSSES:
            raise ValueError(f"unknown cross-tokenizer loss {cross_loss!r}; choose from {CROSS_LOSSES}")
        self.view_path = str(view)
        self.cross_loss = cross_loss
        opened = View(view, verify=verify_view)
        self.student_vocab = opened.student_vocab
        self._view = None

    def read(self, rows: np.ndarray) -> dict[str, torch.Tensor]:
        teacher = super().read(rows)
        if self._view is None:  # opened in each DataLoader worker (its sha256 was checked when built)
            self._view = View(self.view_path, verify=False)
            self._student_of = torch.from_numpy(self._view.student_of)
        valid = rows >= 0
        student = self._view.rows(np.where(valid, rows, 0))
        return student_batch(teacher, student, valid, self._student_of, self.student_vocab, self.cross_loss)


def student_batch(teacher: dict, student: dict, valid: np.ndarray, student_of: torch.Tensor, student_vocab: int,
                  cross_loss: str) -> dict[str, torch.Tensor]:
    """The student-side batch (module docstring) from a teacher batch (softcache.data) and view rows."""
    ids, home, teacher_pos = (torch.from_numpy(student[name]) for name in ("ids", "home", "teacher_pos"))
    n, length = ids.shape
    if home.max() >= teacher["mask"].shape[1] or teacher_pos.max() >= teacher["mask"].shape[1] or home.min() < 0:
        raise SoftcacheError("a view row points outside its store sequence; the view is damaged (read with "
                             "--no-verify-shards?): delete it and build it again")
    rows = torch.arange(n)[:, None]
    inside = torch.arange(length)[None, :] < torch.from_numpy(student["lengths"])[:, None]
    inside &= torch.from_numpy(valid)[:, None]
    teach = teacher["mask"]  # [n, L_teacher]: real rows, and in a masked store the positions that teach
    labels = torch.full_like(ids, -100)
    taught = teach[rows, (home[:, 1:] - 1).clamp_min(0)] & inside[:, 1:]
    labels[:, :-1] = torch.where(taught, ids[:, 1:], -100)
    at = teacher_pos.clamp_min(0)
    aligned = (teacher_pos >= 0) & inside & teach[rows, at]
    k = teacher["target_ids"].shape[-1]
    target_ids = teacher["target_ids"][rows, at].reshape(-1, k)
    target_logprobs = teacher["target_logprobs"][rows, at].reshape(-1, k)
    projected_ids, projected_logprobs, matched = project_targets(target_ids, target_logprobs, student_of, student_vocab)
    matched = matched.reshape(n, length)
    batch = {
        "input_ids": ids,
        "labels": labels,
        "mask": aligned & matched if cross_loss == "projection" else aligned,
        "target_ids": projected_ids.reshape(n, length, k),
        "target_logprobs": projected_logprobs.reshape(n, length, k),
    }
    if cross_loss != "projection":
        raw = target_logprobs
        if cross_loss == "hybrid":  # the sorted distance takes only what the projection cannot carry
            raw = torch.where(student_of[target_ids] >= 0, -math.inf, raw)
        batch["teacher_logprobs"] = raw.reshape(n, length, k)
    batch["target_mask"] = batch["target_logprobs"] > -math.inf
    if "segments" in teacher:
        batch["segments"] = teacher["segments"][rows, home]
    return batch
