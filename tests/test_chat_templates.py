"""Named chat templates render the conversation format they are named after."""

import jinja2.sandbox
import pytest

from composer.chat_templates import CHAT_TEMPLATES, template_text

CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi?"},
    {"role": "assistant", "content": "Hello."},
]
EXPECTED = {
    "chatml": "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi?<|im_end|>\n<|im_start|>assistant\nHello.<|im_end|>\n<|im_start|>assistant\n",
    "llama3": "<s><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nHi?<|eot_id|>"
    "<|start_header_id|>assistant<|end_header_id|>\n\nHello.<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n",
    "mistral": "<s>[INST] Be brief. [/INST][INST] Hi? [/INST]Hello.</s>",
    "zephyr": "<|system|>\nBe brief.</s>\n<|user|>\nHi?</s>\n<|assistant|>\nHello.</s>\n<|assistant|>\n",
    "alpaca": "Be brief.\n\n### Instruction:\nHi?\n\n### Response:\nHello.</s>\n\n### Response:\n",
    "exaone": "[|system|]Be brief.[|endofturn|]\n[|user|]Hi?\n[|assistant|]Hello.[|endofturn|]\n[|assistant|]",
}


@pytest.mark.parametrize("name", sorted(CHAT_TEMPLATES))
def test_named_template_renders_its_format(name):
    environment = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    text = environment.from_string(template_text(name)).render(
        messages=CONVERSATION, add_generation_prompt=True, bos_token="<s>", eos_token="</s>"
    )
    assert text == EXPECTED[name]


def test_any_other_value_is_the_template_itself():
    assert template_text("{{ messages[0]['content'] }}") == "{{ messages[0]['content'] }}"


def test_exaone_without_a_system_message_opens_with_an_empty_one():
    text = (
        jinja2.sandbox.ImmutableSandboxedEnvironment()
        .from_string(template_text("exaone"))
        .render(messages=CONVERSATION[1:], add_generation_prompt=False)
    )
    assert text == "[|system|][|endofturn|]\n[|user|]Hi?\n[|assistant|]Hello.[|endofturn|]\n"


@pytest.mark.parametrize("value", ["gemma", "chat-ml", "Llama3"])
def test_a_word_that_is_no_template_name_is_refused(value):
    """mergekit refuses a chat_template with no '{' in it; composer would otherwise write the word as every prompt."""
    from composer.chat_templates import check_template

    with pytest.raises(ValueError, match=f"'{value}' is not a known template name .*exaone.* nor a Jinja template"):
        check_template(value)


def test_auto_takes_the_template_most_models_have():
    from composer.chat_templates import most_common_template

    assert most_common_template([None, "A", "B", "A"], preferred="B") == "A"
    assert most_common_template([None, "A", "B"], preferred="B") == "B"  # a tie: the tokenizer source's
    assert most_common_template([None, "A", "B"], preferred=None) == "A"  # else the first
    assert most_common_template([None, None], preferred=None) is None
