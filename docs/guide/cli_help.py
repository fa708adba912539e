"""MkDocs hook: the command-line page quotes `slimllm --help` and each `slimllm X --help`.

A line `<!-- slimllm-help: X -->` in a page becomes the help text of subcommand X (`-` for
`slimllm --help` itself), formatted by the checkout's own parser (cli.build_parser) at a width
of 100 columns, so the page never drifts from the options. A subcommand that the parser has and
no page quotes, or a quote of one it lacks, is a warning, which fails the strict build: adding a
subcommand means documenting it.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
MARKER = re.compile(r"^<!-- slimllm-help: (\S+) -->$", re.MULTILINE)
log = logging.getLogger("mkdocs.hooks.cli_help")
quoted: set[str] = set()


def parsers() -> dict[str, argparse.ArgumentParser]:
    """'-' -> the main parser, and each subcommand's name -> its parser (aliases left out)."""
    sys.path.insert(0, str(ROOT))  # the checkout's slimllm, however (or whether) it is installed
    try:
        from slimllm.cli import build_parser
    finally:
        sys.path.remove(str(ROOT))
    main = build_parser()
    (sub,) = (a for a in main._actions if isinstance(a, argparse._SubParsersAction))
    out = {"-": main}
    for name, parser in sub.choices.items():
        if parser not in out.values():  # an alias maps to the parser already listed
            out[name] = parser
    return out


def help_text(parser: argparse.ArgumentParser) -> str:
    """The parser's help wrapped at 100 columns (argparse reads the width from $COLUMNS)."""
    columns = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = "100"
    try:
        return parser.format_help().rstrip()
    finally:  # the notebooks' kernels, started later, inherit this environment
        if columns is None:
            del os.environ["COLUMNS"]
        else:
            os.environ["COLUMNS"] = columns


def on_pre_build(config):
    quoted.clear()


def on_page_markdown(markdown, page, config, files):
    if not MARKER.search(markdown):
        return markdown
    known = parsers()

    def help_block(match):
        name = match.group(1)
        if name not in known:
            log.warning(f"{page.file.src_path}: slimllm has no subcommand {name!r} to quote")
            return match.group(0)
        quoted.add(name)
        return f"```text\n{help_text(known[name])}\n```"

    return MARKER.sub(help_block, markdown)


def on_post_build(config):
    missing = sorted(set(parsers()) - quoted)
    if missing:
        log.warning(f"no page quotes the help of: {', '.join(missing)} (<!-- slimllm-help: X -->)")
