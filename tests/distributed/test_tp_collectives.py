"""What tensor parallelism sends between ranks, read from the programs the Engine really runs.

PAPER.md section 4: per layer exactly two all-reduces (attention output, MLP down projection) of
the hidden state; the vocabulary-parallel LM head sends b values twice for greedy (max, then min
for ties) and the R*k top-k candidates per row for top-k sampling, never the vocabulary; only
sampling without top-k gathers full logits. A regression here is silent in every equality test
(the results stay right, they just cost more), hence these checks.

The programs are the tp=2 Engine's own (shard_map over two XLA devices, compiled ahead of time by
Engine.run): the test watches Engine.run while generating, then re-lowers each program for the
arguments it ran with and inspects its HLO twice: as lowered (the collectives the code writes)
and as compiled (what XLA runs, including any collective the partitioner would add). The model,
prompts and settings are those of `tp_cases`' sampling fixture: a batch of two ragged prompts.
"""

from __future__ import annotations

import contextlib
import math
import re
from dataclasses import dataclass

import jax
import pytest
import tp_cases

from conftest import FIXTURES
from slimllm.jaxbackend.sharding import LAYOUTS
from slimllm.reference.runtime import Runtime

COLLECTIVE_OPS = (
    "all-reduce",
    "all-gather",
    "all-to-all",
    "collective-permute",
    "reduce-scatter",
    "collective-broadcast",
    "send",
    "recv",
)
INSTRUCTION = re.compile(
    r"^\s*(?:ROOT\s+)?%?[\w.\-]+\s+=\s+(?P<type>\(.*?\)|\S+)\s+"
    r"(?P<op>[a-z][\w\-]*)\((?P<rest>.*)$"
)
HEADER = re.compile(r"^(?:ENTRY\s+)?%?(?P<name>[\w.\-]+)\s+(?:\(.*)?\{\s*$")
SHAPE = re.compile(r"(?P<dtype>[a-z]\w*)\[(?P<dims>[\d,]*)\]")


@pytest.fixture(scope="module", autouse=True)
def tp2_in_background(request):
    """test_tp_equivalence's background tp=2 runs start now, on the core this module leaves idle."""
    tp_cases.start_early(request, FIXTURES)


@dataclass(frozen=True)
class Collective:
    op: str  # "all-reduce", "all-gather", ...
    shape: tuple[int, ...]  # the result's shape (one array; tuples are flattened into elements)
    elements: int
    reduce: str | None  # the all-reduce's combiner: "add", "maximum", "minimum"


def collectives(hlo: str) -> list[Collective]:
    """Every collective of an HLO module, in program order (async pairs counted once)."""
    roots, name = {}, None
    for line in hlo.splitlines():  # the root op of every computation (an all-reduce's combiner)
        if m := HEADER.match(line):
            name = m["name"]
        elif line.strip().startswith("ROOT") and (m := INSTRUCTION.match(line)):
            roots[name] = m["op"]
    found = []
    for line in hlo.splitlines():
        m = INSTRUCTION.match(line)
        if not m or m["op"].endswith("-done"):
            continue
        op = m["op"].removesuffix("-start")
        if op not in COLLECTIVE_OPS:
            continue
        shapes = [
            tuple(int(d) for d in s["dims"].split(",") if d) for s in SHAPE.finditer(m["type"])
        ]
        apply = re.search(r"to_apply=%?([\w.\-]+)", m["rest"])
        found.append(
            Collective(
                op,
                shapes[0] if len(shapes) == 1 else (),
                sum(math.prod(s) for s in shapes),
                roots.get(apply[1]) if apply else None,
            )
        )
    return found


@contextlib.contextmanager
def watching(engine):
    """Record, per program name, (jitted program, abstract arguments) of every Engine.run call."""

    class KeyLog(dict):  # remembers the last program key Engine.run looked up
        def __getitem__(self, key):
            self.last = key
            return super().__getitem__(key)

    calls, run = {}, engine.run
    engine.programs = KeyLog(engine.programs)

    def spy(fn, static, donate, *args):
        placed = engine.place(args, LAYOUTS[fn.__name__][0])
        abstract = jax.tree_util.tree_map(
            lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), placed
        )
        out = run(fn, static, donate, *placed)  # donates the cache: shapes were taken before
        calls.setdefault(fn.__name__, (engine.programs[engine.programs.last].program, abstract))
        return out

    engine.run = spy
    try:
        yield calls
    finally:
        del engine.run  # back to the class's method
        engine.programs = dict(engine.programs)


