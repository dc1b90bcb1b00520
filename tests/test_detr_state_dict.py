"""The full R50 models have exactly the original checkpoints' keys, shapes and parameter counts.

The expected lists live in tests/data/ddetr_state_dict/<variant>.txt (dumped from the original
implementation). They are required: a missing file fails, it does not skip.
"""

from __future__ import annotations

import os
import re

import pytest

from examples.deformable_detr.configs import config_for_variant
from examples.deformable_detr.deformable_detr import build_model

LISTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "ddetr_state_dict")
VARIANTS = ["single_scale", "base", "box_refine", "two_stage"]


def read_expected(variant: str) -> tuple[list[tuple[str, tuple[int, ...]]], int, int]:
    path = os.path.join(LISTS_DIR, f"{variant}.txt")
    if not os.path.isfile(path):
        pytest.fail(
            f"expected key list {path} is missing: it ships with the repository (tests/data/)"
        )
    entries, params, trainable = [], None, None
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line.startswith("#"):
                m = re.search(r"params\(dedup\) (\d+) trainable (\d+)", line)
                if m:
                    params, trainable = int(m.group(1)), int(m.group(2))
                continue
            if line:
                key, shape = line.split(" ", 1)
                entries.append((key, tuple(int(s) for s in shape.strip("()").split(",") if s.strip())))
    assert params is not None, f"{path} has no parameter-count header"
    return entries, params, trainable


@pytest.mark.parametrize("variant", VARIANTS)
def test_state_dict_matches_original(variant):
    expected, params, trainable = read_expected(variant)
    model = build_model(config_for_variant(variant))
    got = [(k, tuple(v.shape)) for k, v in model.state_dict().items()]
    missing = [k for k, _ in expected if k not in dict(got)]
    unexpected = [k for k, _ in got if k not in dict(expected)]
    assert not missing and not unexpected, f"missing {missing[:10]}, unexpected {unexpected[:10]}"
    assert got == expected  # same shapes, and the same order as the original
    assert sum(p.numel() for p in model.parameters()) == params
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == trainable


def test_dc5_has_the_single_scale_keys():
    expected, params, _ = read_expected("single_scale")
    model = build_model(config_for_variant("single_scale_dc5"))
    assert [(k, tuple(v.shape)) for k, v in model.state_dict().items()] == expected
    assert sum(p.numel() for p in model.parameters()) == params


def test_trainer_parameter_groups_are_findable_by_name():
    model = build_model(config_for_variant("base"))
    names = [n for n, _ in model.named_parameters()]
    assert any(n.startswith("backbone.0.body.layer2") for n in names)
    assert sum("sampling_offsets" in n for n in names) == 24  # weight and bias of 6 encoder + 6 decoder layers
    assert sum("reference_points" in n for n in names) == 2
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert frozen and all(n.startswith(("backbone.0.body.conv1", "backbone.0.body.layer1")) for n in frozen)
