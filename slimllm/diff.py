"""The correctness-oracle toolkit: where do two implementations of a model start to disagree?

Both sides run (or supply) the same model on the same tokens and record the named intermediates
of `reference.model.TRACE_KEYS` (embeddings, each block's normed input, q/k/v after positions,
attention output, MLP input/output, block output, final norm, logits). `compare` reports, per
layer and intermediate in computation order, the max abs and relative error (max |a-b| / max |a|,
a = the first side) and the first point, with the token position, that exceeds a tolerance.

A side is a setting of slimllm (`numpy:naive:float32`, `jax:slim:int8:tp2`, `numpy:wint4:g32`:
the syntax of `Runtime.describe`, weight formats spelled `w<format>` because KV formats share
their names), the upstream transformers implementation (`hf`, needs the `oracle` extra), or a
user's dump (`dump:FILE.npz`): an npz with the `tokens` it was computed on ([t] ids) and any of
the keys above (e.g. `layers.3.attn_out`), each [t, ...] or [1, t, ...]; keys it lacks are
skipped.

JSON report (schema "slimllm.diff/1"): {schema, model, a, b, tokens, tolerance, rows, first,
missing, max_rel}; each row {key, layer (int or null), name, shape, max_abs, rel, exceeds,
first_position (int or null)}; `first` is the first exceeding row (or null) in computation
order. A NaN or infinity on either side is never agreement: its row exceeds the tolerance from
the first position that holds one, with infinite errors (null in --json output). A bad side,
dump or token list is an `OptionError` naming it.
"""

from __future__ import annotations

import re
import zipfile
from dataclasses import asdict, dataclass
from importlib.util import find_spec
from pathlib import Path

import numpy as np

from slimllm.reference import kv_cache, positions
from slimllm.reference.errors import OptionError
from slimllm.reference.generate import check_prompts, token_ids
from slimllm.reference.model import TRACE_KEYS, forward, tracing
from slimllm.reference.runtime import ATTENTION, BACKENDS, Runtime
from slimllm.reference.sampling import number
from slimllm.reference.weight_format import WEIGHT_FORMATS

from .api import Model
from .hf_trace import hf_trace

SCHEMA = "slimllm.diff/1"


@dataclass(frozen=True)
class Side:
    """One side of a diff: a slimllm setting (`rt`), transformers ("hf") or a dump (`path`)."""

    kind: str = "slimllm"  # "slimllm" | "hf" | "dump"
    rt: Runtime = Runtime(backend="numpy")  # the settings of a "slimllm" side
    path: str = ""  # a "dump" side's file

    def describe(self) -> str:
        """The side as the report names it (a setting: `Runtime.describe()`)."""
        if self.kind == "hf":
            return "hf (transformers)"
        if self.kind == "dump":
            return f"dump {self.path}"
        return self.rt.describe()

    def as_json(self) -> dict:
        """The side in the JSON report: its kind, every Runtime field, the dump, the name."""
        return {"kind": self.kind, **asdict(self.rt), "path": self.path, "desc": self.describe()}


SIDE_SYNTAX = (
    f"a setting: parts joined by ':' in any order, from backends {'|'.join(BACKENDS)}, "
    f"attention kinds {'|'.join(ATTENTION)}, a KV cache dtype, tpN, a weight format "
    f"w{{{'|'.join(WEIGHT_FORMATS)}}} and gN, its input columns per scale "
    "(e.g. jax:slim:int8:tp2, numpy:wint4:g32); or hf; or dump:FILE"
)