@pytest.fixture(scope="module")
def hlo():
    """{(sampling, mode, program name, "lowered"|"compiled"): collectives}, and the config."""
    fixture = tp_cases.sampled_fixture(tp_cases.allowed_fixtures(FIXTURES))
    greedy = next(c for c in tp_cases.plan(FIXTURES) if c.fixture == fixture)
    same = dict(fixture=fixture, attention=greedy.attention, kv_dtype=greedy.kv_dtype)
    engine = tp_cases.load(FIXTURES, fixture)[0].engine(Runtime(tp=2))
    found = {}
    for sampling, mode in (
        ("greedy", "stream"),
        ("greedy", "loop"),
        ("topk", "stream"),
        ("topp", "stream"),
    ):
        with watching(engine) as calls:
            tp_cases.run(FIXTURES, tp_cases.Case(**same, sampling=sampling, mode=mode), tp=2)
        for name, (program, abstract) in calls.items():
            lowered = program.lower(*abstract)
            found[sampling, mode, name, "lowered"] = collectives(lowered.as_text(dialect="hlo"))
            found[sampling, mode, name, "compiled"] = collectives(
                lowered.compile().as_text()
            )  # already compiled by Engine.run: a cache hit
    return found, engine.cfg


STAGES = ("lowered", "compiled")
B, R = 2, 2  # rows per batch (prompt_a, prompt_b: tp_cases.load), ranks


def hidden_sums(cfg, t: int) -> list[Collective]:
    """The two row-parallel sums of every layer: the hidden state [b, t, e] each."""
    e = (B, t, cfg.width)
    return [Collective("all-reduce", e, math.prod(e), "add")] * (2 * cfg.n_layers)


@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("sampling", ["greedy", "topk", "topp"])
def test_a_stream_step_is_two_allreduces_per_layer_and_the_choice(hlo, stage, sampling):
    """The stream loop's one program per token (step_fn) decodes, then chooses: per layer the
    two sums of the hidden state, then exactly the choice's own collectives (choose_fn, the
    first token's program)."""
    found, cfg = hlo
    got = found[sampling, "stream", "step_fn", stage]
    want = hidden_sums(cfg, 1) + found[sampling, "stream", "choose_fn", stage]
    assert sorted(got, key=str) == sorted(want, key=str)


@pytest.mark.parametrize("stage", STAGES)
def test_prefill_has_two_allreduces_per_layer(hlo, stage):
    found, cfg = hlo
    got = found["greedy", "stream", "prefill_fn", stage]
    t = got[0].shape[1] if got else 0  # the prompt bucket
    assert got == hidden_sums(cfg, t)


@pytest.mark.parametrize("stage", STAGES)
def test_greedy_choice_reduces_b_values_twice(hlo, stage):
    """Greedy over the split vocabulary: max of the ranks' best values, then min of the ids
    holding it (ties -> lowest id); each moves b values, so O(b * tp) for the whole head."""
    found, _ = hlo
    got = found["greedy", "stream", "choose_fn", stage]
    assert [(c.op, c.reduce, c.shape) for c in got] == [
        ("all-reduce", "maximum", (B,)),
        ("all-reduce", "minimum", (B,)),
    ]
    assert all(c.elements <= B * R for c in got)


@pytest.mark.parametrize("stage", STAGES)
def test_greedy_loop_moves_no_vocabulary(hlo, stage):
    """The whole greedy loop in one program: per step 2 per layer + the 2 of the choice. The
    program holds the choice twice: the first token is chosen before the loop (so no
    `lax.cond` guards the decode), then each iteration decodes and chooses."""
    found, cfg = hlo
    got = found["greedy", "loop", "loop_fn", stage]
    choice = [
        Collective("all-reduce", (B,), B, "maximum"),
        Collective("all-reduce", (B,), B, "minimum"),
    ]
    assert sorted(got, key=str) == sorted(hidden_sums(cfg, 1) + 2 * choice, key=str)


@pytest.mark.parametrize("stage", STAGES)
def test_top_k_gathers_r_times_k_candidates_per_row(hlo, stage):
    found, cfg = hlo
    k = tp_cases.SAMPLINGS["topk"]["top_k"]
    got = found["topk", "stream", "choose_fn", stage]
    ops = [(c.op, c.shape) for c in got]
    # values and their ids: [R, b, k] each, i.e. R*k per row where the vocabulary is V
    candidates = [c for c in got if c.op == "all-gather" and c.shape == (R, B, k)]
    assert len(candidates) == 2 and all(c.elements == R * k * B < cfg.vocab * B for c in candidates)
    # one scalar max: "does any rank hold more ties with the k-th value than it offered?"
    assert [c for c in got if c.op == "all-reduce"] and all(
        c.elements == 1 for c in got if c.op == "all-reduce"
    ), ops
    # the full-logits gather is the lax.cond fallback taken only when that answer is yes
    others = [c for c in got if c not in candidates and c.op != "all-reduce"]
    assert [(c.op, c.shape) for c in others] == [("all-gather", (R, B, cfg.vocab // R))], ops


@pytest.mark.parametrize("stage", STAGES)
def test_top_p_alone_gathers_the_logits(hlo, stage):
    """Without top-k the sampler needs every logit: one gather of the [b, V/R] slices."""
    found, cfg = hlo
    got = found["topp", "stream", "choose_fn", stage]
    assert [(c.op, c.shape) for c in got] == [("all-gather", (R, B, cfg.vocab // R))]
