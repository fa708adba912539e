"""STYLE.md rule 3: family names live only in weights/, never in the compute code."""

import re

from conftest import ROOT
from slimllm.weights.families import FAMILIES

# Every registered family name and model_type its tokenizer answers to, cut to its stem so that
# any version is caught too ("qwen2" -> qwen: qwen, qwen2, qwen3_moe; glm: glm4; llama: llama3).
STEMS = sorted(
    {
        re.sub(r"[\d_].*$", "", name)
        for family in FAMILIES
        for name in (family.name, *family.tokenizer.model_types)
    }
)
# A stem with an optional version ("3", "2.5", "6b"), as a word of its own or a part of an
# identifier between underscores (llama3_scale).
FAMILY = re.compile(
    rf"(?<![a-z0-9])(?:{'|'.join(STEMS)})(?:\d+(?:\.\d+)?[a-z]?)?(?![a-z0-9])", re.IGNORECASE
)

# Lines allowed to name a family, per file (none since rope scaling is named after its maths).
ALLOWED: dict[str, set[str]] = {}


def code_lines(path):
    """Lines of code outside comments and docstrings."""
    in_doc = False
    for line in path.read_text().splitlines():
        stripped = line.strip()
        quotes = stripped.count('"""')
        if in_doc or stripped.startswith('"""'):
            in_doc = in_doc != (quotes % 2 == 1)
            continue
        yield line.split("#", 1)[0]


def test_the_pattern_catches_versioned_names():
    for text in ("llama3", "Qwen2.5", "qwen3_moe", "glm4", "chatglm6b", "rope_llama3_scale", "OPT"):
        assert FAMILY.search(text), text
    for text in ("optional", "adopt", "llamas", "x_optimum"):
        assert not FAMILY.search(text), text


def test_no_family_names_in_compute_code():
    offenders = []
    for folder in ("reference", "jaxbackend"):
        for path in sorted((ROOT / folder).glob("*.py")):
            allowed = ALLOWED.get(f"{folder}/{path.name}", set())
            offenders += [
                f"{folder}/{path.name}: {line.strip()}"
                for line in code_lines(path)
                if FAMILY.search(line) and line.strip() not in allowed
            ]
    assert not offenders, offenders
