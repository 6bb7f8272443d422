"""softcache.documents and softcache.corpus_documents: documents into fixed-length rows.

Packing is checked on hand-built documents whose rows are written out by hand, and for its
promises on random ones; the stream policy against a frozen copy of ``pack`` as it was before chat
rows; chat rows on a ChatML tokenizer trained here, by decoding the targets that teach.
"""

from __future__ import annotations

import hashlib
import json
import re

import numpy as np
import pytest

from softcache.chat import InputShape, TrainOn, render, teaching_positions
from softcache.corpus import python_docs, read_rows
from softcache.corpus_documents import Recipe, pack_rows
from softcache.documents import OPEN_ROWS, Document, PackedCorpus, fit, pack_documents
from softcache.errors import SoftcacheError

from conftest import CHATML, chatml_tokenizer, train_tokenizer

PAD = 99
FIRST = 1000  # the random documents' ids: FIRST + their number


def doc(start: int, length: int, teach=None) -> Document:
    """ids start, start + 1, ...; every position but the last teaches unless ``teach`` says otherwise."""
    teach = np.arange(length) < length - 1 if teach is None else np.asarray(teach, dtype=bool)
    return Document(np.arange(start, start + length, dtype=np.uint32), teach)


def rows_of(corpus: PackedCorpus):
    return corpus.input_ids.tolist(), corpus.teach.astype(int).tolist(), corpus.segments.tolist()


def test_documents_packing_by_hand():
    corpus = pack_documents([doc(10, 5), doc(20, 3), doc(30, 6), doc(40, 2), doc(50, 4), doc(60, 7)], 8,
                            "documents", "split", PAD)
    ids, teach, segments = rows_of(corpus)
    assert ids == [[10, 11, 12, 13, 14, 20, 21, 22],
                   [30, 31, 32, 33, 34, 35, 40, 41],
                   [50, 51, 52, 53, PAD, PAD, PAD, PAD],
                   [60, 61, 62, 63, 64, 65, 66, PAD]]
    assert teach == [[1, 1, 1, 1, 0, 1, 1, 0],
                     [1, 1, 1, 1, 1, 0, 1, 0],
                     [1, 1, 1, 0, 0, 0, 0, 0],
                     [1, 1, 1, 1, 1, 1, 0, 0]]
    assert segments == [[0, 0, 0, 0, 0, 1, 1, 1],
                        [0, 0, 0, 0, 0, 0, 1, 1],
                        [0, 0, 0, 0, 1, 1, 1, 1],  # padding: one more segment after the last document
                        [0, 0, 0, 0, 0, 0, 0, 1]]
    assert corpus.input_ids.dtype == np.uint32 and corpus.segments.dtype == np.int32 and corpus.teach.dtype == bool
    assert (corpus.documents, corpus.tokens_read, corpus.dropped_tokens) == (6, 27, 0)
    assert (corpus.teaching_positions, corpus.padding_positions) == (21, 5)
    # First fit: a document goes back into the oldest open row with room; each row keeps corpus order.
    ids, _, segments = rows_of(pack_documents([doc(10, 6), doc(20, 5), doc(30, 2)], 8, "documents", "split", PAD))
    assert ids == [[10, 11, 12, 13, 14, 15, 30, 31], [20, 21, 22, 23, 24, PAD, PAD, PAD]]
    assert segments == [[0, 0, 0, 0, 0, 0, 1, 1], [0, 0, 0, 0, 0, 1, 1, 1]]
    # none: one document per row.
    ids, teach, segments = rows_of(pack_documents([doc(10, 3), doc(20, 2)], 4, "none", "split", PAD))
    assert ids == [[10, 11, 12, PAD], [20, 21, PAD, PAD]]
    assert teach == [[1, 1, 0, 0], [1, 0, 0, 0]] and segments == [[0, 0, 0, 1], [0, 0, 1, 1]]


