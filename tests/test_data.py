"""The streaming reader: order, partition, padding, workers, resume."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
import torch
from torch.utils.data import DataLoader

from softcache.data import StoreDataset, batches_per_epoch, epoch_order, rank_batch
from softcache.store import Encoding, Layout

from test_store import write_store


def test_epoch_order_is_a_pure_permutation_local_to_shard_windows():
    sizes = [5, 3, 7, 5, 4, 6]
    a = epoch_order(sizes, seed=1, epoch=0, window=2)
    assert sorted(a.tolist()) == list(range(30))
    assert np.array_equal(a, epoch_order(sizes, seed=1, epoch=0, window=2))
    assert not np.array_equal(a, epoch_order(sizes, seed=1, epoch=1, window=2))
    assert not np.array_equal(a, epoch_order(sizes, seed=2, epoch=0, window=2))
    # Reads stay local: greedily cut the order into stretches touching at most `window` shards;
    # there are no more stretches than shard groups.
    shard_of = np.repeat(np.arange(len(sizes)), sizes)
    stretches, members = 1, set()
    for index in a:
        if len(members | {shard_of[index]}) > 2:
            stretches, members = stretches + 1, set()
        members.add(shard_of[index])
    assert stretches <= 3
    # window=1: each shard is read in one contiguous stretch.
    runs = np.count_nonzero(np.diff(shard_of[epoch_order(sizes, seed=4, epoch=0, window=1)])) + 1
    assert runs == len(sizes)


@pytest.mark.parametrize("world,batch", [(1, 4), (2, 3), (3, 2), (4, 5)])
def test_ranks_partition_every_sequence_exactly_once_with_equal_batch_counts(world, batch):
    order = epoch_order([7, 7, 9], seed=0, epoch=3)
    per_epoch = batches_per_epoch(len(order), batch * world)
    seen = []
    for rank in range(world):
        rows = [rank_batch(order, b, batch, world, rank) for b in range(per_epoch)]
        assert all(len(r) == batch for r in rows)
        seen += [i for r in rows for i in r.tolist() if i >= 0]
    assert sorted(seen) == list(range(23))


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("data") / "store"
    layout = Layout(num_sequences=23, seq_len=6, shard_size=5)
    write_store(root, "zarr", layout, Encoding("topp", 3, 500, "delta", "log8"))  # variable lengths, padded
    return root


def stream(dataset, workers=0, limit=None):
    loader = DataLoader(dataset, batch_size=None, num_workers=workers)
    out = []
    for batch in loader:
        out.append(batch)
        if limit is not None and len(out) == limit:
            break
    return out


def test_batches_have_the_promised_shapes_and_masks(store):
    dataset = StoreDataset(str(store), batch_size=4, epochs=1)
    batches = stream(dataset)
    assert len(batches) == 6  # ceil(23 / 4)
    first = batches[0]
    assert first["input_ids"].shape == (4, 6) and first["input_ids"].dtype == torch.int64
    assert first["target_ids"].shape == (4, 6, 3) and first["target_ids"].dtype == torch.int64
    assert first["target_logprobs"].dtype == torch.float32 and first["mask"].dtype == torch.bool
    assert torch.equal(first["labels"][:, :-1], first["input_ids"][:, 1:])
    assert torch.all(first["labels"][:, -1] == -100)
    last = batches[-1]
    assert last["mask"][:3].all() and not last["mask"][3].any()  # 23 = 5 x 4 + 3: one padding row
    assert torch.all(last["labels"][3] == -100)
    # A padding row is a point mass (slot 0 only), so no loss can see NaN.
    assert torch.all(last["target_logprobs"][3, :, 0] == 0) and torch.all(last["target_logprobs"][3, :, 1:] == -torch.inf)
    total_valid = sum(int(b["mask"][:, 0].sum()) for b in batches)
    assert total_valid == 23


def test_rows_match_the_store(store):
    from softcache import open_store

    dataset = StoreDataset(str(store), batch_size=4, epochs=1, seed=5)
    order = dataset.order(0)
    batch = stream(dataset, limit=1)[0]
    expected = open_store(store).read_rows(order[:4])
    assert torch.equal(batch["target_ids"], torch.from_numpy(expected["target_ids"]))
    assert torch.equal(batch["target_logprobs"], torch.from_numpy(expected["target_logprobs"]))
    assert (batch["target_logprobs"] == -torch.inf).any()  # some positions keep fewer than k ids
    assert torch.equal(batch["target_mask"], batch["target_logprobs"] > -torch.inf)
    assert batch["target_mask"][..., 0].all()


def _ids(batches):
    return [b["input_ids"].tolist() for b in batches]


@pytest.mark.parametrize("workers", [1, 2, 3])
@pytest.mark.parametrize("persistent", [False, True])
def test_workers_do_not_change_the_stream(store, workers, persistent):
    reference = stream(StoreDataset(str(store), batch_size=4, epochs=2))
    loader = DataLoader(StoreDataset(str(store), batch_size=4, epochs=2), batch_size=None, num_workers=workers,
                        persistent_workers=persistent)
    for _ in range(2 if persistent else 1):  # a persistent loader iterated twice gives the same stream
        assert _ids(list(loader)) == _ids(reference)


def test_resume_restores_the_exact_order(store):
    reference = stream(StoreDataset(str(store), batch_size=3, epochs=3))
    resumed = stream(StoreDataset(str(store), batch_size=3, epochs=3, start_batch=10))
    assert _ids(resumed) == _ids(reference[10:])
    assert [int(b["step"]) for b in resumed] == list(range(10, len(reference)))


def test_epochs_reshuffle_and_cover_everything(store):
    batches = stream(StoreDataset(str(store), batch_size=4, epochs=2))
    per_epoch = 6
    first = [row for b in batches[:per_epoch] for row, ok in zip(b["input_ids"].tolist(), b["mask"][:, 0]) if ok]
    second = [row for b in batches[per_epoch:] for row, ok in zip(b["input_ids"].tolist(), b["mask"][:, 0]) if ok]
    assert sorted(first) == sorted(second) and first != second
    assert [int(b["epoch"]) for b in batches] == [0] * 6 + [1] * 6


def test_two_ranks_split_a_global_batch(store):
    both = [stream(StoreDataset(str(store), batch_size=2, epochs=1, world_size=2, rank=r)) for r in (0, 1)]
    single = stream(StoreDataset(str(store), batch_size=4, epochs=1))
    assert len(both[0]) == len(both[1]) == len(single)
    for b0, b1, whole in zip(both[0], both[1], single):
        assert torch.equal(torch.cat([b0["input_ids"], b1["input_ids"]]), whole["input_ids"])


def test_sequence_range_holds_out_the_tail(store):
    train = StoreDataset(str(store), batch_size=4, stop=18, epochs=1)
    held = StoreDataset(str(store), batch_size=4, start=18, epochs=1, shuffle=False)
    assert sorted(train.order(0).tolist()) == list(range(18))
    assert held.order(0).tolist() == list(range(18, 23))
    with pytest.raises(ValueError, match="empty sequence range"):
        StoreDataset(str(store), batch_size=4, start=23)


@settings(max_examples=80, deadline=None)
@given(sizes=st.lists(st.integers(1, 40), min_size=1, max_size=8), batch=st.integers(1, 9), world=st.integers(1, 5),
       seed=st.integers(0, 2**31), epoch=st.integers(0, 5), window=st.integers(1, 4))
def test_any_partition_gives_every_rank_equal_batches_and_every_sequence_once(sizes, batch, world, seed, epoch,
                                                                               window):
    order = epoch_order(sizes, seed, epoch, window)
    assert sorted(order.tolist()) == list(range(sum(sizes)))
    per_epoch = batches_per_epoch(len(order), batch * world)
    seen = [rank_batch(order, b, batch, world, rank) for rank in range(world) for b in range(per_epoch)]
    assert all(len(rows) == batch for rows in seen)
    real = [int(i) for rows in seen for i in rows if i >= 0]
    assert sorted(real) == list(range(sum(sizes)))
    assert per_epoch * batch * world - len(real) < batch * world  # padding only in the last global batch
