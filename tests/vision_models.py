"""A tiny random Qwen2-VL for tests, built from real parts like tests/models.py's text models.

The SmolLM2 tokenizer (ChatML already) with Qwen2-VL's vision tokens added,
mlx-vlm's own torch-free image processor, and mlx-vlm's qwen2_vl model with
random weights: a 2-layer language model with mRoPE behind a 2-block vision
tower, loaded by mlx-vlm exactly as a real Qwen2-VL directory is.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten

VISION_TOKENS = ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")
# ChatML with image parts where they stand, as Qwen2-VL's own template writes them.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# Small images make few patches: 28x28 pixels a token (patch 14, merged 2x2).
MIN_PIXELS = 56 * 56
MAX_PIXELS = 224 * 224


# Each family's vision tower, tiny: 2 blocks over 14-pixel patches, merged 2x2.
VISION_TOWERS = {
    "qwen2_vl": {"embed_dim": 32, "hidden_size": 64, "num_heads": 2, "mlp_ratio": 2},
    # Qwen2.5-VL: windowed attention in every block but the listed ones.
    "qwen2_5_vl": {
        "hidden_size": 32,
        "out_hidden_size": 64,
        "intermediate_size": 64,
        "num_heads": 2,
        "window_size": 112,
        "fullatt_block_indexes": [1],
    },
}


def build_tiny_vlm(
    dest: Path, tokenizer_dir: Path, *, family: str = "qwen2_vl", seed: int = 0
) -> Path:
    """Write a random Qwen2-VL or Qwen2.5-VL (2 text layers, 2 vision blocks) to `dest`."""
    from mlx_vlm.utils import get_model_and_args, update_module_configs
    from transformers import AutoTokenizer

    dest.mkdir(parents=True, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    tokenizer.add_special_tokens({"additional_special_tokens": list(VISION_TOKENS)})
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(str(dest))
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in VISION_TOKENS}
    (dest / "preprocessor_config.json").write_text(
        json.dumps(
            {
                "image_processor_type": "Qwen2VLImageProcessor",
                "processor_class": "Qwen2VLProcessor",
                "patch_size": 14,
                "temporal_patch_size": 2,
                "merge_size": 2,
                "min_pixels": MIN_PIXELS,
                "max_pixels": MAX_PIXELS,
                "image_mean": [0.48145466, 0.4578275, 0.40821073],
                "image_std": [0.26862954, 0.26130258, 0.27577711],
            }
        )
    )
    config = {
        "model_type": family,
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "intermediate_size": 128,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "rms_norm_eps": 1e-6,
        "vocab_size": len(tokenizer),
        "max_position_embeddings": 4096,
        "rope_theta": 1e6,
        # head_dim 16: 8 frequencies, split 2/3/3 between time, height and width.
        "rope_scaling": {"type": "mrope", "mrope_section": [2, 3, 3]},
        "tie_word_embeddings": False,
        "image_token_id": ids["<|image_pad|>"],
        "video_token_id": ids["<|video_pad|>"],
        "vision_start_token_id": ids["<|vision_start|>"],
        "vision_end_token_id": ids["<|vision_end|>"],
        "eos_token_id": tokenizer.convert_tokens_to_ids("<|im_end|>"),
        "vision_config": {
            "model_type": family,
            "depth": 2,
            "patch_size": 14,
            "spatial_patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "in_channels": 3,
            **VISION_TOWERS[family],
        },
    }
    (dest / "config.json").write_text(json.dumps(config, indent=1))
    mx.random.seed(seed)
    module, _ = get_model_and_args(config)
    as_given = json.loads(json.dumps(config))  # from_dict adds to the dict it is given
    model_config = update_module_configs(
        module.ModelConfig.from_dict(as_given), module, as_given, ["text", "vision"]
    )
    model = module.Model(model_config)
    weights = dict(tree_flatten(model.parameters()))
    mx.save_safetensors(str(dest / "model.safetensors"), weights, metadata={"format": "mlx"})
    return dest