def _unpack(corpus: PackedCorpus) -> list[tuple[int, int]]:
    """(row, document number) of every document in the rows, read back from the segments: documents are
    built with every id equal to FIRST + number, and padding is checked to be PAD, teaching nothing."""
    placed = []
    for row, (ids, teach, segments) in enumerate(zip(corpus.input_ids, corpus.teach, corpus.segments)):
        assert (np.diff(segments) >= 0).all() and segments[0] == 0
        for segment in range(segments[-1] + 1):
            part = ids[segments == segment]
            if part[0] == PAD:
                assert segment == segments[-1] and (part == PAD).all() and not teach[segments == segment].any()
                continue
            assert (part == part[0]).all()
            placed.append((row, int(part[0]) - FIRST))
    return placed


@pytest.mark.parametrize("seed", range(4))
def test_documents_packing_keeps_every_document_whole_and_in_order(seed):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(2, 33, size=300)
    documents = [Document(np.full(n, FIRST + k, np.uint32), rng.random(n) < 0.7) for k, n in enumerate(lengths)]
    for document in documents:
        document.teach[-1], document.teach[0] = False, True
    corpus = pack_documents(documents, 32, "documents", "split", PAD)
    placed = _unpack(corpus)
    assert sorted(k for _, k in placed) == list(range(len(documents)))  # each once, whole (lengths checked below)
    for row in range(len(corpus.input_ids)):
        in_row = [k for r, k in placed if r == row]
        assert in_row == sorted(in_row)  # corpus order within a row
        segments = corpus.segments[row]
        for number, k in enumerate(in_row):
            assert (segments == number).sum() == lengths[k]
            assert corpus.teach[row][segments == number].tolist() == documents[k].teach.tolist()
    firsts = [min(k for r, k in placed if r == row) for row in range(len(corpus.input_ids))]
    assert firsts == sorted(firsts)  # rows in the order of their first document
    spans = [(min(k for r, k in placed if r == row), max(k for r, k in placed if r == row))
             for row in range(len(corpus.input_ids))]
    open_at = [sum(first <= k <= last for first, last in spans) for k in range(len(documents))]
    assert max(open_at) <= OPEN_ROWS  # never more rows open at once (from first document to last) than that
    assert corpus.padding_positions == corpus.input_ids.size - lengths.sum() == (corpus.input_ids == PAD).sum()
    assert corpus.padding_positions < 0.15 * corpus.input_ids.size  # one document per row: about 45%
    # max_sequences keeps the first rows of the same packing, having read no further than it needed.
    capped = pack_documents(iter(documents), 32, "documents", "split", PAD, max_sequences=10)
    assert capped.input_ids.tolist() == corpus.input_ids[:10].tolist()
    assert capped.segments.tolist() == corpus.segments[:10].tolist()
    assert capped.teach.tolist() == corpus.teach[:10].tolist()
    assert capped.documents < 120 and capped.dropped_tokens == capped.tokens_read - (capped.input_ids != PAD).sum()


def test_long_documents():
    long, short = doc(0, 20), doc(100, 3)
    truncated = pack_documents([long, short], 8, "documents", "truncate", PAD)
    assert rows_of(truncated) == (
        [list(range(8)), [100, 101, 102, PAD, PAD, PAD, PAD, PAD]],
        [[1] * 7 + [0], [1, 1, 0, 0, 0, 0, 0, 0]],  # the last kept position's target is cut off
        [[0] * 8, [0, 0, 0, 1, 1, 1, 1, 1]])
    assert (truncated.long_truncated, truncated.long_split, truncated.long_dropped) == (1, 0, 0)
    assert (truncated.tokens_read, truncated.dropped_tokens) == (23, 12)
    split = pack_documents([long, short], 8, "documents", "split", PAD)
    assert rows_of(split) == (
        [list(range(8)), list(range(8, 16)), [16, 17, 18, 19, 100, 101, 102, PAD]],
        [[1] * 7 + [0], [1] * 7 + [0], [1, 1, 1, 0, 1, 1, 0, 0]],
        [[0] * 8, [0] * 8, [0, 0, 0, 0, 1, 1, 1, 2]])  # each piece a document of its own
    assert (split.long_truncated, split.long_split, split.long_dropped, split.dropped_tokens) == (0, 1, 0, 0)
    dropped = pack_documents([long, short], 8, "none", "drop", PAD)
    assert dropped.input_ids.tolist() == [[100, 101, 102, PAD, PAD, PAD, PAD, PAD]]
    assert (dropped.long_dropped, dropped.dropped_tokens, dropped.documents) == (1, 20, 2)
    # A cut that leaves nothing teaching is left out: a long prompt whose reply lies past seq_len.
    late = doc(0, 20, teach=np.arange(20) >= 12)
    assert fit(late, 8, "truncate") == []
    assert [p.ids.tolist() for p in fit(late, 8, "split")] == [list(range(8, 16)), list(range(16, 20))]
    assert [p.teach.tolist() for p in fit(late, 8, "split")] == [[False] * 4 + [True] * 3 + [False],
                                                                  [True] * 3 + [False]]
    corpus = pack_documents([late, short], 8, "documents", "truncate", PAD)
    assert (corpus.long_truncated, corpus.long_dropped, corpus.dropped_tokens) == (0, 1, 20)
    with pytest.raises(SoftcacheError, match=r"^--data c.jsonl gives no row to cache: its 1 documents are all longer "
                                             r"than --seq-len 8 and --long drop leaves nothing of them that teaches$"):
        pack_documents([long], 8, "documents", "drop", PAD, source="c.jsonl")
    with pytest.raises(SoftcacheError, match="^nothing in the corpus teaches"):
        pack_documents([doc(0, 3, teach=[0, 0, 0])], 8, "documents", "split", PAD)