def parse_side(text: str) -> Side:
    """'numpy', 'jax:slim:int8:tp2:wint4:g32' (any order of parts), 'hf', 'dump:FILE.npz';
    a setting's side reads back the `Runtime.describe()` it prints."""
    if text == "hf":
        return Side(kind="hf")
    if text.startswith("dump:"):
        return Side(kind="dump", path=text[5:])
    fields = {"backend": "numpy"}
    for part in text.split(":"):
        if part in BACKENDS:
            fields["backend"] = part
        elif part in ATTENTION:
            fields["attention"] = part
        elif re.fullmatch(r"tp\d+", part):
            fields["tp"] = int(part[2:])
        elif re.fullmatch(r"g\d+", part):
            fields["weight_group"] = int(part[1:])
        elif part in kv_cache.KV_FORMATS:
            fields["kv_dtype"] = part
        elif part.startswith("w"):  # "wint8": weight formats share names with KV formats
            fields["weights"] = part[1:]
        elif part:
            fields["kv_dtype"] = part  # anything else names a KV format (validated below)
    try:
        return Side(rt=Runtime(**fields))
    except OptionError as err:
        raise OptionError(f"{text!r}: {err}") from None


def reference_trace(model: Model, tokens, prompt_len: int, side: Side) -> dict:
    """The NumPy reference's named intermediates [t, ...] under `side`'s setting: one forward
    over all of `tokens`, the first `prompt_len` of them read as the prompt."""
    cfg = model.cfg
    state = positions.start_state(cfg, [tokens[:prompt_len]])
    cache = kv_cache.init_cache(cfg, 1, len(tokens), side.rt.kv_dtype)
    with tracing() as trace:
        forward(model.params_for(side.rt), cfg, np.asarray([tokens]), cache, state, side.rt)
    return {name: value[0] for name, value in trace.items()}


def load_dump(path, tokens=None) -> tuple[list[int], dict]:
    """A user's dump: (its tokens, name -> [t, ...] arrays); unknown keys are an error."""
    path = Path(path)
    if not path.exists():
        raise OptionError(f"{path}: no such dump file")
    try:
        with np.load(path) as npz:  # no pickles: allow_pickle stays False
            data = {k: npz[k] for k in npz.files}
    except (ValueError, OSError, EOFError, zipfile.BadZipFile, AttributeError) as err:
        raise OptionError(f"{path}: not a readable .npz dump ({err})") from None
    if "tokens" not in data:
        raise OptionError(f"{path}: a dump needs a 'tokens' array (the ids it was computed on)")
    tokens = np.asarray(data.pop("tokens"))
    if not np.issubdtype(tokens.dtype, np.integer):
        raise OptionError(f"{path}: 'tokens' must hold integer ids, got dtype {tokens.dtype}")
    ids = [int(t) for t in tokens.reshape(-1)]
    numeric = (np.integer, np.floating)
    odd = [k for k, v in data.items() if not any(np.issubdtype(v.dtype, t) for t in numeric)]
    if odd:
        raise OptionError(f"{path}: {odd[0]!r} is not a numeric array ({data[odd[0]].dtype})")
    patterns = [re.compile("^" + re.escape(k).replace(r"\{i\}", r"\d+") + "$") for k in TRACE_KEYS]
    unknown = [k for k in data if not any(p.match(k) for p in patterns)]
    if unknown:
        raise OptionError(
            f"{path}: unknown key(s) {unknown[:5]}; expected names like "
            "embed, layers.0.attn_out, logits (see slimllm diff --help)"
        )
    return ids, {
        k: v[0] if v.ndim >= 2 and v.shape[0] == 1 and v.shape[1] == len(ids) else v
        for k, v in data.items()
    }


def trace(model: Model, tokens, prompt_len: int, side: Side) -> dict:
    """Named intermediates [t, ...] of one side on these tokens."""
    if side.kind == "hf":
        missing = [name for name in ("torch", "transformers") if find_spec(name) is None]
        if missing:  # before hf_trace imports them: a setup mistake, not a bug
            raise OptionError(
                f"--against hf needs torch and transformers (the oracle extra): "
                f"{' and '.join(missing)} not installed"
            )
        return hf_trace(model, tokens)
    if side.kind == "dump":
        return load_dump(side.path)[1]
    if side.rt.backend == "numpy":
        return reference_trace(model, tokens, prompt_len, side)
    from slimllm.jaxbackend import sequence  # jax: once the device count for tp is set

    return sequence.trace(model.engine(side.rt), tokens, prompt_len, side.rt)


