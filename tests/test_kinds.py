"""The target-kind registry: every kind is complete, and no other module decides by a kind's name."""

from __future__ import annotations

import ast
import dataclasses
import math
from pathlib import Path

import pytest
import torch

from softcache.errors import StoreError
from softcache.kinds import TARGET_KINDS, target_kind
from softcache.losses import TAILS
from softcache.store.encoding import VALUE_CODES
from softcache.store.manifest import TargetsSection

PACKAGE = Path(__file__).parent.parent / "softcache"
SETTINGS = {"k": 6, "top_p": 0.7, "samples": 9, "seed": 4, "draws": "systematic"}


@pytest.mark.parametrize("name", list(TARGET_KINDS))
def test_every_kind_owns_what_the_rest_needs(name):
    kind = TARGET_KINDS[name]
    assert kind.name == name and kind.help and kind.value_codes and set(kind.value_codes) <= set(VALUE_CODES)
    assert kind.trade_off and "\n" not in kind.trade_off
    assert kind.default_tail in TAILS
    assert set(kind.fields) <= {f.name for f in dataclasses.fields(TargetsSection)}
    section = TargetsSection.for_kind(name, 0.8, **SETTINGS)
    assert TargetsSection.from_dict(section.to_dict()) == section  # the manifest section round-trips
    assert section.describe() and section.spec is kind
    assert kind.check(section, vocab_size=40) is None

    vocab = 40
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, vocab, generator=g) * 3
    labels = torch.randint(0, vocab, (2, 5), generator=g)
    targets = kind.extract(logits, labels, section, first_sequence=3)
    width = kind.width(section, vocab)
    assert targets.ids.shape == targets.logprobs.shape == (2, 5, width)
    assert (targets.lengths is None) == kind.fixed_length
    real = targets.logprobs > -math.inf
    assert real[..., 0].all()  # slot 0 is always a real entry
    mass = torch.where(real, targets.logprobs.exp(), 0.0).sum(-1)
    assert (mass <= 1 + 1e-5).all()
    if kind.default_tail == "none":  # a kind without a tail sums to one
        torch.testing.assert_close(mass, torch.ones_like(mass))
    again = kind.extract(logits, labels, section, first_sequence=3)
    assert torch.equal(again.ids, targets.ids)  # deterministic for the same sequences


def test_settings_a_kind_does_not_use_stay_out_of_its_section():
    sampled = TargetsSection.for_kind("sampled", 1.0, **SETTINGS)
    assert sampled.k is None and sampled.top_p is None and sampled.samples == 9
    assert "k" not in sampled.to_dict()
    with pytest.raises(KeyError, match="known: topk, topp, sampled"):
        target_kind("dense")


def test_too_large_k_is_the_kinds_problem_to_name():
    assert "larger than the teacher's vocabulary" in TARGET_KINDS["topk"].check(TargetsSection.for_kind(
        "topk", 1.0, **{**SETTINGS, "k": 50}), vocab_size=40)
    assert TARGET_KINDS["sampled"].check(TargetsSection.for_kind("sampled", 1.0, **{**SETTINGS, "samples": 500}), 40) is None


def test_no_module_but_the_registry_decides_by_a_kind_name():
    """Adding a kind touches softcache/kinds.py only: nowhere else compares with a kind's name."""
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.name == "kinds.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Compare):
                for operand in [node.left, *node.comparators]:
                    names = operand.elts if isinstance(operand, (ast.Tuple, ast.List, ast.Set)) else [operand]
                    found += [f"{path.relative_to(PACKAGE)}:{node.lineno}" for n in names
                              if isinstance(n, ast.Constant) and n.value in TARGET_KINDS]
    assert found == []


def test_a_sampled_section_without_draws_is_an_old_store_of_independent_draws():
    old = {"kind": "sampled", "temperature": 1.0, "samples": 9, "seed": 4}
    section = TargetsSection.from_dict(old)
    assert section.draw_mode == "independent" and "9 independent sampled draws" in section.describe()
    assert "draws" not in section.to_dict()  # written back as it was
    independent = TargetsSection.for_kind("sampled", 1.0, **{**SETTINGS, "draws": TargetsSection.draws_field("independent")})
    assert independent.to_dict() == TargetsSection.for_kind("sampled", 1.0, **{**SETTINGS, "draws": None}).to_dict()


@pytest.mark.parametrize("draws", ["independent", "stratified", 3, None])
def test_a_manifest_names_its_draws_or_says_nothing(draws):
    data = {"kind": "sampled", "temperature": 1.0, "samples": 9, "seed": 4, "draws": draws}
    if draws is None:
        assert TargetsSection.from_dict(data).draw_mode == "independent"
        return
    with pytest.raises(StoreError, match="targets.draws is"):
        TargetsSection.from_dict(data)
