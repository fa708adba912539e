"""MkDocs hook: the package `slimllm` laid out as an installed copy has it, for mkdocstrings.

pyproject.toml maps top-level folders into the package (package-dir: reference/ is
`slimllm.reference`, jaxbackend/ is `slimllm.jaxbackend`, ...). Python follows that mapping in
an installed copy, and in a checkout through slimllm/__init__.py's search path; griffe, which
reads the source without importing it, would find only slimllm/ and none of its subpackages.
So this hook links that layout into build/docs-api/slimllm (slimllm/'s entries, plus one link per
mapped folder) before mkdocstrings starts, and mkdocs.yml's `paths` points griffe there: the API
reference shows the checkout's code under its import names, however slimllm is installed (or
not at all). Links are replaced only where missing or stale, so two builds can run at once.
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path

from mkdocs.plugins import event_priority

ROOT = Path(__file__).resolve().parents[2]
STAGE = ROOT / "build" / "docs-api"


def links(root: Path) -> dict[Path, Path]:
    """Link path (relative to the stage) -> the checkout's file or folder it stands for."""
    package_dir = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"][
        "package-dir"
    ]
    out = {}
    for name, folder in package_dir.items():
        parent, _, last = name.rpartition(".")
        if not parent:  # a top-level package: a real folder holding links to its entries
            for entry in sorted((root / folder).iterdir()):
                out[Path(name, entry.name)] = entry
        elif Path(folder) != Path(package_dir.get(parent, ""), last):  # not already inside
            out[Path(*name.split("."))] = root / folder
    return out


def lay_out(root: Path = ROOT, stage: Path = STAGE) -> Path:
    """Make or refresh the links under `stage`, and drop links to entries that are gone."""
    wanted = links(root)
    for link in stage.glob("*/*"):
        if link.is_symlink() and link.relative_to(stage) not in wanted:
            link.unlink(missing_ok=True)
    for rel, target in wanted.items():
        link = stage / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        if link.is_symlink() and Path(os.readlink(link)) == target:
            continue
        tmp = link.with_name(f".{link.name}.{os.getpid()}")  # replaced atomically
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(target, target_is_directory=target.is_dir())
        os.replace(tmp, link)
    return stage


@event_priority(100)  # before mkdocstrings reads its `paths`
def on_config(config):
    lay_out()
    return config
