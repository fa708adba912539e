"""The compiled weight product (`slimllm.kernels.linear`) against the reference's widening, on
both of its instruction-set paths, and the pure-XLA fallback when the library is missing.

Conformance: for every encoding and group, y = x @ widen(w).T within float32 summation error
(plus, with kernels "fast", x's rounding on each road of `src/linear.cc`), with row
counts that leave partial tiles and chunks. The decode program of a real model calls
the kernel (its compiled HLO holds the custom call) unless the runtime says "xla", and both give
the oracle's greedy ids.
"""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import slimllm
from conftest import FIXTURES, ROOT, STORIES
from kernel_paths import needs_library, on_path
from slimllm import kernels
from slimllm.jaxbackend.weight_format import compact_linear, to_pair_order
from slimllm.kernels import linear as kernel
from slimllm.reference.weight_format import ENCODINGS, Compact

pytestmark = needs_library


def test_the_library_loaded():
    """The package's build produced a library that loads (else every kernel test here fails)."""
    assert kernels.available(), kernels.why_unavailable()


CASES = [  # (encoding, group): every encoding, per channel and grouped
    ("float32", None),
    ("float16", None),
    ("bfloat16", None),
    ("int8", None),
    ("int8", 32),
    ("int8", 128),
    ("int4", 32),
    ("int4", 64),
    ("int4", 128),
    ("int4", None),
]


def compact(w: np.ndarray, encoding: str, group):
    if encoding == "float32":
        return jnp.asarray(w)
    values, scale = ENCODINGS[encoding].encode(w, group)
    scale = None if scale is None else jnp.asarray(scale)
    return Compact(jnp.asarray(values), scale, encoding, False)


def widened(w, encoding: str) -> np.ndarray:
    """The reference's float32 matrix for a stored weight."""
    if encoding == "float32":
        return np.asarray(w)
    scale = None if w.scale is None else np.asarray(w.scale)
    return ENCODINGS[encoding].widen(np.asarray(w.values), scale)


def amx_road(choice: str, encoding: str, group, rows: int, cols: int, m: int) -> bool:
    """Does this product take the AMX road (src/linear.cc: kernels "fast" on a CPU with AMX,
    more than 4 rows of x, bfloat16/int8/int4 weights, 16-row tiles, 32-column steps)?"""
    return (
        choice == "fast"
        and kernels.isa() == "avx512-amx"
        and m > 4
        and encoding in kernel.AMX_ENCODINGS
        and rows % 16 == 0
        and (group or cols) % 32 == 0
    )


def pairs_road(choice: str, encoding: str, group, rows: int, cols: int, m: int) -> bool:
    """Does this product take the bfloat16 pairs road, its int8 quads or its int4 lanes
    (src/linear.cc: kernels "fast" with AVX512-BF16 off the AMX road, more than 4 rows of x,
    32-column steps)?"""
    return (
        choice == "fast"
        and kernels.isa() in ("avx512-bf16", "avx512-amx")
        and m > 4
        and encoding in kernel.AMX_ENCODINGS
        and (group or cols) % 32 == 0
        and not amx_road(choice, encoding, group, rows, cols, m)
    )


def quads_road(choice: str, encoding: str, group, rows: int, cols: int, m: int) -> bool:
    """int8 codes on the pairs road in 64-column VPDPBUSD steps (src/linear.cc "int8 quads")."""
    return (
        pairs_road(choice, encoding, group, rows, cols, m)
        and encoding == "int8"
        and (group or cols) % 64 == 0
    )


def lanes_road(choice: str, encoding: str, group, rows: int, cols: int, m: int) -> bool:
    """int4 codes in groups of 32 on the pairs road, in VPDPBUSD group lanes (src/linear.cc
    "int4 lanes")."""
    return pairs_road(choice, encoding, group, rows, cols, m) and encoding == "int4" and group == 32


