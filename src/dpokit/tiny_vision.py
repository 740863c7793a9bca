"""A tiny randomly initialised vision-language model (LLaVA) and its processor, built locally, for tests.

LLaVA was chosen over Qwen2-VL because its processor needs only an image processor and a
tokenizer: Qwen2-VL's processor also builds a video processor, which needs torchvision (not
installed here). The model: a 1-layer CLIP vision tower on 16x16 images in 4x4 patches (16 image
tokens per image, plus the CLS feature that vision_feature_select_strategy="default" drops), a
2-layer Llama at hidden 64. The chat template renders {"type": "image"} parts as the <image>
token, which the processor expands to the 16 image tokens.
"""

from __future__ import annotations

from pathlib import Path

from dpokit.tiny import build_tokenizer

IMAGE_TOKEN = "<image>"
IMAGE_SIZE = 16
PATCH_SIZE = 4
IMAGE_TOKENS = (IMAGE_SIZE // PATCH_SIZE) ** 2  # image tokens per image after the processor's expansion

# ChatML, with image parts: string contents as they are, content-part lists part by part.
VISION_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}{{ '<image>' }}{% else %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}"
    "{{ '<|im_end|>' + '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def build_tiny_llava_dir(path: str | Path, words: str, hidden_size: int = 64, seed: int = 0) -> Path:
    """Save a tiny LLaVA (model, word-level tokenizer with <image>, CLIP image processor, processor) to `path`."""
    import torch
    from transformers import CLIPImageProcessor, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    tokenizer = build_tokenizer([words], kind="word", vocab_size=1000, chat_template=VISION_CHAT_TEMPLATE)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", IMAGE_TOKEN]})
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    )
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        chat_template=VISION_CHAT_TEMPLATE,
        patch_size=PATCH_SIZE,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )
    text = dict(
        model_type="llama",
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=512,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )
    vision = dict(
        model_type="clip_vision_model",
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=IMAGE_SIZE,
        patch_size=PATCH_SIZE,
        num_channels=3,
        projection_dim=32,
    )
    config = LlavaConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
