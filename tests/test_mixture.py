"""softcache.mixture: several corpora mixed by token share, deterministic, resumable, recorded.

The order is checked by its properties (every prefix keeps each corpus within one document of its
share; each corpus's documents come in their own order; where it stops), every shard of a mix is
rebuilt alone from its cursor and compared with the rows of one uninterrupted pass, and the job
records the mix in the manifest and resumes it byte for byte.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from softcache.config import CacheConfig
from softcache.corpus import python_docs, read_rows
from softcache.corpus_documents import Recipe, RowCounts, pad_id, positioned_documents
from softcache.corpus_stream import CorpusIndex, StreamedCorpus, index_corpus
from softcache.documents import Counts, document_rows, stream_documents
from softcache.errors import SoftcacheError
from softcache.mixture import Mixture, parse_weights

from conftest import chatml_tokenizer, train_tokenizer, write_conversations


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return train_tokenizer(tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture(scope="module")
def corpora(tmp_path_factory):
    """Three text corpora of very different document lengths: paragraphs, whole topics, one-liners
    (with empty rows)."""
    root = tmp_path_factory.mktemp("corpora")
    paragraphs = [p for topic in python_docs()[:30] for p in topic.split("\n\n")][:240]
    topics = python_docs()[50:65]
    lines = [line for topic in python_docs()[66:79] for line in topic.splitlines() if line.strip()][:400]
    lines[3] = lines[50] = ""
    for name, texts in (("paragraphs", paragraphs), ("topics", topics), ("lines", lines)):
        (root / f"{name}.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return [str(root / f"{name}.jsonl") for name in ("paragraphs", "topics", "lines")]


def mixed(paths, weights, stop="first_exhausted"):
    return Mixture([read_rows(path) for path in paths], weights, stop)


def source_documents(path, tokenizer):
    """One corpus's documents alone, as token-id tuples, in order."""
    recipe = Recipe.resolve(read_rows(path).shape)
    return [tuple(d.ids) for _, d in positioned_documents(read_rows(path), tokenizer, recipe, None, False, RowCounts())]


def mix_order(mixture, tokenizer):
    """(source, document ids) of every mixed document, in order, with the state it was given with."""
    recipe = Recipe.resolve(mixture.shape)
    return [(mixture.choose(place), tuple(d.ids), place)
            for place, d in positioned_documents(mixture, tokenizer, recipe, None, False, RowCounts())]


@pytest.mark.parametrize("weights", [[0.7, 0.3], [1, 1], [0.05, 0.95], [3, 1, 2]])
def test_every_prefix_keeps_each_corpus_within_a_document_of_its_share(tokenizer, corpora, weights):
    paths = corpora[:len(weights)]
    mixture = mixed(paths, weights)
    order = mix_order(mixture, tokenizer)
    alone = [source_documents(path, tokenizer) for path in paths]
    longest = max(len(d) for documents in alone for d in documents)
    share = [w / sum(weights) for w in weights]
    taken = [0] * len(paths)
    for source, ids, _ in order:
        taken[source] += len(ids)
        ahead = [t / s for t, s in zip(taken, share)]
        assert max(ahead) - min(ahead) <= longest / min(share) + 1e-9
    # Each corpus's documents in its own order, none skipped, and the mix ends when the corpus whose
    # turn it is has none left.
    for i, documents in enumerate(alone):
        assert [ids for source, ids, _ in order if source == i] == documents[:sum(s == i for s, _, _ in order)]
    finished = [i for i, documents in enumerate(alone) if sum(s == i for s, _, _ in order) == len(documents)]
    assert len(finished) >= 1
    tokens = [sum(len(ids) for s, ids, _ in order if s == i) for i in range(len(paths))]
    assert mixture.choose(tuple((None, t, 0, 0) for t in tokens)) in finished