def test_fingerprint_covers_teach_and_segments_and_describe_keys():
    corpus = pack_documents([doc(10, 5), doc(20, 3)], 8, "documents", "split", PAD)
    other = pack_documents([doc(10, 5), doc(20, 3, teach=[1, 0, 0])], 8, "documents", "split", PAD)
    assert corpus.input_ids.tolist() == other.input_ids.tolist() and corpus.fingerprint != other.fingerprint
    resegmented = PackedCorpus(**{**corpus.__dict__, "segments": np.zeros_like(corpus.segments)})
    assert resegmented.fingerprint not in (corpus.fingerprint, other.fingerprint)
    stream = PackedCorpus(input_ids=corpus.input_ids, source="c", documents=2, tokens_read=8, dropped_tokens=0)  # a stream's fingerprint is the ids' alone, as ever
    assert stream.fingerprint == hashlib.sha256(corpus.input_ids.astype("<u4").tobytes()).hexdigest()
    assert list(stream.describe()) == ["source", "documents", "tokens_read", "dropped_tokens", "fingerprint"]
    assert corpus.describe() == {
        "source": "", "documents": 2, "tokens_read": 8, "dropped_tokens": 0, "fingerprint": corpus.fingerprint,
        "input_shape": "text", "chat_template_sha256": None, "train_on": "all", "packing": "documents",
        "long": "split", "bad_rows": 0, "long_truncated": 0, "long_split": 0, "long_dropped": 0,
        "teaching_positions": 6, "padding_positions": 0}


# ---- the stream: byte for byte what pack() wrote before chat rows ----


def _pack_before_chat(documents, tokenizer, seq_len, max_sequences=None):
    """softcache.corpus.pack as of commit cedcd65, verbatim but for the error messages: the reference."""
    eos = tokenizer.eos_token_id
    limit = None if max_sequences is None else max_sequences * seq_len
    pieces, total, n_docs, batch, empty = [], 0, 0, [], 0

    def flush():
        nonlocal total
        encoded = tokenizer(batch, add_special_tokens=False, return_attention_mask=False)["input_ids"]
        for ids in encoded:
            piece = np.empty(len(ids) + 1, dtype=np.uint32)
            piece[:-1] = ids
            piece[-1] = eos
            pieces.append(piece)
            total += len(piece)
        batch.clear()

    for text in documents:
        if not text or text.isspace():
            empty += 1
            continue
        batch.append(text)
        n_docs += 1
        if len(batch) == 512:
            flush()
            if limit is not None and total >= limit:
                break
    if batch and (limit is None or total < limit):
        flush()
    stream = np.concatenate(pieces)
    n_seq = len(stream) // seq_len
    if max_sequences is not None:
        n_seq = min(n_seq, max_sequences)
    used = n_seq * seq_len
    return {"input_ids": stream[:used].reshape(n_seq, seq_len), "documents": n_docs, "tokens_read": int(len(stream)),
            "dropped_tokens": int(len(stream) - used), "empty_documents": empty}