def int4_bytes_road(choice: str, encoding: str, group, rows: int, cols: int, m: int) -> bool:
    """Does this product take the int4 byte road (src/linear.cc "int4 bytes": kernels "fast"
    with VNNI, off the AMX and pairs roads, 128-column blocks whose lanes lie in single groups)?"""
    g = group or cols
    return (
        choice == "fast"
        and encoding == "int4"
        and kernels.isa() in ("avx512-vnni", "avx512-bf16", "avx512-amx")
        and not amx_road(choice, encoding, group, rows, cols, m)
        and not pairs_road(choice, encoding, group, rows, cols, m)
        and cols % 128 == 0
        and g % 32 == 0
        and (g % 128 == 0 or 128 % g == 0)
    )


def int8_lanes_bound(x, wide, group) -> np.ndarray:
    """x rounded to int8 as the quads round it: one scale per row per lane l of a span of up to
    1024 columns within a weight group, over the columns 4l .. 4l + 3 of each 64: sum over those
    groups of max|x_G| / 254 * sum |w| over G."""
    (m, cols), rows = x.shape, wide.shape[0]
    lane_group = np.empty(cols, np.int64)
    count = 0
    for g0 in range(0, cols, group or cols):
        for c0 in range(g0, g0 + (group or cols), 1024):
            c = np.arange(c0, min(c0 + 1024, g0 + (group or cols)))
            lane_group[c] = count + (c - c0) % 64 // 4
            count += 16
    top, mass = np.zeros((m, count)), np.zeros((rows, count))
    np.maximum.at(top.T, lane_group, np.abs(x).T)
    np.add.at(mass.T, lane_group, np.abs(wide).T)
    return (top / 254) @ mass.T


