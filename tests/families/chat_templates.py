"""Chat templates in each family's real format, for the tiny models built by family_models.py.

Every template takes an optional leading system message, alternating user/assistant turns and
`add_generation_prompt`. The generation prompt is exactly the text that precedes an assistant
turn's content in the full rendering, so rendering the prefix with the prompt locates each turn.
Templates marked "markers" wrap the assistant content and its end-of-turn token in
`{% generation %} ... {% endgeneration %}` (for `return_assistant_tokens_mask`).
"""

from __future__ import annotations

# Llama 3.x (the 3.0 template; 3.1 adds tool and date blocks). BOS first, content trimmed.
LLAMA3 = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'"
    " + message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)

_MISTRAL_HEAD = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{%- set system_message = messages[0]['content'] %}{%- set loop_messages = messages[1:] %}"
    "{%- else %}{%- set loop_messages = messages %}{%- endif %}"
    "{{- bos_token }}"
    "{%- for message in loop_messages %}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{- raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{%- endif %}"
    "{%- if message['role'] == 'user' %}"
    "{%- if loop.first and system_message is defined %}"
    "{{- '[INST] ' + system_message + '\\n\\n' + message['content'] + ' [/INST]' }}"
    "{%- else %}{{- '[INST] ' + message['content'] + ' [/INST]' }}{%- endif %}"
    "{%- elif message['role'] == 'assistant' %}"
)
# Mistral Instruct: the system message is folded into the first [INST]; no generation prompt
# (the assistant content follows " [/INST]" directly).
MISTRAL = _MISTRAL_HEAD + "{{- message['content'] + eos_token }}{%- endif %}{%- endfor %}"
MIXTRAL = (_MISTRAL_HEAD + "{% generation %}{{- message['content'] + eos_token }}{% endgeneration %}"
           "{%- endif %}{%- endfor %}")

_CHATML_TURNS = (
    "{%- for message in messages %}"
    "{%- if message['role'] == 'assistant' %}"
    "{{- '<|im_start|>assistant\\n' }}{{ ASSISTANT }}"
    "{%- elif not (message['role'] == 'system' and loop.first and SKIP_FIRST_SYSTEM) %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def _chatml(*, default_system: bool, markers: bool) -> str:
    assistant = ("{% generation %}{{- message['content'] + '<|im_end|>' }}{% endgeneration %}{{- '\\n' }}"
                 if markers else "{{- message['content'] + '<|im_end|>\\n' }}")
    turns = _CHATML_TURNS.replace("{{ ASSISTANT }}", assistant)
    if not default_system:
        return turns.replace(" and SKIP_FIRST_SYSTEM", " and false")
    # Qwen2 / Qwen2.5: a default system message when none is given.
    head = ("{%- if messages[0]['role'] == 'system' %}"
            "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
            "{%- else %}{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{%- endif %}")
    return head + turns.replace(" and SKIP_FIRST_SYSTEM", "")


QWEN2 = _chatml(default_system=True, markers=False)
QWEN2_MOE = _chatml(default_system=False, markers=True)
QWEN3 = _chatml(default_system=False, markers=False)


def _gemma(*, markers: bool) -> str:
    # Gemma 3 style: the system message is folded into the first user turn; assistant -> "model".
    close = ("{% generation %}{{- message['content'] + '<end_of_turn>' }}{% endgeneration %}{{- '\\n' }}"
             if markers else "{{- message['content'] + '<end_of_turn>\\n' }}")
    return (
        "{{- bos_token }}"
        "{%- if messages[0]['role'] == 'system' %}"
        "{%- set first_user_prefix = messages[0]['content'] + '\\n\\n' %}{%- set loop_messages = messages[1:] %}"
        "{%- else %}{%- set first_user_prefix = '' %}{%- set loop_messages = messages %}{%- endif %}"
        "{%- for message in loop_messages %}"
        "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
        "{{- raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
        "{%- endif %}"
        "{%- if message['role'] == 'assistant' %}{{- '<start_of_turn>model\\n' }}" + close +
        "{%- else %}{{- '<start_of_turn>' + message['role'] + '\\n' + (first_user_prefix if loop.first else '')"
        " + message['content'] + '<end_of_turn>\\n' }}{%- endif %}"
        "{%- endfor %}"
        "{%- if add_generation_prompt %}{{- '<start_of_turn>model\\n' }}{%- endif %}"
    )


GEMMA = _gemma(markers=False)
GEMMA3 = _gemma(markers=True)

# Phi-3 instruct.
PHI3 = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{%- if message['role'] in ('system', 'user', 'assistant') %}"
    "{{- '<|' + message['role'] + '|>\\n' + message['content'] + '<|end|>\\n' }}"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|assistant|>\\n' }}{%- endif %}"
)

# Falcon-instruct style, each assistant turn closed with the eos token.
FALCON = (
    "{%- for message in messages %}"
    "{%- if message['role'] == 'system' %}{{- 'System: ' + message['content'] + '\\n' }}"
    "{%- elif message['role'] == 'user' %}{{- 'User: ' + message['content'] + '\\n' }}"
    "{%- elif message['role'] == 'assistant' %}{{- 'Falcon: ' + message['content'] + eos_token + '\\n' }}"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- 'Falcon: ' }}{%- endif %}"
)


def _instruction(*, markers: bool) -> str:
    # Base models have no official template: a plain "### Role:" instruction format.
    assistant = ("{% generation %}{{- message['content'] + eos_token }}{% endgeneration %}{{- '\\n\\n' }}"
                 if markers else "{{- message['content'] + eos_token + '\\n\\n' }}")
    return (
        "{%- for message in messages %}"
        "{%- if message['role'] == 'system' %}{{- '### System:\\n' + message['content'] + '\\n\\n' }}"
        "{%- elif message['role'] == 'user' %}{{- '### User:\\n' + message['content'] + '\\n\\n' }}"
        "{%- elif message['role'] == 'assistant' %}{{- '### Assistant:\\n' }}" + assistant +
        "{%- endif %}{%- endfor %}"
        "{%- if add_generation_prompt %}{{- '### Assistant:\\n' }}{%- endif %}"
    )


INSTRUCTION = _instruction(markers=False)
INSTRUCTION_MARKED = _instruction(markers=True)