@pytest.fixture(scope="module")
def text_tokenizer(tmp_path_factory):
    return train_tokenizer(tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture(scope="module")
def paragraphs(tmp_path_factory):
    """1,500-odd paragraphs of the Python docs with some empty ones: more than one tokenizer batch."""
    texts = [p for topic in python_docs()[:60] for p in topic.split("\n\n")][:1500]
    texts[3] = texts[700] = ""
    path = tmp_path_factory.mktemp("paragraphs") / "p.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return path, texts


@pytest.mark.parametrize("seq_len,max_sequences", [(64, None), (64, 3), (257, 40), (1000, None), (16, 2000)])
def test_stream_is_what_pack_wrote_before(text_tokenizer, paragraphs, seq_len, max_sequences):
    path, texts = paragraphs
    before = _pack_before_chat(texts, text_tokenizer, seq_len, max_sequences)
    corpus = pack_rows(read_rows(str(path)), text_tokenizer, seq_len, max_sequences=max_sequences)
    assert corpus.teach is None and corpus.segments is None and corpus.packing == "stream"
    np.testing.assert_array_equal(corpus.input_ids, before["input_ids"])
    assert corpus.input_ids.dtype == before["input_ids"].dtype
    assert {k: getattr(corpus, k) for k in before if k != "input_ids"} == {k: v for k, v in before.items()
                                                                           if k != "input_ids"}
    assert corpus.fingerprint == hashlib.sha256(before["input_ids"].astype("<u4").tobytes()).hexdigest()


def test_text_rows_packed_as_documents(text_tokenizer, paragraphs):
    path, texts = paragraphs
    corpus = pack_rows(read_rows(str(path)), text_tokenizer, 128, packing="documents", max_sequences=20)
    assert corpus.long == "split" and corpus.train_on == "all"
    assert corpus.empty_documents == 1  # the other lies past the one tokenizer batch the first 20 rows needed
    eos = text_tokenizer.eos_token_id
    for ids, teach, segments in zip(corpus.input_ids, corpus.teach, corpus.segments):
        for segment in range(segments[-1] + 1):
            part, taught = ids[segments == segment], teach[segments == segment]
            if not taught.any():  # padding (EOS: the tokenizer has no pad token)
                assert segment == segments[-1] and (part == eos).all()
            elif part[-1] == eos:  # a document, or the last piece of a split one: all but its EOS teaches
                assert taught.tolist() == [True] * (len(part) - 1) + [False]
            elif taught.any():  # a piece cut off before its end
                assert taught.tolist() == [True] * (len(part) - 1) + [False] and len(part) == 128
    assert corpus.long_split > 0 and corpus.padding_positions > 0
    with pytest.raises(SoftcacheError, match=r"^--train-on assistant needs chat rows \(messages or prompt_completion\); "
                                             r"--data .*p.jsonl holds text rows, in which every position teaches"):
        pack_rows(read_rows(str(path)), text_tokenizer, 128, train_on="assistant")


def test_recipe_defaults_and_refusals():
    assert Recipe.resolve(InputShape.TEXT) == Recipe(InputShape.TEXT, TrainOn.ALL, "stream", "split")
    assert Recipe.resolve(InputShape.MESSAGES) == Recipe(InputShape.MESSAGES, TrainOn.ASSISTANT, "documents",
                                                         "truncate")
    assert Recipe.resolve(InputShape.PROMPT_COMPLETION, packing="none") == Recipe(
        InputShape.PROMPT_COMPLETION, TrainOn.COMPLETION, "none", "truncate")
    for args, message in [
        ((InputShape.MESSAGES, "auto", "stream"), "--packing stream joins text documents into one stream; messages "
                                                  "rows are packed whole: use --packing documents or none"),
        ((InputShape.TEXT, "completion"), "--train-on completion needs chat rows"),
        ((InputShape.TEXT, "auto", "auto", "truncate"), "--long truncate needs whole documents (--packing documents "
                                                        "or none); --packing stream cuts every document at row edges"),
    ]:
        with pytest.raises(SoftcacheError, match="^" + re.escape(message)):
            Recipe.resolve(*args)
    with pytest.raises(SoftcacheError, match=r"^--chat-template renders messages and prompt_completion rows; --data "
                                             r"c.txt holds text rows$"):
        Recipe.resolve(InputShape.TEXT, source="c.txt", chat_template=True)


# ---- chat rows ----

CHAT = [
    {"messages": [{"role": "user", "content": "What does len() return?"},
                  {"role": "assistant", "content": "The number of items."},
                  {"role": "user", "content": "And of an empty list?"},
                  {"role": "assistant", "content": "Zero."}]},
    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Is a tuple mutable?"},
                  {"role": "assistant", "content": "No."}]},
]
PAIRS = [{"prompt": "What is a set?", "completion": "An unordered collection."},
         {"prompt": [{"role": "user", "content": "What is a dict?"}, {"role": "assistant", "content": "A mapping."},
                     {"role": "user", "content": "Ordered?"}],
          "completion": [{"role": "assistant", "content": "Yes, by insertion."}]}]


