"""Shared fixtures: a tiny random Llama teacher with a tokenizer trained here, and small corpora.

Nothing is downloaded: the tokenizer is trained on Python's own documentation text and the model
is random-initialised from a LlamaConfig.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from softcache.config import CacheConfig
from softcache.corpus import python_docs

TINY_VOCAB = 384

# SmolLM2-135M-Instruct's template, verbatim: ChatML, a default system prompt when none is given,
# no {% generation %} markers.
CHATML = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\n"
    "You are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# A chat template that costs the tiny teacher's tokenizer few tokens (it spells ChatML's markers byte by
# byte): each turn is its role's initial, its content and the <eos> special token.
COMPACT_TEMPLATE = ("{% for message in messages %}{{ message['role'][0] + ': ' + message['content'] + '<eos>' + '\\n' }}"
                    "{% endfor %}{% if add_generation_prompt %}{{ 'a: ' }}{% endif %}")
SMOLLM_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"


def train_tokenizer(directory: Path, vocab_size: int = TINY_VOCAB):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE(unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    core.train_from_iterator(python_docs()[:40], trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<eos>", unk_token="<unk>")
    tokenizer.save_pretrained(directory)
    return tokenizer


def make_teacher(directory: Path, vocab_size: int = TINY_VOCAB, seed: int = 0) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = train_tokenizer(directory, vocab_size)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=256,
                         eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    with torch.no_grad():  # sharper logits than the default init, so top-k is not near-uniform
        model.lm_head.weight.mul_(20)
    model.save_pretrained(directory)
    return directory


def train_bpe(pre_tokenizer, decoder, special: list[str], alphabet: list[str]):
    """A byte-pair tokenizer (vocabulary 400) trained on 20 topics of the Python docs, with ``special`` tokens."""
    from tokenizers import Tokenizer, models, trainers

    core = Tokenizer(models.BPE(unk_token="<unk>"))
    core.pre_tokenizer, core.decoder = pre_tokenizer, decoder
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", *special], initial_alphabet=alphabet)
    core.train_from_iterator(python_docs()[:20], trainer=trainer)
    return core


def fast_tokenizer(core, template: str | None, bos: str | None = None, **tokens):
    """A transformers fast tokenizer around a copy of ``core``, with the chat ``template``."""
    from tokenizers import Tokenizer, processors
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer.from_str(core.to_str())
    if bos:  # as the real Llama tokenizers do: BOS added by default, which a template's BOS must not double
        core.post_processor = processors.TemplateProcessing(single=f"{bos} $A",
                                                            special_tokens=[(bos, core.token_to_id(bos))])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", bos_token=bos, **tokens)
    tokenizer.chat_template = template
    return tokenizer


def chatml_tokenizer():
    """A byte-level tokenizer with SmolLM2's ChatML template, <|im_end|> as its EOS and no pad token."""
    from tokenizers import decoders, pre_tokenizers

    core = train_bpe(pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel(),
                     ["<eos>", "<|im_start|>", "<|im_end|>"], pre_tokenizers.ByteLevel.alphabet())
    return fast_tokenizer(core, CHATML, eos_token="<|im_end|>")


@pytest.fixture(scope="session")
def tiny_teacher(tmp_path_factory) -> Path:
    return make_teacher(tmp_path_factory.mktemp("teacher") / "tiny-llama")


@pytest.fixture(scope="session")
def corpus_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "docs.jsonl"
    with open(path, "w") as handle:
        for text in python_docs()[40:60]:
            handle.write(json.dumps({"text": text, "id": len(text)}) + "\n")
    return path


@pytest.fixture
def cache_config(tiny_teacher, corpus_file, tmp_path):
    """A factory of small, fast CacheConfigs; keyword arguments override fields."""

    def build(**overrides) -> CacheConfig:
        options = dict(teacher=str(tiny_teacher), data=str(corpus_file), out=str(tmp_path / "store"),
                       seq_len=32, max_sequences=24, targets="topk", k=8, batch_size=4, shard_size=5, progress=False)
        options.update(overrides)
        return CacheConfig(**options)

    return build


def store_files(root: Path) -> dict[str, bytes]:
    """Every shard data file of a store, by relative path (manifest and tokenizer excluded)."""
    skip = ("manifest.json", "tokenizer/", "progress/")
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and not str(p.relative_to(root)).startswith(skip)}


