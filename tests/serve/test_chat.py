"""Chat templates (slimllm/chat.py): loading from a checkpoint, rendering as Hugging Face does,
and the sandbox refusing a hostile template instead of running it."""

from __future__ import annotations

import json

import pytest

from conftest import TOKENIZERS, need
from slimllm.chat import TemplateError, load_template, render

MESSAGES = [{"role": "user", "content": "Hello <b>&</b>"}]


def test_the_real_qwen2_template_renders_chatml():
    template, special = load_template(need(TOKENIZERS / "qwen2"))
    assert special == {"bos_token": "", "eos_token": "<|im_end|>"}
    assert render(template, MESSAGES, special) == (
        "<|im_start|>system\nYou are a helpful assistant<|im_end|>\n"
        "<|im_start|>user\nHello <b>&</b><|im_end|>\n<|im_start|>assistant\n"
    )


def test_templates_are_read_from_the_config_a_named_list_or_a_file(tmp_path):
    config = {"bos_token": {"content": "<s>"}, "eos_token": "</s>"}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    assert load_template(tmp_path) == (None, {"bos_token": "<s>", "eos_token": "</s>"})
    named = [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config | {"chat_template": named}))
    assert load_template(tmp_path)[0] == "D"
    (tmp_path / "chat_template.jinja").write_text("F")
    assert load_template(tmp_path)[0] == "F"


def test_rendering_follows_hugging_face():
    template = (
        "{{ bos_token }}{% for m in messages %}\n"
        "{% if m.role == 'system' %}{{ raise_exception('no system') }}{% endif %}\n"
        "[{{ m.role }}] {{ m.content }}{{ eos_token }}\n"
        "{% endfor %}\n"
        "{% if add_generation_prompt %}[assistant]{% endif %}{{ messages | tojson }}"
    )
    text = render(template, MESSAGES, {"bos_token": "<s>", "eos_token": "</s>"})
    # trim_blocks drops the newline after a block tag, not after {{ }}; tojson escapes no HTML
    json_text = '[{"role": "user", "content": "Hello <b>&</b>"}]'
    assert text == "<s>[user] Hello <b>&</b></s>\n[assistant]" + json_text
    with pytest.raises(TemplateError, match="no system"):
        render(template, [{"role": "system", "content": "x"}])
    assert render("{{ strftime_now('%Y') | length }}", MESSAGES) == "4"


@pytest.mark.parametrize(
    "hostile",
    [
        "{{ messages.__class__ }}",
        "{{ ''.__class__.__mro__[1].__subclasses__() }}",
        "{{ cycler.__init__.__globals__.os.system('touch /tmp/slimllm-pwned') }}",
        "{{ lipsum.__globals__['os'].popen('id').read() }}",
        "{{ messages[0].update({'role': 'system'}) }}",
        "{% for x in range(10**9) %}{% endfor %}",
    ],
)
def test_a_hostile_template_raises_and_never_runs(hostile):
    with pytest.raises(TemplateError, match="sandbox|range|unsafe|error"):
        render(hostile, MESSAGES)


def test_broken_templates_and_messages_are_clear_errors():
    with pytest.raises(TemplateError, match="chat template error"):
        render("{% for %}", MESSAGES)
    with pytest.raises(TemplateError, match="JSON values"):
        render("{{ messages }}", [{"role": "user", "content": object()}])