def split_key(key: str) -> tuple[int | None, str]:
    """'layers.3.q' -> (3, 'q'); a key outside the layers -> (None, key)."""
    m = re.fullmatch(r"layers\.(\d+)\.(\w+)", key)
    return (int(m.group(1)), m.group(2)) if m else (None, key)


def compare(a: dict, b: dict, tol: float = 1e-4) -> dict:
    """Per-key errors of b against a, in a's (computation) order."""
    tol = number("tol", tol, 0.0, low_open=True)  # a NaN tolerance would pass everything
    rows, first = [], None
    for key, ref in a.items():
        if key not in b:
            continue
        got = np.asarray(b[key], np.float64)
        ref = np.asarray(ref, np.float64)
        if got.shape != ref.shape:
            raise OptionError(f"{key}: shapes differ, {ref.shape} vs {got.shape}")
        bad = ~(np.isfinite(got) & np.isfinite(ref))  # NaN/inf on either side: never agreement
        diff = np.where(bad, np.inf, np.abs(got - ref))
        scale = max(float(np.abs(np.where(bad, 0, ref)).max(initial=0)), 1e-30)
        rel = float(diff.max() / scale) if diff.size else 0.0
        exceeds = rel > tol
        position = None
        if exceeds:  # the first token position whose error exceeds the tolerance
            per_pos = diff.reshape(diff.shape[0], -1).max(axis=1) / scale
            position = int(np.argmax(per_pos > tol))
        layer, name = split_key(key)
        row = {
            "key": key,
            "layer": layer,
            "name": name,
            "shape": list(ref.shape),
            "max_abs": float(diff.max()) if diff.size else 0.0,
            "rel": rel,
            "exceeds": bool(exceeds),
            "first_position": position,
        }
        rows.append(row)
        if exceeds and first is None:
            first = row
    return {
        "rows": rows,
        "first": first,
        "missing": [k for k in a if k not in b],
        "max_rel": max((r["rel"] for r in rows), default=0.0),
        "tolerance": tol,
    }


def diff(
    model: Model, tokens, prompt_len: int, side_a: Side, side_b: Side, tol: float = 1e-4
) -> dict:
    """Run both sides and compare them (the JSON report of the module docstring)."""
    number("tol", tol, 0.0, low_open=True)  # before the runs, not after
    if side_b.kind == "dump":
        dump_tokens, trace_b = load_dump(side_b.path)
        if tokens is not None and list(tokens) != dump_tokens:
            raise OptionError("the dump was computed on other tokens than the ones given")
        tokens = dump_tokens
    else:
        trace_b = None
    tokens = token_ids(tokens, "tokens")
    check_prompts(model.cfg, [tokens], 0, None)  # ids inside the vocabulary and the context
    trace_a = trace(model, tokens, prompt_len, side_a)
    if trace_b is None:
        trace_b = trace(model, tokens, prompt_len, side_b)
    report = compare(trace_a, trace_b, tol)
    return {
        "schema": SCHEMA,
        "model": model.source,
        "a": side_a.as_json(),
        "b": side_b.as_json(),
        "tokens": len(tokens),
        **report,
    }


def format_report(report: dict) -> str:
    """The readable table: one line per layer, the worst intermediate, and the first excess."""
    lines = [
        f"{report['a']['desc']}  vs  {report['b']['desc']}  ({report['tokens']} tokens, "
        f"tolerance {report['tolerance']:g})",
        f"{'key':24s} {'max abs':>11s} {'rel':>11s}  first position over",
    ]
    for row in report["rows"]:
        mark = "  <-- first" if row is report["first"] or row == report["first"] else ""
        over = "" if row["first_position"] is None else str(row["first_position"])
        lines.append(f"{row['key']:24s} {row['max_abs']:11.3e} {row['rel']:11.3e}  {over}{mark}")
    if report["first"]:
        f = report["first"]
        lines.append(f"first disagreement: {f['key']} at token position {f['first_position']}")
    else:
        lines.append(f"no intermediate exceeds the tolerance (max rel {report['max_rel']:.3e})")
    if report["missing"]:
        lines.append(f"not compared (absent on side b): {len(report['missing'])} keys")
    return "\n".join(lines)
