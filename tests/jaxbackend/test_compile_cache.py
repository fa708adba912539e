"""The compile cache on disk and the compile notice.

A second process on the same model and shapes reads every program from the cache the first
one filled (counted by `Engine.compiled`, not timed), through the API and through the CLI's
--compile-cache; where the cache lives by default; a compile that runs long says so once on
stderr, unless quiet. The rest of the suite runs with the cache off (conftest.py).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import slimllm
from slimllm import kernels
from slimllm.jaxbackend import engine as jax_engine
from slimllm.reference.config import ModelConfig
from slimllm.reference.errors import OptionError

ROOT = Path(__file__).resolve().parents[2]
SHAPE = dict(vocab=64, width=16, n_layers=1, n_heads=2, n_kv_heads=1, head_dim=8, ffn_width=32)
TINY = ModelConfig(**SHAPE, max_len=64)
CHILD = """
import json, slimllm
from slimllm.reference.config import ModelConfig
model = slimllm.demo_model(ModelConfig(**{shape!r}, max_len=64))
ids = [slimllm.generate(model, ids=[1, 2, 3], max_new_tokens=4, temperature=0.8, top_k=5,
                        mode=mode).ids for mode in ("loop", "stream")]
engine = model.engine(slimllm.Runtime())
print(json.dumps(dict(ids=ids, programs=len(engine.programs), compiled=engine.compiled)))
"""


def python(code: str, cache) -> str:
    env = os.environ | {"SLIMLLM_COMPILE_CACHE": str(cache), "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_a_second_process_compiles_nothing(tmp_path):
    code = CHILD.format(shape=SHAPE)
    first, second = (json.loads(python(code, tmp_path)) for _ in range(2))
    assert first["compiled"] == first["programs"] > 0
    assert second["compiled"] == 0 and second["programs"] == first["programs"]
    assert second["ids"] == first["ids"]


def test_cli_option_moves_or_disables_the_cache(tmp_path):
    env_dir, option_dir = tmp_path / "env", tmp_path / "option"
    run = "import sys; from slimllm.cli import main; sys.exit(main(sys.argv[1:]))"
    argv = ["demo", "--ids", "1,2", "--max-new-tokens", "2", "--json"]
    for value in (str(option_dir), "off"):
        code = f"import sys; sys.argv += {[*argv, '--compile-cache', value]!r}; {run}"
        python(code, env_dir)
    assert list(option_dir.glob("*prefill_fn*")) and not env_dir.exists()


def test_default_directory(monkeypatch, tmp_path):
    monkeypatch.delenv("SLIMLLM_COMPILE_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert jax_engine.default_cache_dir() == tmp_path / "slimllm" / "xla"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert jax_engine.default_cache_dir() == tmp_path / ".cache" / "slimllm" / "xla"
    for off in ("off", "OFF", "0"):
        monkeypatch.setenv("SLIMLLM_COMPILE_CACHE", off)
        assert jax_engine.default_cache_dir() is None
    monkeypatch.setenv("SLIMLLM_COMPILE_CACHE", "~/elsewhere")
    assert jax_engine.default_cache_dir() == tmp_path / "elsewhere"


def test_a_directory_that_cannot_be_made_is_named(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(OptionError, match="compile cache .*file/xla.* cannot be made"):
        slimllm.compile_cache(tmp_path / "file" / "xla")


def new_engine():
    return jax_engine.Engine(slimllm.demo_model(TINY).params, TINY)


def generate(engine):
    from slimllm.jaxbackend.generate import generate as run
    from slimllm.reference.generate import Stopping

    return run(engine, [[1, 2, 3]], Stopping(max_new_tokens=2), mode="stream")


def test_a_long_compile_says_so_once(monkeypatch, capsys):
    monkeypatch.setattr(jax_engine, "NOTICE_AFTER", 0.0)  # every compile is long
    engine = new_engine()
    generate(engine)
    lines = capsys.readouterr().err.splitlines()
    assert (
        lines[0] == "slimllm: compiling prefill for batch 1, cache 64 (first use of these shapes)"
    )
    # streaming: the loop with its token channel where the kernels run, else a program a token
    streams = ("channel_loop",) if kernels.available() else ("choose", "step")
    assert {line.split(" for ")[0] for line in lines} == {
        f"slimllm: compiling {name}" for name in ("prefill", *streams)
    }
    generate(engine)  # nothing new to compile
    assert capsys.readouterr().err == ""


def test_quiet_mode_keeps_the_notice_off(monkeypatch, capsys):
    monkeypatch.setattr(jax_engine, "NOTICE_AFTER", 0.0)
    monkeypatch.setenv("SLIMLLM_PROGRESS", "0")
    generate(new_engine())
    assert capsys.readouterr().err == ""