def interrupted(monkeypatch, target, name: str, at_call: int, run) -> None:
    """Call ``run()`` while ``target.name`` raises KeyboardInterrupt on its ``at_call``-th call (a kill
    in the middle of the job), then put the original back."""
    original = getattr(target, name)
    calls = {"n": 0}

    def killed(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == at_call:
            raise KeyboardInterrupt("simulated kill")
        return original(*args, **kwargs)

    monkeypatch.setattr(target, name, killed)
    try:
        with pytest.raises(KeyboardInterrupt):
            run()
    finally:
        monkeypatch.setattr(target, name, original)


def edit_manifest(root: Path, change) -> dict:
    """Apply ``change(manifest)`` (in place, or returning a new dict) to the store at ``root`` and write
    it back sealed, as a deliberate edit that only the checks after the seal's can catch."""
    from softcache.store.manifest import MANIFEST_SEAL, sealed

    path = Path(root) / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest = change(manifest) or manifest
    path.write_text(json.dumps(sealed(manifest, MANIFEST_SEAL)))
    return manifest


def with_shard(manifest: dict, index: int, **changes) -> dict:
    """``manifest`` with shard ``index``'s record changed (a copy)."""
    shards = [dict(s) for s in manifest["shards"]]
    shards[index].update(changes)
    return {**manifest, "shards": shards}


def with_digest_everywhere(manifest: dict, index: int) -> dict:
    """``manifest`` with shard ``index``'s content digest edited and the totals made to agree: the table
    adds up, so only the shard's columns disagree with what its record says."""
    from softcache.store.consistency import store_content_digest
    from softcache.store.manifest import ShardRecord

    manifest = with_shard(manifest, index, content_sha256="ab" * 32)
    digest = store_content_digest([ShardRecord.from_dict(s) for s in manifest["shards"]])
    return {**manifest, "totals": {**manifest["totals"], "content_sha256": digest}}


def edit_record(path: Path, change) -> None:
    """Like :func:`edit_manifest`, for one progress record."""
    from softcache.store.manifest import RECORD_SEAL, sealed

    record = json.loads(path.read_text())
    record = change(record) or record
    path.write_text(json.dumps(sealed(record, RECORD_SEAL)))


STUDENT = {"model_type": "llama", "vocab_size": TINY_VOCAB, "hidden_size": 32, "intermediate_size": 64,
           "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 2, "max_position_embeddings": 64}
"""The tiny student's config.json (a 1-layer Llama for the tiny teacher's vocabulary)."""


def make_student(directory: Path, seed: int = 7) -> Path:
    """A "pretrained" student: the tiny Llama with seeded random weights saved by ``save_pretrained``
    (config.json and model.safetensors, no tokenizer files)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    AutoModelForCausalLM.from_config(AutoConfig.for_model(**STUDENT)).save_pretrained(directory)
    return directory


def put_in_hub_cache(cache: Path, repo_id: str, model_dir: Path, commit: str = "0123456789abcdef" * 2 + "01234567",
                     repo_type: str = "model") -> Path:
    """Place the files of ``model_dir`` in the Hugging Face cache at ``cache`` (HF_HUB_CACHE) as ``repo_id``'s
    main revision, in the layout huggingface_hub writes: blobs named by their sha256, a snapshot of links to
    them, and refs/main naming the commit. Returns the snapshot directory."""
    import hashlib

    repo = cache / (f"{repo_type}s--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    snapshot.mkdir(parents=True, exist_ok=True)
    for file in sorted(model_dir.iterdir()):
        data = file.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snapshot / file.name).symlink_to(Path("..", "..", "blobs", blob.name))
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    return snapshot


def write_conversations(path: Path, count: int, turns: int) -> Path:
    """A JSON-lines file of ``count`` messages rows, each ``turns`` user/assistant exchanges."""
    rows = [{"messages": [m for t in range(turns) for m in ({"role": "user", "content": f"question {i} {t}"},
                                                            {"role": "assistant", "content": f"answer {i} {t}"})]}
            for i in range(count)]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def load_benchmark(name: str):
    """benchmarks/<name>.py as a module, its sibling modules importable as when it runs as a script."""
    import importlib.util
    import sys

    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    sys.path.insert(0, str(path.parent))
    try:
        spec = importlib.util.spec_from_file_location(f"{name}_benchmark", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(path.parent))
    return module