@pytest.fixture(scope="module")
def chatml():
    return chatml_tokenizer()


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def taught(tokenizer, corpus: PackedCorpus) -> list[str]:
    """The decoded runs of target tokens, document by document: token t + 1 where position t teaches."""
    found = []
    for ids, teach, segments in zip(corpus.input_ids, corpus.teach, corpus.segments):
        for segment in range(segments[-1] + 1):
            part, taught_here = ids[segments == segment], teach[segments == segment]
            targets = np.concatenate([[False], taught_here[:-1]])  # the tokens those positions predict
            edges = np.flatnonzero(np.diff(np.concatenate([[0], targets.astype(np.int8), [0]])))
            found += [tokenizer.decode(part[lo:hi].tolist()) for lo, hi in zip(edges[::2], edges[1::2])]
    return found


@pytest.mark.parametrize("train_on,expected", [
    ("auto", ["The number of items.<|im_end|>", "Zero.<|im_end|>", "No.<|im_end|>"]),
    ("completion", ["Zero.<|im_end|>", "No.<|im_end|>"]),
])
def test_messages_rows_teach_the_chosen_turns(chatml, tmp_path, train_on, expected):
    corpus = pack_rows(read_rows(_jsonl(tmp_path / "c.jsonl", CHAT)), chatml, 256, train_on=train_on)
    assert taught(chatml, corpus) == expected
    assert corpus.input_ids.shape == (1, 256) and corpus.segments[0].max() == 2  # two conversations and padding
    assert (corpus.packing, corpus.long, corpus.input_shape) == ("documents", "truncate", "messages")
    assert corpus.train_on == ("assistant" if train_on == "auto" else train_on)
    assert corpus.chat_template_sha256 == hashlib.sha256(CHATML.encode()).hexdigest()
    assert (corpus.input_ids[0][corpus.segments[0] == 2] == chatml.eos_token_id).all()  # no pad token: EOS pads
    everything = pack_rows(read_rows(_jsonl(tmp_path / "c.jsonl", CHAT)), chatml, 256, train_on="all")
    assert everything.teaching_positions == everything.tokens_read - 2  # each conversation's last has no target


def test_pairs_teach_the_completion(chatml, tmp_path):
    corpus = pack_rows(read_rows(_jsonl(tmp_path / "p.jsonl", PAIRS[:1])), chatml, 128)
    assert taught(chatml, corpus) == ["An unordered collection.<|im_end|>"] and corpus.train_on == "completion"
    corpus = pack_rows(read_rows(_jsonl(tmp_path / "q.jsonl", PAIRS[1:])), chatml, 128, train_on="assistant")
    assert taught(chatml, corpus) == ["Yes, by insertion.<|im_end|>"]  # the prompt's assistant turn is context