def int8_steps_bound(x, wide, step: int) -> np.ndarray:
    """x rounded to int8 with one scale per `step` columns: sum over steps of
    max|x_step| / 254 * sum |w| over the step."""
    (m, cols), rows = x.shape, wide.shape[0]
    top = np.abs(x).reshape(m, cols // step, step).max(axis=2)  # [m, steps]
    mass = np.abs(wide).reshape(rows, cols // step, step).sum(axis=2)  # [rows, steps]
    return (top / 254) @ mass.T


def error_bound(x, wide, choice: str, encoding: str, group, m: int) -> np.ndarray:
    """|y - x @ wide.T| allowed per output: float32 summation, plus x's rounding on a fast road."""
    rows, cols = wide.shape
    bound = 1e-6 * np.sqrt(cols) * (np.abs(x) @ np.abs(wide).T)  # float32 sums
    if amx_road(choice, encoding, group, rows, cols, m):
        if encoding == "bfloat16":  # x rounded to bfloat16: half an ulp of 8 bits
            return bound + 2.0**-8 * (np.abs(x) @ np.abs(wide).T)
        if encoding == "int4" and m > 16:  # prefill: x and the widened weights to bfloat16
            return bound + 2.0**-8 * (1 + 2.0**-10) * (np.abs(x) @ np.abs(wide).T)
        step = 64 if (group or cols) % 64 == 0 else 32  # x to int8, one scale per step
        return bound + int8_steps_bound(x, wide, step)
    if quads_road(choice, encoding, group, rows, cols, m):
        return bound + int8_lanes_bound(x, wide, group)
    if lanes_road(choice, encoding, group, rows, cols, m):
        return bound + int8_steps_bound(x, wide, 32)
    if pairs_road(choice, encoding, group, rows, cols, m):
        if encoding == "bfloat16":  # x rounded to bfloat16
            return bound + 2.0**-8 * (np.abs(x) @ np.abs(wide).T)
        # x and the widened codes rounded to bfloat16
        return bound + 2.0**-8 * (1 + 2.0**-10) * (np.abs(x) @ np.abs(wide).T)
    if int4_bytes_road(choice, encoding, group, rows, cols, m):
        return bound + int8_steps_bound(x, wide, 32)
    if choice == "fast" and ENCODINGS[encoding].qmax:  # x rounded to 16 bits (VNNI)
        top = np.abs(x).max(axis=1, keepdims=True)  # [m, 1]
        return bound + top / 65534 * np.abs(wide).sum(axis=1)[None, :]
    return bound


def covering(rows_list, cols_list, ms) -> list[tuple[int, int, int]]:
    """(rows, cols, m) shapes in which every pair of values of two of the three dimensions meets
    at least once (a pairwise design): each shape is an XLA compile, and the roads' choices and
    partial tiles depend on the dimensions one or two at a time, so the full product of the
    three (4x as many compiles) checks little more."""
    shapes = [
        (rows_list[(i + j) % len(rows_list)], cols, m)
        for i, cols in enumerate(cols_list)
        for j, m in enumerate(ms)
    ]
    for k, (rows, cols) in enumerate((r, c) for r in rows_list for c in cols_list):
        if not any(s[:2] == (rows, cols) for s in shapes):
            shapes.append((rows, cols, ms[k % len(ms)]))
    for k, (rows, m) in enumerate((r, m) for r in rows_list for m in ms):
        if not any((s[0], s[2]) == (rows, m) for s in shapes):
            shapes.append((rows, cols_list[k % len(cols_list)], m))
    return shapes


def test_the_covering_meets_every_pair():
    rows_list, cols_list, ms = (1, 5, 67, 32), (16, 96, 1024), (1, 3, 16)
    shapes = covering(rows_list, cols_list, ms)
    axes = (rows_list, cols_list, ms)
    for a, b in ((0, 1), (0, 2), (1, 2)):
        met = {(s[a], s[b]) for s in shapes}
        assert met == {(u, v) for u in axes[a] for v in axes[b]}, (a, b)
    assert len(shapes) < len(rows_list) * len(cols_list) * len(ms)


def check_products(
    rows_list=(1, 5, 67, 32), cols_list=(16, 96, 1024), ms=(1, 2, 3, 4, 5, 16), choice="auto"
):
    rng = np.random.default_rng(0)

    @jax.jit
    def product(x, w):
        with kernels.choose(choice):
            return kernel.linear(x, w)

    for encoding, group in CASES:
        fitting = [cols for cols in cols_list if not (group and cols % group)]
        weights = {}
        for rows, cols, m in covering(rows_list, fitting, ms):
            if (rows, cols) not in weights:
                w = compact(rng.standard_normal((rows, cols)).astype(np.float32), encoding, group)
                weights[rows, cols] = w, widened(w, encoding).astype(np.float64)
            w, wide = weights[rows, cols]
            x = rng.standard_normal((m, cols)).astype(np.float32)
            x[:, 0] = 8.0  # a column of outliers: x's rounding steps follow the largest
            y = product(jnp.asarray(x), w)
            if y is None:  # only the AMX and pairs roads take more than 16 rows
                assert m > kernel.MAX_ROWS
                assert not amx_road(choice, encoding, group, rows, cols, m)
                assert not pairs_road(choice, encoding, group, rows, cols, m)
                continue
            err = np.abs(np.asarray(y) - x.astype(np.float64) @ wide.T)
            bound = error_bound(x, wide, choice, encoding, group, m)
            assert (err <= bound + 1e-30).all(), (encoding, group, rows, cols, m)


@pytest.mark.parametrize("choice", ["auto", "fast"])
def test_products_match_the_reference_widening(choice):
    """auto: float32 arithmetic; fast: x rounded. For 5 rows of x or more (prefill's too): to
    bfloat16 or int8 in AMX tiles where the CPU has AMX (int4 weights widened to bfloat16
    against more than 16 rows), else in AVX512-BF16 pairs where it has those (bfloat16 weights
    against more than 16 rows in the pairs' columns, 19 rows leaving a partial tile; int8 codes in
    VPDPBUSD quads where the groups come in 64 columns, int4 codes in groups of 32 in VPDPBUSD
    group lanes; other codes widened to bfloat16). Off
    those roads int8 codes meet x rounded to 16 bits and int4 codes x rounded to int8 per 32
    columns (AVX512-VNNI; 16 bits where the columns do not come in blocks of 128)."""
    cols = (16, 96, 256, 1024, 2176)
    ms = (1, 2, 3, 4, 5, 16, 19, 40) if choice == "fast" else (1, 4, 5, 16)
    check_products(cols_list=cols, ms=ms, choice=choice)


def test_the_portable_path_matches_too():
    """The same checks with the AVX-512 path turned off (a process of its own: the path is
    chosen once per process)."""
    on_path("portable", "test_linear_kernel", "check_products(ms=(1, 3, 16), choice='fast')")


def test_with_vnni_alone_fast_takes_the_16_bit_road():
    """SLIMLLM_KERNELS_ISA=avx512-vnni turns AMX and AVX512-BF16 off: "fast" int8/int4 products
    are the VNNI road's at every batch size, and more than 16 rows go to XLA (a process of its
    own)."""
    on_path("avx512-vnni", "test_linear_kernel", "check_products(ms=(1, 5, 16, 40), choice='fast')")


def test_without_amx_fast_takes_the_pairs_road():
    """SLIMLLM_KERNELS_ISA=avx512-bf16 turns AMX off: more than 4 rows of x take the pairs road
    (the CPU's own road on Zen 4; a process of its own where the CPU has AMX)."""
    on_path("avx512-bf16", "test_linear_kernel", "check_products(ms=(1, 5, 16, 40), choice='fast')")


def check_pair_order(
    rows_list=(16, 48, 80, 208), cols_list=(32, 96, 1024), ms=(1, 3, 8, 16, 19, 40)
):
    """bfloat16 weights stored in pair order (`Compact.pairs`): with kernels "fast" where the
    CPU has the columns road (AVX512-BF16, no AMX) the kernel takes them at every row count
    (blocks of 48, 32 and 16 rows; full and partial tiles of x), within the pairs' bound (x
    rounded to bfloat16) and, above 16 rows, with the very bits of the same weights stored by
    rows (the same tiles, the copy skipped); elsewhere and with "auto" `linear` declines them,
    and XLA's product reads them as it reads rows."""
    rng = np.random.default_rng(5)

    def product(choice):
        def f(x, w):
            with kernels.choose(choice):
                return kernel.linear(x, w)

        return jax.jit(f)

    fast, auto, xla = product("fast"), product("auto"), jax.jit(compact_linear)
    road = kernels.isa() == "avx512-bf16"
    for rows, cols, m in covering(rows_list, cols_list, ms):
        w = compact(rng.standard_normal((rows, cols)).astype(np.float32), "bfloat16", None)
        paired = Compact(to_pair_order(w.values), None, "bfloat16", pairs=True)
        wide = widened(w, "bfloat16").astype(np.float64)
        x = rng.standard_normal((m, cols)).astype(np.float32)
        x[:, 0] = 8.0
        y = fast(jnp.asarray(x), paired)
        assert (y is not None) == road, (rows, cols, m)
        if road:
            err = np.abs(np.asarray(y) - x.astype(np.float64) @ wide.T)
            bound = error_bound(x, wide, "fast", "bfloat16", None, max(m, 5))  # the pairs'
            assert (err <= bound + 1e-30).all(), (rows, cols, m)
            if m > kernel.MAX_ROWS:
                assert np.array_equal(np.asarray(y), np.asarray(fast(jnp.asarray(x), w)))
        assert auto(jnp.asarray(x), paired) is None
        got, want = (np.asarray(xla(jnp.asarray(x), v)) for v in (paired, w))
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def test_weights_in_pair_order_take_the_columns_at_every_row_count():
    check_pair_order()
    if kernels.isa() == "avx512-amx":  # the road runs only with AMX turned off
        on_path("avx512-bf16", "test_linear_kernel", "check_pair_order(ms=(1, 19))")


def raw_call(x, values, scale, encoding: str, integer: int, pairs: int, rows: int):
    """The custom call itself, its attributes as given (for the kernel's own refusals)."""
    call = jax.ffi.ffi_call(
        kernels.target("slimllm_linear"), jax.ShapeDtypeStruct((x.shape[0], rows), jnp.float32)
    )
    encoding = np.int32(kernel.ENCODING[encoding])
    integer, pairs = np.int32(integer), np.int32(pairs)
    return jax.block_until_ready(
        call(x, values, scale, encoding=encoding, integer=integer, pairs=pairs)
    )


def test_the_kernel_reads_pair_order_only_on_the_columns_road():
    """The custom call refuses weights in pair order it cannot read (another encoding, x not
    rounded): an error naming the layout, never a product of misread values."""
    x, scale = jnp.ones((1, 64), jnp.float32), jnp.ones((32, 1), jnp.float32)
    for encoding, values, integer in [
        ("int8", jnp.ones((2, 1024), jnp.int8), 1),
        ("bfloat16", jnp.ones((2, 1024), jnp.uint16), 0),
    ]:
        with pytest.raises(Exception, match="weights in pair order need bfloat16"):
            raw_call(x, values, scale, encoding, integer, 1, 32)


@pytest.mark.parametrize("choice", ["auto", "fast"])
def test_scales_reach_the_kernel_in_their_encodings_width(choice):
    """int4's scales are float16 (read and widened by every road, `scale_of` in
    src/linear.cc), int8's float32: `linear` hands a weight's scales over in its encoding's
    width, so the same values held in the other width give the same bits (rows leave partial
    tiles and work items), and the kernel refuses a scale array of the wrong width."""
    rng = np.random.default_rng(3)

    @jax.jit
    def product(x, w):
        with kernels.choose(choice):
            return kernel.linear(x, w)

    for encoding, group in [("int8", None), ("int8", 64), ("int4", 32), ("int4", 128)]:
        w = compact(rng.standard_normal((203, 1024)).astype(np.float32), encoding, group)
        halves = np.asarray(w.scale).astype(np.float16)  # values both widths hold
        pair = [
            Compact(w.values, jnp.asarray(halves.astype(d)), encoding)
            for d in (np.float16, np.float32)
        ]
        for m in (1, 3, 4, 16, 40):
            x = jnp.asarray(rng.standard_normal((m, 1024)).astype(np.float32))
            y16, y32 = (product(x, v) for v in pair)
            if y16 is None:
                assert y32 is None and m > kernel.MAX_ROWS
                continue
            assert np.array_equal(np.asarray(y16), np.asarray(y32)), (encoding, group, m)
    w = compact(np.ones((32, 64), np.float32), "int4", 32)
    x = jnp.ones((1, 64), jnp.float32)
    for encoding, scale in [("int4", w.scale.astype(jnp.float32)), ("int8", w.scale)]:
        values = w.values if encoding == "int4" else jnp.ones((32, 64), jnp.int8)
        with pytest.raises(Exception, match="float16 for int4 and float32 otherwise"):
            raw_call(x, values, scale, encoding, 1, 0, 32)


def test_prefill_rows_take_a_fast_road_only_where_the_cpu_has_one():
    w = compact(np.ones((32, 64), np.float32), "int8", None)
    with kernels.choose("fast"):
        taken = kernel.linear(jnp.ones((40, 64), jnp.float32), w) is not None
    assert taken == (kernels.isa() in ("avx512-amx", "avx512-bf16"))
    with kernels.choose("auto"):
        assert kernel.linear(jnp.ones((40, 64), jnp.float32), w) is None


def test_an_unknown_instruction_set_cap_is_refused():
    """SLIMLLM_KERNELS_ISA must name a tier (the library would ignore anything else): the API
    raises the user-error type, and the command line says so in one line, exit status 2."""
    env = dict(os.environ, SLIMLLM_KERNELS_ISA="avx2")
    said = "SLIMLLM_KERNELS_ISA='avx2' is not one of portable, avx512"
    code = (
        "from slimllm import kernels; from slimllm.reference.errors import SlimllmError\n"
        "try:\n    kernels.available()\nexcept SlimllmError as e:\n    print(e)"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True)
    assert done.returncode == 0 and said in done.stdout.decode(), done.stderr.decode()
    cli = [sys.executable, "-m", "slimllm.cli", "demo"]
    done = subprocess.run(cli, cwd=ROOT, env=env, capture_output=True)
    errors = done.stderr.decode().strip().splitlines()
    assert done.returncode == 2 and said in errors[-1] and "Traceback" not in done.stderr.decode()


def test_widths_the_kernel_does_not_tile_go_to_xla():
    w = jnp.ones((8, 24), jnp.float32)
    assert kernel.linear(jnp.ones((1, 24), jnp.float32), w) is None  # 24 columns: not 16-wide
    assert kernel.linear(jnp.ones((17, 32), jnp.float32), jnp.ones((8, 32))) is None  # 17 rows
    with kernels.choose("xla"):
        assert kernel.linear(jnp.ones((1, 32), jnp.float32), jnp.ones((8, 32))) is None


# The compiled programs that hold a decode step: stream mode's loop with its token channel where
# the kernels run, else its program a token (kernels "xla"), and loop mode's loop.
DECODES = ("channel_loop_fn", "step_fn", "loop_fn")


def decode_hlo(model, rt_kernels: str) -> str:
    """The lowered text of the model's streamed decode under this kernels choice."""
    out = slimllm.generate(
        model, ids=[[1, 2, 3]], max_new_tokens=2, mode="stream", kernels=rt_kernels
    )
    assert len(out.ids[0]) == 2
    engine = model.engine()
    texts = [
        c.program.lower(*args).as_text()
        for key, (c, args) in engine_programs(engine).items()
        if key[0] in DECODES and dict(key[1])["rt"].kernels == rt_kernels
    ]
    assert texts
    return "\n".join(texts)


def engine_programs(engine):
    """Compiled decode programs with arguments of their shapes (re-lowered for their text)."""
    found = {}
    for key, compiled in engine.programs.items():
        if key[0] not in DECODES:
            continue
        shapes = key[3]
        args = [jax.ShapeDtypeStruct(s, d) for s, d in shapes]
        tree = key[2]
        found[key] = (compiled, (engine.params, *jax.tree_util.tree_unflatten(tree, args)))
    return found


def test_decode_calls_the_kernel_unless_told_not_to(stories):
    model, oracle = stories
    assert "slimllm_linear" in decode_hlo(model, "auto")
    assert "slimllm_linear" not in decode_hlo(model, "xla")


def test_tensor_parallel_ranks_call_the_kernel_on_their_slices():
    """tp=2 over two XLA devices (shard_map): each rank multiplies its slice in the kernel, and
    the ids are those of tp=1 (the MPI path runs the same program per rank: tests/distributed)."""
    model = slimllm.load(FIXTURES / "llama")
    prompt = [[1, 5, 9, 2]]
    one = slimllm.generate(model, ids=prompt, max_new_tokens=8, eos_ids=())
    before = kernel.traced["float32"]
    two = slimllm.generate(model, ids=prompt, max_new_tokens=8, eos_ids=(), tp=2)
    assert kernel.traced["float32"] > before  # the tp=2 programs were traced with the kernel
    assert one.ids == two.ids


@pytest.mark.parametrize("choice", ["auto", "xla"])
def test_greedy_ids_are_the_oracles_on_both_paths(stories, choice):
    model, oracle = stories
    prompt = oracle["prompt_a"].tolist()
    n = len(oracle["greedy_a"])
    got = slimllm.generate(model, ids=[prompt], max_new_tokens=n, eos_ids=(), kernels=choice)
    assert got.ids[0] == oracle["greedy_a"].tolist()


def test_without_the_library_every_program_is_pure_xla():
    """SLIMLLM_KERNELS=off stands for a build without the library: nothing loads, the programs
    hold no custom call, and generation still gives the oracle's ids."""
    code = f"""
import json, numpy as np, slimllm
from slimllm import kernels
model = slimllm.load({str(STORIES / "stories260K.bin")!r})
oracle = np.load({str(STORIES / "oracle.npz")!r})
out = slimllm.generate(model, ids=[oracle["prompt_a"].tolist()],
                       max_new_tokens=len(oracle["greedy_a"]), eos_ids=())
print(json.dumps({{"available": kernels.available(), "isa": kernels.isa(),
                   "same": out.ids[0] == oracle["greedy_a"].tolist()}}))
"""
    env = dict(os.environ, SLIMLLM_KERNELS="off")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True)
    assert done.returncode == 0, done.stderr.decode()
    report = json.loads(done.stdout.decode().strip().splitlines()[-1])
    assert report == {"available": False, "isa": "xla", "same": True}
