"""Chat templates: a conversation (a list of messages) -> the prompt text the model was tuned on.

A checkpoint ships its template as Jinja2 source, in tokenizer_config.json (`chat_template`, a
string or a list of named templates, of which "default" is used) or in a `chat_template.jinja`
file beside it. It is rendered the way Hugging Face tokenizers do (transformers'
`utils/chat_template_utils.py`): Jinja2's `ImmutableSandboxedEnvironment` with trim_blocks and
lstrip_blocks, the globals `raise_exception` and `strftime_now`, a `tojson` filter that does not
escape HTML, and the variables `messages`, `add_generation_prompt`, `bos_token`, `eos_token`.

A template is code from the checkpoint's author, so it runs sandboxed: it sees only plain JSON
values (messages are rebuilt from str, int, float, bool, None, lists and dicts), and any attempt
to reach Python internals (`__class__`, `__globals__`, modules) raises a `TemplateError`, a
`SlimllmError` naming the problem, instead of running.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

from slimllm.reference.errors import SlimllmError, clip

TEMPLATE_FILE = "chat_template.jinja"


class TemplateError(SlimllmError):
    """A chat template that is missing, malformed, refused by the sandbox, or that raised."""


def load_template(model_dir) -> tuple[str | None, dict[str, str]]:
    """(the template source or None when the checkpoint has none, the special tokens'
    strings {"bos_token", "eos_token"}) from `model_dir`'s tokenizer_config.json or
    chat_template.jinja (the file wins, as in transformers)."""
    directory = Path(model_dir)
    config = {}
    path = directory / "tokenizer_config.json"
    if directory.is_dir() and path.is_file():
        try:
            config = json.loads(path.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as err:
            raise TemplateError(f"{path}: not valid JSON ({err})") from None
    special = {name: token_text(config.get(name)) for name in ("bos_token", "eos_token")}
    file = directory / TEMPLATE_FILE
    if directory.is_dir() and file.is_file():
        return file.read_text(encoding="utf-8"), special
    return pick_template(config.get("chat_template")), special


def token_text(value) -> str:
    """A special token's string: tokenizer_config gives a str or an AddedToken dict."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else ""


def pick_template(value) -> str | None:
    """`chat_template` as stored: a string, or a list of {"name", "template"} (use "default")."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list):
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        if isinstance(named.get("default"), str):
            return named["default"]
        raise TemplateError(f"chat_template lists no 'default' template (has {sorted(named)})")
    raise TemplateError(f"chat_template must be a string or a list, got {type(value).__name__}")


def plain(value):
    """`value` rebuilt from plain JSON types only (what a template may see), else TypeError."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, dict):
        return {str(key): plain(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [plain(item) for item in value]
    raise TypeError(f"a message may hold only JSON values, got {type(value).__name__}")


class Sandbox(ImmutableSandboxedEnvironment):
    """Jinja2's immutable sandbox, except that reaching an unsafe attribute raises at once
    (Jinja's own yields an undefined value that prints as nothing, hiding the attempt)."""

    def unsafe_undefined(self, obj, attribute):
        raise jinja2.exceptions.SecurityError(
            f"access to attribute {attribute!r} of {type(obj).__name__!r} object is unsafe"
        )


def environment() -> Sandbox:
    """The sandboxed Jinja2 environment HF renders chat templates in."""

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # Jinja's own tojson escapes HTML characters, which changes the prompt
        return json.dumps(
            x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
        )

    env = Sandbox(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


def render(template: str, messages, special_tokens: dict | None = None) -> str:
    """The prompt text of `messages` (a list of {"role", "content", ...} dicts) by `template`,
    ending with the assistant's turn opened (add_generation_prompt=True)."""
    special = {"bos_token": "", "eos_token": ""} | dict(special_tokens or {})
    try:
        messages = plain(messages)
    except TypeError as err:
        raise TemplateError(str(err)) from None
    try:
        compiled = environment().from_string(template)
        return compiled.render(messages=messages, add_generation_prompt=True, **special)
    except jinja2.exceptions.SecurityError as err:
        raise TemplateError(f"chat template refused by the sandbox: {clip(str(err))}") from None
    except jinja2.exceptions.TemplateError as err:  # syntax errors and raise_exception
        raise TemplateError(f"chat template error: {clip(str(err))}") from None
    except (
        TypeError,
        ValueError,
        LookupError,
        AttributeError,
        ArithmeticError,
        RecursionError,
    ) as err:
        raise TemplateError(
            f"chat template failed: {type(err).__name__}: {clip(str(err))}"
        ) from None