def test_all_exhausted_reads_every_document_and_repeats_the_smaller_corpora(tokenizer, corpora):
    mixture = mixed(corpora[:2], [0.5, 0.5], "all_exhausted")
    order = mix_order(mixture, tokenizer)
    alone = [source_documents(path, tokenizer) for path in corpora[:2]]
    for i, documents in enumerate(alone):
        taken = [ids for source, ids, _ in order if source == i]
        repeats = -(-len(taken) // len(documents))
        assert taken == (documents * repeats)[:len(taken)] and len(taken) >= len(documents)
    passes = [max(place[i][3] for _, _, place in order) for i in range(2)]
    assert sorted(passes)[0] == 0 and sorted(passes)[1] >= 1  # the corpus with fewer tokens came round again


def test_a_mix_restarts_from_any_document_s_place(tokenizer, corpora):
    """From the place given with any document, the mix goes on exactly as it did: what a cursor relies on."""
    mixture = mixed(corpora, [2, 1, 1], "all_exhausted")
    order = mix_order(mixture, tokenizer)
    recipe = Recipe.resolve(mixture.shape)
    for at in (1, 7, len(order) // 2, len(order) - 3):
        place = json.loads(json.dumps(order[at][2]))  # as a saved index holds it
        again = positioned_documents(mixture, tokenizer, recipe, None, False, RowCounts(),
                                     start=tuple(tuple(p) for p in place))
        assert [tuple(d.ids) for _, d in again] == [ids for _, ids, _ in order[at:]]


def one_pass_rows(mixture, tokenizer, recipe, seq_len, max_sequences):
    documents = positioned_documents(mixture, tokenizer, recipe, None, False, RowCounts())
    counts = Counts(source=mixture.source)
    if recipe.packing == "stream":
        made = stream_documents(documents, seq_len, counts, max_sequences)
    else:
        made = document_rows(documents, seq_len, recipe.packing, recipe.long, pad_id(tokenizer), counts, max_sequences)
    return dict(made)


@pytest.mark.parametrize("packing,seq_len,shard_size,max_sequences,stop", [
    ("stream", 64, 3, None, "first_exhausted"), ("stream", 200, 1, 25, "all_exhausted"),
    ("documents", 128, 4, None, "first_exhausted"), ("none", 96, 5, 40, "all_exhausted")])
def test_every_shard_of_a_mix_rebuilt_alone_is_the_one_pass_rows(tokenizer, corpora, packing, seq_len, shard_size,
                                                                  max_sequences, stop):
    mixture = mixed(corpora, [0.6, 0.3, 0.1], stop)
    recipe = Recipe.resolve(mixture.shape, packing=packing)
    index = index_corpus(mixture, tokenizer, seq_len, shard_size, recipe, max_sequences=max_sequences)
    index = CorpusIndex.from_dict(json.loads(json.dumps(index.to_dict())))
    rows = one_pass_rows(mixture, tokenizer, recipe, seq_len, max_sequences)
    streamed = StreamedCorpus(index, mixture, tokenizer, recipe)
    assert streamed.num_sequences == len(rows) > 3 * shard_size
    for first in range(0, len(rows), shard_size):
        count = min(shard_size, len(rows) - first)
        ids, teach, _ = streamed.shard(first, count)
        np.testing.assert_array_equal(ids, np.stack([rows[n].ids for n in range(first, first + count)]))
        if packing != "stream":
            np.testing.assert_array_equal(teach, np.stack([rows[n].teach for n in range(first, first + count)]))
    mix = index.summary.mix
    assert mix["stop"] == stop and [s["data"] for s in mix["sources"]] == corpora
    assert sum(s["documents"] for s in mix["sources"]) == index.summary.documents
    assert sum(s["tokens"] for s in mix["sources"]) == index.summary.tokens_read


def test_the_job_records_the_mix_and_resumes_it_byte_for_byte(cache_config, corpora, tmp_path, monkeypatch):
    from softcache.cache_job import run_cache
    from softcache.store import StoreWriter, open_store

    from conftest import interrupted, store_files

    options = dict(data=corpora[:2], weights="0.8,0.2", max_sequences=30)
    run_cache(cache_config(out=str(tmp_path / "reference"), **options))
    config = cache_config(out=str(tmp_path / "resumed"), **options)
    interrupted(monkeypatch, StoreWriter, "write_shard", 3, lambda: run_cache(config))
    run_cache(config)
    assert store_files(tmp_path / "resumed") == store_files(tmp_path / "reference")
    corpus = open_store(str(tmp_path / "reference")).manifest["corpus"]
    assert corpus["source"] == " + ".join(corpora[:2])
    shares = [source["share"] for source in corpus["mix"]["sources"]]
    assert shares[0] == pytest.approx(0.8, abs=0.05) and sum(shares) == pytest.approx(1)
    from click.testing import CliRunner

    from softcache.cli import main

    shown = CliRunner().invoke(main, ["info", str(tmp_path / "reference")]).output
    assert f"mix         --mix-stop first_exhausted; {corpora[0]}: weight 0.8, {shares[0]:.1%} of tokens" in shown
    # Another weighting is another corpus: a store of the first refuses it rather than mixing two mixes.
    with pytest.raises(SoftcacheError):
        run_cache(cache_config(out=str(tmp_path / "reference"), **{**options, "weights": "0.5,0.5"}))


def test_several_corpora_without_weights_are_read_one_after_the_other(tokenizer, corpora):
    both = read_rows(corpora[:2])
    assert both.source == " + ".join(corpora[:2])
    assert list(both) == list(read_rows(corpora[0])) + list(read_rows(corpora[1]))


def test_the_command_line_takes_data_several_times(tmp_path, corpora, monkeypatch):
    from click.testing import CliRunner

    from softcache import cache_job
    from softcache.cli import main

    seen = []

    class Done:
        def summary(self):
            return "done"

    monkeypatch.setattr(cache_job, "run_cache", lambda config: seen.append(config) or Done())
    config = tmp_path / "mix.yaml"
    config.write_text(f"data: [{corpora[0]}, {corpora[1]}]\nweights: '3,1'\n")
    single = tmp_path / "single.yaml"
    single.write_text(f"data: {corpora[2]}\n")
    for args in (["--data", corpora[0], "--data", corpora[1], "--weights", "3,1"], ["--config", str(config)],
                 ["--config", str(single)], ["--data", corpora[2]]):
        result = CliRunner().invoke(main, ["cache", "--teacher", "t", *args, "--out", str(tmp_path / "out")])
        assert result.exit_code == 0, result.output
    assert [c.data for c in seen] == [corpora[:2], corpora[:2], corpora[2], corpora[2]]
    assert [c.weights for c in seen] == ["3,1", "3,1", None, None]


@pytest.mark.parametrize("options,message", [
    (dict(weights="0.7,0.3"), r"^--weights 0.7,0.3 mixes several corpora; give --data once per corpus"),
    (dict(data=["a", "b"], weights="0.7"), r"^--weights 0.7 gives 1 weights for 2 --data corpora"),
    (dict(data=["a", "b"], weights="0.7,-1"), r"^--weights 0.7,-1: every weight must be a positive finite number"),
    (dict(data=["a", "b"], weights="0.7,nan"), r"^--weights 0.7,nan: every weight must be a positive finite"),
    (dict(data=["a", "b"], weights="x,y"), r"^--weights x,y: give one number per --data"),
    (dict(data=["a", "b"], mix_stop="all_exhausted"), r"^--mix-stop all_exhausted applies to a mix; add --weights"),
    (dict(data=["a", ""]), r"^--data is given an empty value \('a', ''\); give each corpus a path"),
    (dict(data=["a", "b"], weights="1,inf"), r"^--weights 1,inf: every weight must be a positive finite number"),
])
def test_bad_mix_settings_are_one_line_naming_the_flag(options, message):
    config = CacheConfig(teacher="t", out="o", **{"data": "a", **options})
    with pytest.raises(SoftcacheError, match=message):
        config.validate()


def test_corpora_of_two_shapes_are_not_mixed(tmp_path, corpora):
    chat = tmp_path / "chat.jsonl"
    chat.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"},
                                             {"role": "assistant", "content": "hello"}]}) + "\n")
    with pytest.raises(SoftcacheError, match=r"holds messages rows but --data .*paragraphs.jsonl holds text rows; "
                                             r"the corpora of a mix must hold rows of one input shape"):
        mixed([corpora[0], str(chat)], [1, 1])
    blank = tmp_path / "blank.jsonl"
    blank.write_text("\n")
    with pytest.raises(SoftcacheError, match=r"^--data .*blank.jsonl holds no rows to mix$"):
        mixed([str(chat), str(blank)], [1, 1])


