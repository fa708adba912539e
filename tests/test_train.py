"""The training script of the shipped model (`slimllm.train`) and its corpus, on a tiny config:
the loss falls, and the checkpoint it writes is what it trained (slimllm.load reads it back to
the same held-out perplexity)."""

import dataclasses
import json

import numpy as np
import pytest

import slimllm
from slimllm import corpus, train


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny")
    s = dataclasses.replace(train.TINY, dtype="float32", steps=30, log_every=10, eval_every=30)
    log = train.train(s, out, docs=corpus.topic_documents())
    return out, log


def test_a_few_steps_lower_the_training_loss(trained):
    _, log = trained
    losses = [p["loss"] for p in log["curve"]]
    assert len(losses) == 3 and losses[-1] < losses[0] - 0.3
    assert all(np.isfinite(p["grad_norm"]) for p in log["curve"])
    assert log["tokens_seen"] == 30 * train.TINY.batch * train.TINY.context


def test_the_checkpoint_is_the_trained_model(trained):
    out, log = trained
    names = {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"}
    assert names | {"generation_config.json", "heldout.txt", "README.md"} <= {
        f.name for f in out.iterdir()
    }
    model = slimllm.load(out)
    assert model.family == "llama" and model.cfg.tied_head and model.weights == "float32"
    assert model.cfg.n_params() == log["parameters"]
    # float32 storage: the loaded weights give the in-memory weights' perplexity (a weight split,
    # transposed or named wrongly on the way out would not)
    assert log["held_out_perplexity"] == pytest.approx(log["held_out_perplexity_float32"], 1e-4)
    assert log == json.loads((out / "training_log.json").read_text())


def test_the_tokenizer_round_trips_text_and_wraps_it_in_bos(trained):
    out, _ = trained
    tok = slimllm.load(out).tokenizer
    text = "def f(x):\n    return x ** 2  # é, ✓"
    ids = tok.encode(text)
    assert ids[0] == tok.bos_id == 0 and tok.eos_ids == (1,)
    assert tok.decode(ids) == text


def test_training_is_reproducible(tmp_path):
    s = dataclasses.replace(train.TINY, steps=3, log_every=3, eval_every=3)
    docs = corpus.topic_documents()
    a = train.train(s, tmp_path / "a", docs=docs)
    b = train.train(s, tmp_path / "b", docs=docs)
    assert [p["loss"] for p in a["curve"]] == [p["loss"] for p in b["curve"]]
    assert (tmp_path / "a" / "tokenizer.json").read_text() == (
        tmp_path / "b" / "tokenizer.json"
    ).read_text()


def test_docstrings_are_read_without_importing(tmp_path):
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "__init__.py").write_text(
        '"""A package docstring that is long enough to keep."""\n'
        "raise SystemExit('imported!')\n"
        "class Thing:\n"
        '    """A class docstring that is long enough to keep, too."""\n'
        "    def run(self):\n"
        '        """Run the thing, and say so in more than forty characters."""\n'
        "    def short(self):\n"
        '        """Too short."""\n'
    )
    (tmp_path / "test").mkdir()
    (tmp_path / "test" / "m.py").write_text('"""Tests are skipped however long this docstring."""')
    docs = corpus.docstring_documents(tmp_path)
    assert [d.name for d in docs] == ["pkg", "pkg.Thing", "pkg.Thing.run"]
    assert docs[2].text.startswith("pkg.Thing.run\n\nRun the thing")


def test_the_held_out_split_is_fixed_by_name():
    docs = corpus.topic_documents() + corpus.builtin_documents()
    training, held = corpus.split(docs)
    assert len(training) + len(held) == len(docs) and 0 < len(held) < len(docs) / 10
    assert {d.name for d in held} == {d.name for d in docs if d.held_out}
    assert not {d.name for d in training} & {d.name for d in held}
    assert any(d.name == "str.split" for d in docs)  # a C method's docstring


def test_a_missing_checkpoint_is_one_line_not_a_traceback(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit:
        train.main(["--check-transformers", "--out", str(tmp_path / "none")])
    err = capsys.readouterr().err
    assert exit.value.code == 2 and "no such file or directory" in err and err.count("\n") == 1
