"""The model slimllm ships (`slimllm.SHIPPED_MODEL`): small enough to ship, as good as its model
card says, and the text features of the command line (--prompt, --stop, eval --text, the demo)
working on it."""

import json

import pytest

import slimllm
from slimllm import train
from slimllm.cli import main
from slimllm.commands import DEMO_PROMPT

MODEL = slimllm.SHIPPED_MODEL
PROMPT = "Return a new list"
PERPLEXITY_BOUND = 30  # the model card: 26.27 (bfloat16 weights as shipped)


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    assert code == 0, err
    return out


@pytest.fixture(scope="module")
def model():
    return slimllm.load(MODEL)


@pytest.fixture(scope="module")
def log():
    return json.loads((MODEL / "training_log.json").read_text())


def test_it_is_small_enough_to_ship(model, log):
    files = {f.name: f.stat().st_size for f in MODEL.iterdir()}
    weights_and_tokenizer = sum(files[n] for n in files if n not in ("heldout.txt",))
    assert weights_and_tokenizer < 10.5e6, files
    assert model.family == "llama" and model.weights == log["settings"]["dtype"]
    assert model.cfg.n_params() == log["parameters"]


def test_its_held_out_perplexity_is_the_model_cards(model, log):
    measured = train.model_perplexity(model, train.held_out_documents(MODEL))
    assert measured == pytest.approx(log["held_out_perplexity"], rel=1e-3)
    assert measured < PERPLEXITY_BOUND
    card = (MODEL / "README.md").read_text()
    assert f"**{log['held_out_perplexity']}**" in card


def generate_json(capsys, *options):
    out = run(capsys, "generate", "--model", str(MODEL), "--prompt", PROMPT, "--json", *options)
    return json.loads(out)


def test_generate_prompt_gives_text(capsys, model):
    result = generate_json(capsys, "--max-new-tokens", "30", "--no-eos")
    assert result["prompt_ids"] == model.tokenizer.encode(PROMPT)
    assert len(result["ids"]) == 30 and result["text"] == model.tokenizer.decode(result["ids"])
    assert result["text"].strip()


def test_a_stop_string_ends_the_text_at_the_token_that_writes_it(capsys, model):
    free = generate_json(capsys, "--max-new-tokens", "60", "--no-eos")["ids"]
    # the stop: the first character the free run writes after its first 4 tokens
    decode = model.tokenizer.decode
    stop = decode(free)[len(decode(free[:4]))]
    end = next(n for n in range(1, len(free) + 1) if stop in decode(free[:n]))
    stopped = generate_json(capsys, "--max-new-tokens", "60", "--no-eos", "--stop", stop)
    assert stopped["ids"] == free[:end] and stopped["finish_reason"] == "stop"


def test_eval_text_compares_a_setting_on_real_text(capsys, model):
    text = train.held_out_documents(MODEL)[0][:400]
    out = run(capsys, "eval", "--model", str(MODEL), "--text", text, "--kv-dtype", "int8", "--json")
    report = json.loads(out)
    n = len(model.tokenizer.encode(text)[: model.cfg.max_len])
    assert report["positions"] == n
    assert 1 < report["perplexity"]["baseline"] < 1e4
    assert report["kl"]["mean"] < 1e-2 and report["top1_agreement"] > 0.9


def test_the_demo_streams_the_shipped_models_text(capsys, model):
    out = run(capsys, "demo", "--max-new-tokens", "12")
    result = json.loads(run(capsys, "demo", "--max-new-tokens", "12", "--json"))
    assert result["model"] == str(MODEL)
    assert DEMO_PROMPT + result["text"] in out  # the prompt, then the continuation as it streamed
    assert "tokens/s" in out and "compile" in out and "Try next" in out


def test_the_readmes_python_example_runs(capsys, monkeypatch):
    root = MODEL.parents[2]
    readme = (root / "README.md").read_text()
    code = readme.split("```python\n", 1)[1].split("```", 1)[0]
    monkeypatch.chdir(root)  # its paths are a clone's
    exec(compile(code, "README.md", "exec"), {})
    out = capsys.readouterr().out.splitlines()
    assert out[0].endswith("tok/s") and "".join(out[1:]).strip()  # stories, then the text
