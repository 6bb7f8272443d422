"""Every id and value code round-trips; lossy codes stay within their stated error."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from softcache.store.encoding import LOG8_STEP, RAGGED, Encoding, Ragged, concat, decode, encode, take


def canonical(ids: np.ndarray, values: np.ndarray) -> list:
    """Per position, the set of (id, value) pairs of real entries (order-free: delta sorts by id)."""
    out = []
    for row_ids, row_values in zip(ids.reshape(-1, ids.shape[-1]), values.reshape(-1, values.shape[-1])):
        keep = row_values > -np.inf
        out.append(sorted(zip(row_ids[keep].tolist(), row_values[keep].tolist())))
    return out


def targets(rng, shape, k, vocab, shape_kind="random", ragged=False):
    """Padded top-k-like targets: distinct ids (including 0 and V-1 somewhere), sorted log-probs."""
    count, length = shape
    ids = np.stack([rng.choice(vocab, k, replace=False) for _ in range(count * length)]).reshape(count, length, k)
    ids[0, 0, 0], ids[-1, -1, -1] = 0, vocab - 1
    if k > 1 and ids[0, 0, 1] == 0:
        ids[0, 0, 1] = 1
    if shape_kind == "flat":  # every id equally likely: the head holds k / V of the mass, all ties
        values = np.full((count, length, k), -math.log(vocab), dtype=np.float32)
    elif shape_kind == "peaked":  # one id holds all but 1e-9 of the mass
        values = np.full((count, length, k), math.log(1e-9 / vocab), dtype=np.float32)
        values[..., 0] = math.log1p(-1e-9)
    else:
        values = np.log(rng.dirichlet(np.ones(k + 1) * 0.3, size=(count, length))[..., :k] + 1e-30)
        values = -np.sort(-values, axis=-1).astype(np.float32)
    lengths = rng.integers(1, k + 1, (count, length)) if ragged else None
    if ragged:
        padding = np.arange(k) >= lengths[..., None]
        ids = np.where(padding, ids[..., :1], ids)
        values = np.where(padding, -np.inf, values).astype(np.float32)
    return {"input_ids": rng.integers(0, vocab, (count, length)), "ids": ids, "values": values, "lengths": lengths}


def kl_bucket(t: np.ndarray, q: np.ndarray) -> np.ndarray:
    """KL between two padded rows of log-probs over the same ids, with the tail as one more class."""
    p, r = np.exp(t.astype(np.float64)), np.exp(q.astype(np.float64))
    with np.errstate(invalid="ignore"):
        head = np.where(p > 0, p * (t - q), 0.0).sum(-1)
    tail_p, tail_r = np.clip(1 - p.sum(-1), 0, None), np.clip(1 - r.sum(-1), 1e-300, None)
    return head + np.where(tail_p > 0, tail_p * np.log(np.maximum(tail_p, 1e-300) / tail_r), 0.0)


@pytest.mark.parametrize("vocab", [50, 65536, 70000, 140000, 151936])
@pytest.mark.parametrize("ids_code", ["plain", "delta", "bitpack"])
@pytest.mark.parametrize("kind", ["topk", "topp"])
def test_ids_and_float16_values_roundtrip(vocab, ids_code, kind):
    rng = np.random.default_rng(vocab)
    encoding = Encoding(kind, 7, vocab, ids_code, "float16")
    data = targets(rng, (3, 5), 7, vocab, ragged=kind == "topp")
    ids, values = decode(encoding, encode(encoding, **data))
    assert ids.shape == values.shape == (3, 5, 7) and ids.dtype == np.int64 and values.dtype == np.float32
    expected = canonical(data["ids"], data["values"].astype(np.float16).astype(np.float32))
    assert canonical(ids, values) == expected
    # Padding repeats slot 0's id with -inf.
    assert np.all(np.where(values == -np.inf, ids == ids[..., :1], True))
    assert np.all(values[..., 0] > -np.inf)


@pytest.mark.parametrize("shape_kind", ["random", "flat", "peaked"])
@pytest.mark.parametrize("ragged", [False, True])
def test_log8_keeps_the_tail_exact_and_kl_small(shape_kind, ragged):
    rng = np.random.default_rng(7)
    vocab = 1000
    encoding = Encoding("topp" if ragged else "topk", 16, vocab, "delta", "log8")
    data = targets(rng, (4, 32), 16, vocab, shape_kind, ragged)
    ids, values = decode(encoding, encode(encoding, **data))
    # Same ids; compare in id order.
    order_in = np.argsort(np.where(data["values"] > -np.inf, data["ids"], vocab), axis=-1)
    order_out = np.argsort(np.where(values > -np.inf, ids, vocab), axis=-1)
    t = np.take_along_axis(data["values"], order_in, -1)
    q = np.take_along_axis(values, order_out, -1)
    np.testing.assert_array_equal(np.take_along_axis(data["ids"], order_in, -1)[t > -np.inf],
                                  np.take_along_axis(ids, order_out, -1)[q > -np.inf])
    # The decoded head sums to the exact head mass (float16 precision of the stored log tail).
    head_t, head_q = np.exp(t.astype(np.float64)).sum(-1), np.exp(q.astype(np.float64)).sum(-1)
    np.testing.assert_allclose(head_q, head_t, rtol=2e-3, atol=1e-6)
    # Stated error: before renormalisation each entry within 20 nats of the top is off by at most
    # LOG8_STEP / 2; renormalisation adds one shift per position.
    top = t.max(-1, keepdims=True)
    near = (t > top - 19.9) & (t > -np.inf)
    with np.errstate(invalid="ignore"):
        error = np.where(near, q - t, np.nan)[near.any(-1)]
    spread = np.nanmax(error, axis=-1) - np.nanmin(error, axis=-1)
    assert spread.max() <= LOG8_STEP + 1e-3  # float16-rounded inputs add a little
    kl = kl_bucket(t, q)
    assert kl.mean() < 1e-3 and kl.max() < 5e-3, (kl.mean(), kl.max())


def test_sampled_counts_roundtrip_as_log_frequencies():
    rng = np.random.default_rng(3)
    vocab, samples = 70000, 300
    encoding = Encoding("sampled", samples, vocab, "delta", "counts", samples)
    assert encoding.dtype("target_values") == np.uint16 and encoding.dtype("target_lengths") == np.uint16
    draws = np.sort(rng.zipf(1.5, size=(2 * 6, samples)) % vocab, axis=-1)
    ids = np.zeros((2 * 6, samples), dtype=np.int64)
    counts = np.zeros_like(ids)
    for row, d in enumerate(draws):
        unique, c = np.unique(d, return_counts=True)
        ids[row] = unique[0]
        ids[row, : len(unique)], counts[row, : len(unique)] = unique, c
    lengths = (counts > 0).sum(-1).reshape(2, 6)
    columns = encode(encoding, rng.integers(0, vocab, (2, 6)), ids.reshape(2, 6, samples),
                     counts.reshape(2, 6, samples), lengths)
    out_ids, logprobs = decode(encoding, columns)
    np.testing.assert_allclose(np.exp(logprobs).sum(-1), 1.0, rtol=1e-5)
    expected = np.where(counts > 0, np.log(np.maximum(counts, 1) / samples), -np.inf).astype(np.float32)
    got, want = canonical(out_ids, logprobs), canonical(ids.reshape(2, 6, samples), expected.reshape(2, 6, samples))
    assert [[i for i, _ in row] for row in got] == [[i for i, _ in row] for row in want]
    np.testing.assert_allclose([v for row in got for _, v in row], [v for row in want for _, v in row], rtol=1e-6)


def test_take_and_concat_select_sequences():
    rng = np.random.default_rng(5)
    encoding = Encoding("topp", 5, 300, "bitpack", "log8")
    a = encode(encoding, **targets(rng, (3, 4), 5, 300, ragged=True))
    b = encode(encoding, **targets(rng, (2, 4), 5, 300, ragged=True))
    both = concat([a, b])
    whole_ids, whole_values = decode(encoding, both)
    rows = np.array([4, 0, 3, 3])
    taken = take(both, rows)
    ids, values = decode(encoding, taken)
    np.testing.assert_array_equal(ids, whole_ids[rows])
    np.testing.assert_array_equal(values, whole_values[rows])
    for name in RAGGED:  # ragged columns stay Ragged, with offsets that span their entries
        for columns, n in ((a, 3), (both, 5), (taken, 4)):
            assert isinstance(columns[name], Ragged) and len(columns[name].offsets) == n + 1
            assert columns[name].offsets[-1] == len(columns[name].values)
    np.testing.assert_array_equal(taken["target_values"].values[:taken["target_values"].offsets[1]],
                                  b["target_values"].values[b["target_values"].offsets[1]:b["target_values"].offsets[2]])


def test_codes_are_small():
    encoding = Encoding("topk", 64, 49152, "delta", "log8")
    assert encoding.dtype("target_ids") == np.uint16 and encoding.dtype("target_values") == np.uint8
    assert Encoding("topk", 64, 151936, "bitpack", "log8").bits == 18
    assert Encoding("sampled", 50, 49152, "delta", "counts", 50).dtype("target_values") == np.uint8
    assert Encoding("topk", 4, 300).columns == ("input_ids", "target_ids", "target_values")


@settings(max_examples=60, deadline=None)
@given(vocab=st.integers(2, 300_000), k=st.integers(1, 9), positions=st.integers(1, 12),
       ids_code=st.sampled_from(["plain", "delta", "bitpack"]), ragged=st.booleans(), seed=st.integers(0, 2**32 - 1))
def test_any_vocab_k_and_lengths_roundtrip(vocab, k, positions, ids_code, ragged, seed):
    k = min(k, vocab)
    rng = np.random.default_rng(seed)
    encoding = Encoding("topp" if ragged else "topk", k, vocab, ids_code, "float16")
    data = targets(rng, (1, positions), k, vocab, ragged=ragged)
    ids, values = decode(encoding, encode(encoding, **data))
    assert canonical(ids, values) == canonical(data["ids"], data["values"].astype(np.float16).astype(np.float32))


# ---- masked and documents stores (chat corpora) ----------------------------------------------------

@pytest.mark.parametrize("kind,values_code", [("topk", "float16"), ("topk", "log8"), ("topp", "log8"),
                                              ("topp", "float16"), ("sampled", "counts")])
@pytest.mark.parametrize("ids_code", ["plain", "delta", "bitpack"])
def test_masked_positions_store_nothing_and_the_rest_roundtrips(kind, values_code, ids_code):
    rng = np.random.default_rng(11)
    vocab, k = 300, 6
    samples = 9 if values_code == "counts" else None
    data = targets(rng, (4, 10), k, vocab, ragged=kind != "topk")
    if values_code == "counts":
        data["values"] = np.where(data["values"] > -np.inf, rng.integers(1, 4, data["values"].shape), 0)
    teach = rng.random((4, 10)) < 0.4
    teach[1] = False  # a sequence with nothing to teach
    teach[2] = True
    masked = Encoding(kind, k, vocab, ids_code, values_code, samples, masked=True)
    plain = Encoding(kind, k, vocab, ids_code, values_code, samples)
    columns = encode(masked, **data, teach=teach)
    assert "target_lengths" in columns and (columns["target_lengths"][~teach] == 0).all()
    ids, values = decode(masked, columns)
    full_ids, full_values = decode(plain, encode(plain, **data))
    # Where a position teaches, exactly what the unmasked store holds; elsewhere a point mass on id 0.
    assert canonical(ids[teach], values[teach]) == canonical(full_ids[teach], full_values[teach])
    assert (ids[~teach] == 0).all() and (values[~teach][:, 0] == 0).all() and (values[~teach][:, 1:] == -np.inf).all()
    # Masked positions cost no target bytes: the ragged columns shrink in proportion.
    unmasked = encode(plain, **data)
    lengths = data["lengths"] if data["lengths"] is not None else np.full((4, 10), k)
    assert len(columns["target_values"].values) == lengths[teach].sum() < len(unmasked["target_values"].values)
    assert masked.to_dict()["masked"] is True and "masked" not in plain.to_dict()


def test_document_starts_roundtrip_and_are_checked():
    from softcache.store.consistency import column_problem
    from softcache.store.encoding import segments_of

    rng = np.random.default_rng(3)
    data = targets(rng, (3, 8), 4, 50)
    segments = np.array([[0, 0, 0, 1, 1, 2, 2, 2], [0] * 8, [0, 1, 2, 3, 4, 5, 6, 7]])
    encoding = Encoding("topk", 4, 50, "delta", "float16", documents=True)
    columns = encode(encoding, **data, segments=segments)
    starts = columns["document_starts"]
    assert starts.values.tolist() == [3, 5, 1, 2, 3, 4, 5, 6, 7] and starts.offsets.tolist() == [0, 2, 2, 9]
    np.testing.assert_array_equal(segments_of(starts, 8), segments)
    np.testing.assert_array_equal(segments_of(take(columns, np.array([2, 0]))["document_starts"], 8), segments[[2, 0]])
    assert column_problem(encoding, 8, 3, columns) is None
    for values, problem in (([3, 5, 0, 2, 3, 4, 5, 6, 7], "outside 1..7"), ([5, 3, 1, 2, 3, 4, 5, 6, 7], "increase"),
                            ([3, 5, 1, 2, 3, 4, 5, 6, 8], "outside 1..7")):
        damaged = {**columns, "document_starts": Ragged(np.array(values, dtype=np.uint32), starts.offsets)}
        assert problem in column_problem(encoding, 8, 3, damaged)
    # The step from one sequence's last start to the next one's first may go down.
    assert starts.values[1] > starts.values[2]


# ---- the ranked id code: a shard's own ranking, applied on disk only --------------------------------

def shard_data(rng, encoding, count=4, length=12, masked=False) -> dict:
    """encode()'s arguments for a shard whose target ids are mostly the shard's frequent input ids."""
    k, vocab = encoding.k, encoding.vocab_size
    frequent = rng.choice(vocab, min(vocab, 3 * k), replace=False)
    input_ids = frequent[rng.zipf(1.3, (count, length)) % len(frequent)]
    data = targets(rng, (count, length), k, vocab, ragged=not encoding.fixed_length)
    mostly_frequent = np.stack([rng.choice(frequent, k, replace=False) if rng.random() < 0.8 else row
                                for row in data["ids"].reshape(-1, k)]).reshape(data["ids"].shape)
    real = data["values"] > -np.inf
    ids = np.where(real, mostly_frequent, mostly_frequent[..., :1])
    values = data["values"]
    if encoding.values == "counts":
        values = np.where(real, rng.integers(1, encoding.samples, values.shape), 0)
    teach = rng.random((count, length)) < 0.5 if masked else None
    return {"input_ids": input_ids, "ids": ids, "values": values, "lengths": data["lengths"], "teach": teach}


def shard_columns(rng, encoding, **shape) -> dict:
    return encode(encoding, **shard_data(rng, encoding, **shape))


@pytest.mark.parametrize("kind,values_code,samples", [("topk", "log8", None), ("topp", "float16", None),
                                                      ("sampled", "counts", 40), ("sampled", "counts", 70000)])
@pytest.mark.parametrize("vocab", [300, 70000])
@pytest.mark.parametrize("masked", [False, True])
def test_ranked_ids_are_delta_in_memory_and_ranks_on_disk(kind, values_code, samples, vocab, masked):
    from softcache.store.encoding import from_disk, shard_ranking, to_disk

    rng = np.random.default_rng(vocab + (samples or 0))
    k = 6
    ranked = Encoding(kind, k, vocab, "ranked", values_code, samples, masked=masked)
    delta = Encoding(kind, k, vocab, "delta", values_code, samples, masked=masked)
    data = shard_data(rng, ranked, masked=masked)
    columns = encode(ranked, **data)
    # encode gives delta's columns; the ranking exists only on disk, and comes off exactly.
    same = encode(delta, **data)
    for name in columns:
        assert _equal(columns[name], same[name]), name
    disk = to_disk(ranked, columns)
    assert not np.array_equal(disk["target_ids"].values, columns["target_ids"].values)
    assert disk["target_ids"].values.dtype == columns["target_ids"].values.dtype
    back = from_disk(ranked, disk)
    for name in columns:
        assert _equal(back[name], columns[name]), name
    # On disk each position holds its ids' ranks, ascending, with the values that belong to them.
    ranking = shard_ranking(vocab, columns["input_ids"])
    disk_ids, disk_values = decode(delta, disk)
    ids, values = decode(ranked, columns)
    held = columns["target_lengths"] > 0 if masked else np.ones(columns["input_ids"].shape, dtype=bool)
    assert canonical(ranking[disk_ids][held], disk_values[held]) == canonical(ids[held], values[held])
    assert to_disk(delta, columns) is columns and from_disk(delta, columns) is columns


def _equal(a, b) -> bool:
    if isinstance(a, Ragged):
        return np.array_equal(a.values, b.values) and np.array_equal(a.offsets, b.offsets) and a.values.dtype == b.values.dtype
    return np.array_equal(a, b) and a.dtype == b.dtype


def test_the_ranking_puts_the_shards_frequent_input_ids_first_and_ties_in_id_order():
    from softcache.store.encoding import shard_ranking

    ranking = shard_ranking(8, np.array([[5, 5, 5, 2], [2, 7, 0, 5]]))
    assert ranking.tolist() == [5, 2, 0, 7, 1, 3, 4, 6]


def test_ranked_ids_compress_smaller_when_targets_follow_the_input_ids():
    from numcodecs import Zstd

    from softcache.store.encoding import to_disk

    rng = np.random.default_rng(0)
    ranked = Encoding("sampled", 16, 49152, "ranked", "counts", 16)
    columns = shard_columns(rng, ranked, count=16, length=64)
    size = {name: len(Zstd(level=9).encode(np.ascontiguousarray(c["target_ids"].values)))
            for name, c in (("delta", columns), ("ranked", to_disk(ranked, columns)))}
    assert size["ranked"] < 0.8 * size["delta"], size


@pytest.mark.parametrize("damage", ["rank past the vocabulary", "gaps that overflow"])
def test_ranks_outside_the_vocabulary_are_refused(damage):
    from softcache.store.consistency import loaded_columns
    from softcache.errors import StoreError

    rng = np.random.default_rng(2)
    ranked = Encoding("topk", 4, 300, "ranked", "log8")
    from softcache.store.encoding import to_disk

    disk = to_disk(ranked, shard_columns(rng, ranked))
    gaps = disk["target_ids"].values.copy()
    gaps[-1 if damage == "rank past the vocabulary" else 5] = 299 if damage == "rank past the vocabulary" else 65535
    disk["target_ids"] = Ragged(gaps, disk["target_ids"].offsets)
    with pytest.raises(StoreError, match="ranks fall outside the vocabulary of 300"):
        loaded_columns(ranked, 12, 4, disk)


@settings(max_examples=40, deadline=None)
@given(vocab=st.integers(2, 200_000), k=st.integers(1, 9), positions=st.integers(1, 12), masked=st.booleans(),
       kind=st.sampled_from(["topk", "topp", "sampled"]), seed=st.integers(0, 2**32 - 1))
def test_ranked_disk_form_roundtrips_for_any_shard(vocab, k, positions, masked, kind, seed):
    from softcache.store.encoding import from_disk, to_disk

    k = min(k, vocab)
    rng = np.random.default_rng(seed)
    samples = 5 if kind == "sampled" else None
    ranked = Encoding(kind, k, vocab, "ranked", "counts" if samples else "float16", samples, masked=masked)
    columns = shard_columns(rng, ranked, count=2, length=positions, masked=masked)
    back = from_disk(ranked, to_disk(ranked, columns))
    assert all(_equal(back[name], columns[name]) for name in columns)
