"""The family registry (weights/families): every family is covered by an upstream-made fixture,
and a family name means the same thing to the loader and to the tokenizer."""

import json

from conftest import FIXTURES, need
from slimllm.weights.families import FAMILIES, detect
from slimllm.weights.tokenizer import _named_families


def fixture_configs():
    return {p.parent.name: json.loads(p.read_text()) for p in need(FIXTURES).glob("*/config.json")}


def test_every_family_is_detected_from_an_upstream_fixture():
    """So test_oracles.py checks every family's loader against its upstream implementation."""
    found = {detect(config).name for config in fixture_configs().values()}
    assert found == {family.name for family in FAMILIES}


def test_a_checkpoint_config_names_its_own_family_to_the_tokenizer():
    for variant, config in fixture_configs().items():
        named = [name for name, _ in _named_families({}, config)]
        assert detect(config).name in named, (variant, named)
