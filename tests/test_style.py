"""STYLE.md rule 3: family names live only in weights/, never in the compute code."""

import re

from conftest import ROOT

FAMILY = re.compile(r"\b(llama|qwen|chatglm|glm|baichuan|opt)\b", re.IGNORECASE)


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


def test_no_family_names_in_compute_code():
    offenders = []
    for folder in ("reference", "jaxbackend"):
        for path in sorted((ROOT / folder).glob("*.py")):
            offenders += [
                f"{path.name}: {line.strip()}" for line in code_lines(path) if FAMILY.search(line)
            ]
    assert not offenders, offenders
