"""Tiny random MLX models for tests, built from real parts.

They use the real SmolLM2 tokenizer (imported from the embedded GGUF) and
mlx-lm's real llama implementation with random weights: fast enough for the
2-core CI machine, and loaded by the daemon exactly like any other model.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten
from mlx_lm.models import llama

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def build_tiny_model(
    dest: Path,
    tokenizer_dir: Path,
    *,
    vocab_size: int = 49152,
    context: int = 4096,
    seed: int = 0,
    out_of_vocab_head: bool = False,
    chat_template: str | None = None,
    thinking: bool = False,
    hidden_size: int = 64,
    heads: int = 4,
    kv_heads: int = 2,
    head_dim: int | None = None,
) -> Path:
    """Write a 2-layer random llama to `dest`.

    `out_of_vocab_head` makes a defective model: its vocabulary is larger than
    its tokenizer's, and its output head favours the ids past the tokenizer's
    end, so decoding its output fails. Real models with mismatched vocabularies
    fail the same way; the daemon must report it, not crash.

    `chat_template` replaces the tokenizer's template; `thinking` adds
    `<think>`/`</think>` tokens to the vocabulary, as reasoning models have.
    `heads`, `kv_heads` and `head_dim` shape attention (and so the KV cache's
    bytes per token) apart from the hidden size.
    """
    if thinking:
        vocab_size = max(vocab_size, 49152 + len(THINK_TOKENS))
    dest.mkdir(parents=True, exist_ok=True)
    config = {
        "model_type": "llama",
        "hidden_size": hidden_size,
        "num_hidden_layers": 2,
        "intermediate_size": 2 * hidden_size,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "rms_norm_eps": 1e-5,
        "vocab_size": vocab_size,
        "max_position_embeddings": context,
        "rope_theta": 10000.0,
        "tie_word_embeddings": not out_of_vocab_head,
    }
    if head_dim is not None:
        config["head_dim"] = head_dim
    mx.random.seed(seed)
    model = llama.Model(llama.ModelArgs.from_dict(config))
    weights = dict(tree_flatten(model.parameters()))
    if out_of_vocab_head:
        head = mx.random.normal((vocab_size, config["hidden_size"])) * 5.0
        known = 49152
        head = mx.concatenate([mx.zeros((known, config["hidden_size"])), head[known:]])
        weights["lm_head.weight"] = head
    mx.save_safetensors(str(dest / "model.safetensors"), weights)
    (dest / "config.json").write_text(json.dumps(config))
    for name in TOKENIZER_FILES:
        shutil.copy(tokenizer_dir / name, dest / name)
    if chat_template is not None:
        tokenizer_config = json.loads((dest / "tokenizer_config.json").read_text())
        tokenizer_config["chat_template"] = chat_template
        (dest / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    if thinking:
        tokenizer = json.loads((dest / "tokenizer.json").read_text())
        for offset, content in enumerate(THINK_TOKENS):
            tokenizer["added_tokens"].append(
                {
                    "id": 49152 + offset,
                    "content": content,
                    "single_word": False,
                    "lstrip": False,
                    "rstrip": False,
                    "normalized": False,
                    "special": False,
                }
            )
        (dest / "tokenizer.json").write_text(json.dumps(tokenizer))
    return dest


THINK_TOKENS = ("<think>", "</think>")

# A Qwen2.5-style template: tools listed in the system turn, calls written as
# <tool_call>{json}</tool_call>, results sent back as <tool_response>.
HERMES_TEMPLATE = """\
{%- if tools %}<|im_start|>system
{{ messages[0].content if messages[0].role == 'system' else 'You are helpful.' }}

# Tools
<tools>
{%- for tool in tools %}
{{ tool | tojson }}
{%- endfor %}
</tools>
Call a function with <tool_call></tool_call> XML tags.<|im_end|>
{% elif messages[0].role == 'system' %}<|im_start|>system
{{ messages[0].content }}<|im_end|>
{% endif %}
{%- for message in messages %}
{%- if message.role == 'system' and loop.first %}
{%- elif message.role == 'tool' %}<|im_start|>user
<tool_response>
{{ message.content }}
</tool_response><|im_end|>
{% elif message.role == 'assistant' %}<|im_start|>assistant
{{ message.content }}
{%- for call in message.tool_calls or [] %}
{%- set tool_call = call.function %}
<tool_call>
{"name": "{{ tool_call.name }}", "arguments": {{ tool_call.arguments | tojson }}}
</tool_call>
{%- endfor %}<|im_end|>
{% else %}<|im_start|>{{ message.role }}
{{ message.content }}<|im_end|>
{% endif %}
{%- endfor %}
{%- if add_generation_prompt %}<|im_start|>assistant
{% endif %}"""

# SmolLM2's chat format, with a reasoning section the generation prompt opens.
THINKING_TEMPLATE = """\
{%- for message in messages %}<|im_start|>{{ message.role }}
{{ message.content }}<|im_end|>
{% endfor %}
{%- if add_generation_prompt %}<|im_start|>assistant
{% if enable_thinking %}<think>
{% endif %}{% endif %}"""
