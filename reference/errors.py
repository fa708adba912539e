"""The error types of user-caused failures: one base, `SlimllmError`, at every boundary.

A file that is not a model, a config value out of range, an option of the wrong type, a
tokenizer that does not fit the model, an MPI job set up wrong: each raises a `SlimllmError`
whose message names the file, tensor or option and what was expected. The command line turns
every one into exit status 2 and one line on stderr; API callers catch this one type. Anything
else reaching a user is a bug in slimllm, not a mistake of theirs.

It subclasses ValueError so that code written against plain ValueError keeps working. A value
that came from a file or a user appears in a message through `shown` (or `clip` for text), so a
hostile value (huge, deeply nested, holding a newline) can neither flood nor break the line.
"""

from __future__ import annotations

import reprlib

_SHOWN = reprlib.Repr()
_SHOWN.maxlevel, _SHOWN.maxstring, _SHOWN.maxother, _SHOWN.maxlong = 2, 60, 60, 40


def clip(text: str, most: int = 200) -> str:
    """`text` on one line (control characters escaped), cut to `most` characters."""
    if not text.isprintable():
        text = text.encode("unicode_escape").decode("ascii")
    return text if len(text) <= most else text[: most - 3] + "..."


def shown(value, most: int = 80) -> str:
    """A value as a message shows it: its repr bounded in depth and length (reprlib), on one
    line, at most `most` characters."""
    try:
        text = _SHOWN.repr(value)
    except Exception:  # e.g. an int past the str conversion limit
        text = f"<{type(value).__name__}>"
    return clip(text, most)


class SlimllmError(ValueError):
    """A user-caused failure: bad file, config value, option or setup, named in the message."""


class ConfigError(SlimllmError):
    """A model config value of the wrong type, out of range, or unknown where it changes the
    maths."""


class OptionError(SlimllmError):
    """A run or generation option of the wrong type or out of range (API or command line)."""
