"""Named chat templates a recipe can ask for (`chat_template: NAME`), written from each format's description.

Any other value of `chat_template` is taken as a Jinja template itself; `auto` takes the template most of the
merged models have.
"""

from __future__ import annotations

from collections import Counter

CHAT_TEMPLATES = {
    "chatml": (
        "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    ),
    "llama3": (
        "{{ bos_token }}{% for message in messages %}"
        "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
    ),
    "mistral": (
        "{{ bos_token }}{% for message in messages %}"
        "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
        "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token }}"
        "{% else %}{{ '[INST] ' + message['content'] + ' [/INST]' }}{% endif %}{% endfor %}"
    ),
    "zephyr": (
        "{% for message in messages %}{{ '<|' + message['role'] + '|>\\n' + message['content'] + eos_token + '\\n' }}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
    ),
    "alpaca": (
        "{% for message in messages %}{% if message['role'] == 'system' %}{{ message['content'] + '\\n\\n' }}"
        "{% elif message['role'] == 'user' %}{{ '### Instruction:\\n' + message['content'] + '\\n\\n' }}"
        "{% elif message['role'] == 'assistant' %}{{ '### Response:\\n' + message['content'] + eos_token + '\\n\\n' }}"
        "{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '### Response:\\n' }}{% endif %}"
    ),
    # EXAONE: `[|role|]` before each message; a user turn ends with a newline, any other with [|endofturn|];
    # an empty system turn first when the chat has none
    "exaone": (
        "{% for message in messages %}"
        "{% if loop.first and message['role'] != 'system' %}{{ '[|system|][|endofturn|]\\n' }}{% endif %}"
        "{{ '[|' + message['role'] + '|]' + message['content'] }}"
        "{{ '\\n' if message['role'] == 'user' else '[|endofturn|]\\n' }}"
        "{% endfor %}{% if add_generation_prompt %}{{ '[|assistant|]' }}{% endif %}"
    ),
}


def most_common_template(templates: list[str | None], preferred: str | None) -> str | None:
    """`chat_template: auto`: the template most of the merged models have (None where none has one), as mergekit
    picks it; among equally common ones, `preferred` (the tokenizer source's) where it is one, else the first."""
    counts = Counter(template for template in templates if template)
    if not counts:
        return None
    most = max(counts.values())
    tied = [template for template, count in counts.items() if count == most]
    return preferred if preferred in tied else tied[0]


def template_text(choice: str) -> str:
    """The Jinja text for a recipe's `chat_template` value: a known name, or the value itself."""
    return CHAT_TEMPLATES.get(choice, choice)


def check_template(choice: str | None) -> str | None:
    """A recipe's `chat_template` value, refused (ValueError) when it is neither a known name nor Jinja that parses:
    a template with a syntax error would be written into the output and fail on every chat there."""
    if choice is None or choice == "auto" or choice in CHAT_TEMPLATES:
        return choice
    known = ", ".join(["auto", *CHAT_TEMPLATES])
    if "{" not in choice:  # text with no Jinja in it would be written out as every chat's whole prompt
        raise ValueError(
            f"{choice!r} is not a known template name ({known}) nor a Jinja template (it has no '{{{{' or '{{%')"
        )
    try:
        from jinja2 import TemplateSyntaxError
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError:  # torch and transformers bring jinja2; without it the template is written unchecked
        return choice
    try:
        ImmutableSandboxedEnvironment().parse(choice)
    except TemplateSyntaxError as error:
        raise ValueError(
            f"not a known template name ({known}) and not valid Jinja (line {error.lineno}: {error.message})"
        ) from None
    return choice
