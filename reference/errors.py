"""The error types of user-caused failures: one base, `SlimllmError`, at every boundary.

A file that is not a model, a config value out of range, an option of the wrong type, a
tokenizer that does not fit the model, an MPI job set up wrong: each raises a `SlimllmError`
whose message names the file, tensor or option and what was expected. The command line turns
every one into exit status 2 and one line on stderr; API callers catch this one type. Anything
else reaching a user is a bug in slimllm, not a mistake of theirs.

It subclasses ValueError so that code written against plain ValueError keeps working.
"""

from __future__ import annotations


class SlimllmError(ValueError):
    """A user-caused failure: bad file, config value, option or setup, named in the message."""


class ConfigError(SlimllmError):
    """A model config value of the wrong type, out of range, or unknown where it changes the
    maths."""


class OptionError(SlimllmError):
    """A run or generation option of the wrong type or out of range (API or command line)."""
