"""The official `openai` client against `slimllm serve`: completions and chat, streamed and
not, n choices, stop strings and logprobs, each compared with `slimllm.generate` run here with
the same settings (greedy and seeded): the texts and token ids must be identical."""

# ruff: noqa: F811 - the fixtures imported from serving.py are parameters here
from __future__ import annotations

import numpy as np
import openai
import pytest
from serving import TEMPLATE, model, model_dir, server  # noqa: F401 - fixtures

import slimllm
from slimllm.chat import render

PROMPT = "Open the file"


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)


def test_models_lists_the_served_model(client):
    assert [m.id for m in client.models.list().data] == ["tiny"]


def test_greedy_completion_equals_generate(client, model):
    r = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=24, temperature=0)
    out = slimllm.generate(model, PROMPT, max_new_tokens=24)
    assert r.choices[0].text == out.text
    assert r.choices[0].finish_reason == {"eos": "stop"}.get(out.finish_reasons[0], "length")
    assert r.usage.prompt_tokens == len(out.prompt_ids[0])
    assert r.usage.completion_tokens == len(out.ids[0])
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_seeded_choices_equal_generate_with_seed_plus_i(client, model):
    settings = dict(temperature=0.8, top_p=0.9)
    r = client.completions.create(
        model="tiny", prompt=PROMPT, max_tokens=20, n=2, seed=7, **settings
    )
    texts = [c.text for c in sorted(r.choices, key=lambda c: c.index)]
    for i, text in enumerate(texts):
        assert (
            text == slimllm.generate(model, PROMPT, max_new_tokens=20, seed=7 + i, **settings).text
        )
    assert texts[0] != texts[1]  # different seeds, different samples (checked for this prompt)


def test_token_id_prompts_and_a_list_of_prompts(client, model):
    ids = model.tokenizer.encode("The json module")
    r = client.completions.create(model="tiny", prompt=ids, max_tokens=12, temperature=0)
    assert r.choices[0].text == slimllm.generate(model, ids=ids, max_new_tokens=12).text
    r = client.completions.create(
        model="tiny", prompt=[PROMPT, "The json module"], max_tokens=12, temperature=0
    )
    texts = [c.text for c in sorted(r.choices, key=lambda c: c.index)]
    out = slimllm.generate(model, [PROMPT, "The json module"], max_new_tokens=12)
    assert texts == out.texts


def test_streamed_completion_equals_whole_and_counts_usage(client, model):
    settings = dict(model="tiny", prompt=PROMPT, max_tokens=30, temperature=1.0, top_k=40, seed=3)
    extra = {"top_k": settings.pop("top_k")}
    whole = client.completions.create(**settings, extra_body=extra)
    chunks = list(
        client.completions.create(
            **settings, extra_body=extra, stream=True, stream_options={"include_usage": True}
        )
    )
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == whole.choices[0].text
    assert (
        text
        == slimllm.generate(
            model, PROMPT, max_new_tokens=30, temperature=1.0, top_k=40, seed=3
        ).text
    )
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 30
    finals = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finals[-1] == "length" and set(finals[:-1]) == {None}


def test_stop_strings_end_the_text_before_them(client, model):
    out = slimllm.generate(model, PROMPT, max_new_tokens=60, stop=["."])
    assert out.finish_reasons == ["stop"], "the fixture prompt must reach a '.'"
    expected = out.text[: out.text.index(".")]
    r = client.completions.create(
        model="tiny", prompt=PROMPT, max_tokens=60, temperature=0, stop="."
    )
    assert r.choices[0].text == expected and r.choices[0].finish_reason == "stop"
    chunks = list(
        client.completions.create(
            model="tiny", prompt=PROMPT, max_tokens=60, temperature=0, stop=["."], stream=True
        )
    )
    assert "".join(c.choices[0].text for c in chunks) == expected
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_completion_logprobs_equal_generate(client, model):
    r = client.completions.create(
        model="tiny", prompt=PROMPT, max_tokens=10, temperature=0, logprobs=3
    )
    out = slimllm.generate(model, PROMPT, max_new_tokens=10, logprobs=3)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(out.ids[0]) == 10
    want = [t.logprob for t in out.logprobs[0]]
    np.testing.assert_allclose(lp.token_logprobs, want, atol=1e-4)
    assert lp.tokens == [model.tokenizer.decode([i], skip_special=False) for i in out.ids[0]]
    for top, token in zip(lp.top_logprobs, out.logprobs[0]):
        pieces = [model.tokenizer.decode([i], skip_special=False) for i, _ in token.top]
        assert len(top) <= 3 and set(top) <= set(pieces)
    text = r.choices[0].text
    assert lp.text_offset[0] == 0 and all(
        text[a:].startswith(t) for a, t in zip(lp.text_offset, lp.tokens) if t
    )


def chat_ids(model, messages):
    text = render(TEMPLATE, messages, {"bos_token": "<s>", "eos_token": "</s>"})
    return model.tokenizer.encode(text, add_special=False)


def test_chat_equals_generate_on_the_rendered_prompt(client, model):
    messages = [
        {"role": "system", "content": "You document Python."},
        {"role": "user", "content": "How do I open a file?"},
    ]
    ids = chat_ids(model, messages)
    assert ids[0] == model.bos_id and ids[1] != model.bos_id  # one BOS, from the template
    out = slimllm.generate(model, ids=ids, max_new_tokens=20)
    r = client.chat.completions.create(
        model="tiny", messages=messages, max_tokens=20, temperature=0
    )
    assert r.choices[0].message.content == out.text and r.choices[0].message.role == "assistant"
    assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens == len(out.ids[0])
    chunks = list(
        client.chat.completions.create(
            model="tiny", messages=messages, max_tokens=20, temperature=0, stream=True
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == out.text
    assert chunks[-1].choices[0].finish_reason in ("length", "stop")


def test_chat_logprobs_and_seeded_choices(client, model):
    messages = [{"role": "user", "content": "Sort a list."}]
    ids = chat_ids(model, messages)
    r = client.chat.completions.create(
        model="tiny",
        messages=messages,
        max_completion_tokens=8,
        temperature=0.7,
        seed=11,
        n=2,
        logprobs=True,
        top_logprobs=2,
    )
    for choice in r.choices:
        out = slimllm.generate(
            model, ids=ids, max_new_tokens=8, temperature=0.7, seed=11 + choice.index, logprobs=2
        )
        assert choice.message.content == out.text
        content = choice.logprobs.content
        assert len(content) == len(out.ids[0])
        np.testing.assert_allclose(
            [c.logprob for c in content], [t.logprob for t in out.logprobs[0]], atol=1e-4
        )
        assert all(len(c.top_logprobs) == 2 and c.bytes == list(c.token.encode()) for c in content)