def test_a_chat_mix_packs_whole_conversations(tmp_path):
    tokenizer = chatml_tokenizer()
    for name, turns in (("short", 1), ("long", 4)):
        write_conversations(tmp_path / f"{name}.jsonl", 60, turns)
    mixture = mixed([str(tmp_path / "short.jsonl"), str(tmp_path / "long.jsonl")], [1, 1])
    recipe = Recipe.resolve(mixture.shape)
    index = index_corpus(mixture, tokenizer, 128, 4, recipe)
    streamed = StreamedCorpus(index, mixture, tokenizer, recipe)
    rows = one_pass_rows(mixture, tokenizer, recipe, 128, None)
    for first in range(0, len(rows), 4):
        count = min(4, len(rows) - first)
        np.testing.assert_array_equal(streamed.shard(first, count)[0],
                                      np.stack([rows[n].ids for n in range(first, first + count)]))
    documents = [s["documents"] for s in index.summary.mix["sources"]]
    assert documents[0] > 2 * documents[1]  # the same tokens from each: more of the short conversations


def test_weights_are_read_as_given_and_normalised_by_the_mix(corpora):
    assert parse_weights(None, 2) is None and parse_weights("7,3", 2) == [7.0, 3.0]
    assert mixed(corpora[:2], [7.0, 3.0]).weights == pytest.approx([0.7, 0.3])
    # Finite weights whose sum is not: the shares are still theirs.
    assert mixed(corpora[:2], parse_weights("1e308,1.5e308", 2)).weights == pytest.approx([0.4, 0.6])