def test_a_long_conversation_is_truncated_by_default(chatml, tmp_path):
    long = {"messages": [{"role": "user", "content": "Say it."}, {"role": "assistant", "content": "word " * 200}]}
    corpus = pack_rows(read_rows(_jsonl(tmp_path / "c.jsonl", [long, *CHAT])), chatml, 256)
    assert corpus.long_truncated == 1 and corpus.documents == 3
    whole = render(chatml, long, InputShape.MESSAGES, index=0)
    assert len(whole.input_ids) > 600 and corpus.input_ids[0].tolist() == whole.input_ids[:256].tolist()
    assert corpus.teach[0].tolist() == [*teaching_positions(whole.assistant)[:255], False]  # its target is cut off
    assert corpus.segments[1].max() == 2 and "; longer than 256 tokens: 1 truncated;" in corpus.summary()


def test_bad_rows_stop_the_job_or_are_skipped_and_counted(chatml, tmp_path):
    robot = {"messages": [{"role": "robot", "content": "beep"}, {"role": "assistant", "content": "hi"}]}
    path = _jsonl(tmp_path / "c.jsonl", [CHAT[0], robot, CHAT[1]])
    why = "row 1, column 'messages': turn 0 has the role 'robot'; roles are system, user, assistant, tool"
    with pytest.raises(SoftcacheError, match="^" + re.escape(f"--data {path}: {why} (rows count from 0; "
                                                             "--skip-bad-rows skips such rows)") + "$"):
        pack_rows(read_rows(path), chatml, 256)
    corpus = pack_rows(read_rows(path), chatml, 256, skip_bad_rows=True)
    assert (corpus.bad_rows, corpus.rows_read, corpus.documents) == (1, 3, 2)
    assert corpus.first_bad_row == f"--data {path}: {why}" and corpus.describe()["bad_rows"] == 1
    assert corpus.summary().endswith(f"; 1 bad rows skipped, the first: --data {path}: {why}")
    assert taught(chatml, corpus) == taught(chatml, pack_rows(read_rows(_jsonl(tmp_path / "good.jsonl",
                                                                              [CHAT[0], CHAT[1]])), chatml, 256))
    only_bad = _jsonl(tmp_path / "bad.jsonl", [robot, {"messages": "hello"}])
    with pytest.raises(SoftcacheError, match=r"^--data .*bad.jsonl has no rows to cache: all 2 of its rows are bad and "
                                             r"were skipped \(the first: --data .*bad.jsonl: row 0, column 'messages': "):
        pack_rows(read_rows(only_bad), chatml, 256, skip_bad_rows=True)


def test_pack_corpus_follows_the_flags(cache_config, tmp_path, monkeypatch):
    from softcache import cache_job
    from softcache.teacher import load_tokenizer, resolve_source

    notes = []
    monkeypatch.setattr(cache_job, "note", lambda ranks, message: notes.append(message))
    config = cache_config()
    tokenizer = load_tokenizer(resolve_source(config.teacher))
    corpus = cache_job.pack_corpus(config, tokenizer)  # text: the stream of before, its note line unchanged
    texts = [json.loads(line)["text"] for line in open(config.data)]
    np.testing.assert_array_equal(corpus.input_ids, _pack_before_chat(texts, tokenizer, 32, 24)["input_ids"])
    assert notes[-1] == (f"corpus {config.data}: 20 documents, 24 sequences of 32 tokens "
                         "(31,981 trailing tokens dropped)")
    assert corpus.describe().keys() == {"source", "documents", "tokens_read", "dropped_tokens", "fingerprint"}
    template = tmp_path / "chatml.jinja"
    template.write_text(CHATML, encoding="utf-8")
    chat = cache_config(data=_jsonl(tmp_path / "c.jsonl", CHAT * 5), chat_template=str(template), seq_len=512,
                        max_sequences=None, train_on="completion", packing="none")
    corpus = cache_job.pack_corpus(chat, tokenizer)
    assert corpus.input_ids.shape == (10, 512) and (corpus.segments.max(axis=1) == 1).all()
    assert taught(tokenizer, corpus) == ["Zero.<|im_end|>", "No.<|im_end|>"] * 5
    assert corpus.chat_template_sha256 == hashlib.sha256(CHATML.encode()).hexdigest()
    assert notes[-1].startswith(f"corpus {chat.data}: messages rows, 10 documents; 10 rows of 512 tokens (--packing "
                                "none), ") and "of positions teach (--train-on completion), " in notes[-1]
