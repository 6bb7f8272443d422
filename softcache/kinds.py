"""Target kinds: what a store keeps of the teacher's distribution at each position, in one registry.

Each kind is one object that owns everything the rest of softcache needs to know about it: how
targets are extracted from the teacher's logits (on the teacher's device), which value codes can
store them and which is the default, whether every position has the same number of entries, how
the loss treats the mass outside the stored ids by default, the manifest's ``targets`` section,
and the one-line descriptions shown by ``--help`` and ``info``. Adding a kind means adding one
class here (and its tests); ``TARGET_KINDS`` is the dict every other module looks kinds up in.

The settings a kind reads (k, top_p, samples, seed, temperature) come from a
:class:`~softcache.store.manifest.TargetsSection`, which ``softcache cache`` builds from its flags
and a store's manifest carries.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from softcache.store.manifest import TargetsSection
    from softcache.targets import Targets

_POSITION = "entry i of a sequence is the teacher's distribution over the token after token i"
_LOGPROBS = "natural-log probabilities normalised over the full vocabulary"
_BUCKET = "bucket: 1 - sum(exp(target_logprobs)) is the teacher's probability mass outside the stored ids"


class TargetKind:
    """One kind of cached target. Subclasses set the class attributes and implement ``extract``."""

    name: str
    help: str
    """What ``--targets NAME`` stores, for ``softcache cache --help``."""
    value_codes: tuple[str, ...]
    """Value codes that can store this kind; the first is the default."""
    default_tail: str
    """Tail handling the losses use unless the user picks one (see softcache.losses)."""
    fixed_length: bool
    """Every position keeps exactly ``k`` entries (no lengths column on disk)."""
    fields: tuple[str, ...]
    """Settings of the manifest's targets section this kind uses, besides kind and temperature."""
    trade_off: str
    """One sentence for ``softcache info``: what the kind gives up or keeps, and where that was measured."""

    def width(self, targets: TargetsSection, vocab_size: int) -> int:
        """Entries per position of the padded arrays (the encoding's k)."""
        return targets.k

    def check(self, targets: TargetsSection, vocab_size: int) -> str | None:
        """A problem with these settings for a teacher of ``vocab_size`` ids (a sentence), or None."""
        if targets.k > vocab_size:
            return f"--k {targets.k} is larger than the teacher's vocabulary ({vocab_size:,} ids)"
        return None

    def extract(self, logits: torch.Tensor, labels: torch.Tensor, targets: TargetsSection,
                first_sequence: int) -> Targets:
        """Targets of a batch of logits [B, L, V] whose first row is global sequence ``first_sequence``."""
        raise NotImplementedError

    def manifest_notes(self) -> dict:
        """Fixed explanations written after the settings in the manifest's targets section."""
        return {"values": _LOGPROBS, "tail": _BUCKET}

    def describe(self, targets: TargetsSection) -> str:
        """One line for ``softcache info``."""
        raise NotImplementedError


class TopK(TargetKind):
    name = "topk"
    help = "the --k most probable ids with their log-probabilities"
    value_codes = ("log8", "float16")
    default_tail = "bucket"
    fixed_length = True
    fields = ("k",)
    trade_off = ("biased: the mass outside the k ids is one bucket and its shape is lost; top-64 (134 bytes/token) "
                 "gained nothing over cross-entropy in benchmarks/results/quality.md, hence sampled by default")

    def extract(self, logits, labels, targets, first_sequence):
        from softcache.targets import extract_targets

        return extract_targets(logits, targets.k, targets.temperature, labels)

    def describe(self, targets):
        return f"top-{targets.k} log-probs"


class TopP(TargetKind):
    name = "topp"
    help = "the fewest most probable ids reaching --top-p, at most --k"
    value_codes = ("log8", "float16")
    default_tail = "bucket"
    fixed_length = False
    fields = ("k", "top_p")
    trade_off = "biased as top-k is: the mass outside the kept ids is one bucket and its shape is lost"

    def extract(self, logits, labels, targets, first_sequence):
        from softcache.targets import topp_targets

        return topp_targets(logits, targets.k, targets.top_p, targets.temperature, labels)

    def describe(self, targets):
        return f"top-p {targets.top_p:g} (at most {targets.k} ids) log-probs"


class Sampled(TargetKind):
    name = "sampled"
    help = "--samples draws from the teacher (--draws), stored as unique ids with counts (unbiased)"
    value_codes = ("counts",)
    default_tail = "none"
    fixed_length = False
    fields = ("samples", "seed", "draws")
    trade_off = ("unbiased: count / N is the teacher's probability in expectation, so the student learns the whole "
                 "distribution; the default, for the best quality per byte in benchmarks/results/sampling.md")

    def width(self, targets, vocab_size):
        return min(targets.samples, vocab_size)

    def check(self, targets, vocab_size):
        return None  # any number of draws fits: at most min(samples, V) of them are distinct

    def extract(self, logits, labels, targets, first_sequence):
        from softcache.targets import sampled_targets, sequence_seed

        seeds = [sequence_seed(targets.seed, first_sequence + b) for b in range(logits.shape[0])]
        return sampled_targets(logits, targets.samples, seeds, targets.temperature, labels,
                               draws=targets.draw_mode)

    def manifest_notes(self):
        return {"values": "count / samples estimates the teacher's probability without bias; no tail",
                "tail": "none"}

    def describe(self, targets):
        return (f"{targets.samples} {targets.draw_mode} sampled draws (unique ids with counts, "
                f"seed {targets.seed})")


TARGET_KINDS: dict[str, TargetKind] = {kind.name: kind for kind in (TopK(), TopP(), Sampled())}
"""Every target kind by name, in the order ``--help`` lists them."""

POSITION_NOTE = _POSITION

DRAWS = ("systematic", "independent")
"""How sampled targets draw (``--draws``): see softcache.targets.sampled_targets."""


def target_kind(name: str) -> TargetKind:
    """The kind called ``name``; KeyError names the known ones."""
    try:
        return TARGET_KINDS[name]
    except KeyError:
        raise KeyError(f"unknown target kind {name!r}; known: {', '.join(TARGET_KINDS)}") from None
