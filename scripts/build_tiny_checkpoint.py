"""Build the bundled tiny DeepSeek-VL-Hybrid checkpoint (random weights, deterministic).

It uses the real transformers classes (config, model, image processor, processor) with tiny
dimensions, a small byte-level BPE tokenizer of its own carrying the real special tokens, and the
chat template of the converted `deepseek-community/deepseek-vl-7b-chat` checkpoint, so every code
path of the app is the same for the tiny and the real weights.

    python scripts/build_tiny_checkpoint.py [--out assets/tiny-dsvl-hybrid] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    DeepseekVLConfig,
    DeepseekVLForConditionalGeneration,
    DeepseekVLHybridConfig,
    DeepseekVLHybridForConditionalGeneration,
    DeepseekVLHybridImageProcessor,
    DeepseekVLHybridProcessor,
    DeepseekVLImageProcessor,
    DeepseekVLProcessor,
    GenerationConfig,
    PreTrainedTokenizerFast,
)
from transformers.image_utils import (
    IMAGENET_STANDARD_MEAN,
    IMAGENET_STANDARD_STD,
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    PILImageResampling,
)

sys.path.insert(0, str(Path(__file__).resolve().parent))
import shapes  # noqa: E402  (the training vocabulary, so the tokenizer covers it compactly)

DEFAULT_OUT = Path(__file__).resolve().parent.parent / "assets" / "tiny-dsvl-hybrid"

BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
IMAGE = "<image_placeholder>"

# The chat template of the converted DeepSeek-VL checkpoints (transformers'
# convert_deepseek_vl_hybrid_weights_to_hf.py), character for character.
CHAT_TEMPLATE = (
    "{% set seps = ['\n\n', '<\uff5cend\u2581of\u2581sentence\uff5c>'] %}"
    "{% set i = 0 %}"
    "You are a helpful language and vision assistant. "
    "You are able to understand the visual content that the user provides, "
    "and assist the user with a variety of tasks using natural language.\n\n"
    "{% for message in messages %}"
    "{% if message['role']|lower == 'user' %}"
    "User: "
    "{% elif message['role']|lower == 'assistant' %}"
    "Assistant:{% if not (loop.last and not add_generation_prompt and message['content'][0]['type']=='text' "
    "and message['content'][0]['text']=='') %} {% endif %}"
    "{% else %}"
    "{{ message['role'].capitalize() }}: "
    "{% endif %}"
    "{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}"
    "<image_placeholder>"
    "{% elif content['type'] == 'text' %}"
    "{% set text = content['text'] %}"
    "{% if loop.first %}{% set text = text.lstrip() %}{% endif %}"
    "{% if loop.last %}{% set text = text.rstrip() %}{% endif %}"
    "{% if not loop.first and message['content'][loop.index0-1]['type'] == 'text' %}"
    "{{ ' ' + text }}"
    "{% else %}"
    "{{ text }}"
    "{% endif %}"
    "{% endif %}"
    "{% endfor %}"
    "{% if not loop.last or add_generation_prompt %}"
    "{% if message['role']|lower == 'user' %}"
    "{{ seps[0] }}"
    "{% else %}"
    "{{ seps[1] }}"
    "{% endif %}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)

COLOURS = ["red", "green", "blue", "yellow", "orange", "purple", "black", "white", "pink", "brown", "grey"]
SHAPES = ["circle", "square", "triangle", "shape", "shapes", "image", "images", "picture"]
NUMBERS = ["zero", "one", "two", "three", "four", "five", "first", "second", "third", "fourth"]


def tokenizer_corpus() -> list[str]:
    """A small fixed English corpus: the template, the demo vocabulary and common words."""
    preamble = (
        "You are a helpful language and vision assistant. You are able to understand the visual content "
        "that the user provides, and assist the user with a variety of tasks using natural language."
    )
    lines = [preamble, "User: Assistant: Describe the image.", "What is in this picture?"]
    for colour in COLOURS:
        for shape in SHAPES[:3]:
            lines.append(f"The {shape} is {colour}. It is a {colour} {shape}. What colour is the {shape}?")
    for number in NUMBERS:
        lines.append(f"There are {number} shapes. The {number} image is. How many shapes are there?")
    for templates in shapes.QUESTIONS.values():
        lines += [t.format(nth=n) for t in templates for n in shapes.ORDINALS.values()]
    lines += [f"The shape is {c}. The first image is {c}. The second image is {c}." for c in shapes.COLOURS]
    lines += [f"It is a {s}. There are {n} shapes. There is one shape." for s in shapes.SHAPES for n in shapes.NUMBERS.values()]
    lines += [
        "What shape is it? What colour is the first image? What colour is the second image?",
        "Hello, how can I help you today? I can see an image with a shape on a plain background.",
        "Thank you. Please compare the two images and tell me what is different. Yes. No. Sorry.",
        "0 1 2 3 4 5 6 7 8 9 10 ( ) [ ] { } < > . , ; : ! ? ' \" - + * / = # $ % & @ _ ~ `",
    ]
    return lines


def build_tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    """Train a deterministic byte-level BPE with the real checkpoint's special tokens."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[BOS, EOS, IMAGE],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(tokenizer_corpus() * 4, trainer=trainer)
    # Like the real (Llama-style) tokenizer: a BOS in front of every encoded text.
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, tok.token_to_id(BOS))]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=EOS,
        extra_special_tokens={"image_token": IMAGE},
        model_max_length=4096,
        clean_up_tokenization_spaces=False,
    )


def build_config(tokenizer: PreTrainedTokenizerFast, context: int) -> DeepseekVLHybridConfig:
    """Tiny dims; SigLIP keeps 384/16 = 24x24 = 576 positions, SAM uses patch 64 for speed."""
    return DeepseekVLHybridConfig(
        text_config={
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 4,
            "max_position_embeddings": context,
            "vocab_size": len(tokenizer),
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
        },
        vision_config={
            "hidden_size": 64,  # 32 cannot learn shapes in the training budget (measured)
            "intermediate_size": 128,
            "image_size": 384,
            "patch_size": 16,
            "hidden_act": "gelu",
            "vision_use_head": False,
            "num_attention_heads": 4,
            "num_hidden_layers": 2,
        },
        high_res_vision_config={
            "hidden_size": 32,
            "output_channels": 16,
            "image_size": 1024,
            "patch_size": 64,
            "num_attention_heads": 2,
            "num_hidden_layers": 2,
            "window_size": 8,
            "global_attn_indexes": [1],
            "num_pos_feats": 16,
            "initializer_range": 0.02,  # SAM's default (1e-10) leaves the tiny high-res branch dead
        },
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE),
        tie_word_embeddings=True,
    )


def build_low_res_config(tokenizer: PreTrainedTokenizerFast, context: int) -> DeepseekVLConfig:
    """The same tiny text model and SigLIP tower as DeepSeek-VL 1.3B's family: no SAM high-res branch."""
    hybrid = build_config(tokenizer, context)
    return DeepseekVLConfig(
        text_config=hybrid.text_config.to_dict(),
        vision_config=hybrid.vision_config.to_dict(),
        image_token_id=hybrid.image_token_id,
        tie_word_embeddings=True,
    )


def build_low_res_processor(tokenizer: PreTrainedTokenizerFast) -> DeepseekVLProcessor:
    image_processor = DeepseekVLImageProcessor(
        image_mean=IMAGENET_STANDARD_MEAN, image_std=IMAGENET_STANDARD_STD, resample=PILImageResampling.BILINEAR
    )
    return DeepseekVLProcessor(image_processor=image_processor, tokenizer=tokenizer, chat_template=CHAT_TEMPLATE)


def build_processor(tokenizer: PreTrainedTokenizerFast) -> DeepseekVLHybridProcessor:
    """The real image-processor settings of the converted checkpoint (384 / 1024, same means/stds)."""
    image_processor = DeepseekVLHybridImageProcessor(
        image_mean=IMAGENET_STANDARD_MEAN,
        image_std=IMAGENET_STANDARD_STD,
        high_res_image_mean=OPENAI_CLIP_MEAN,
        high_res_image_std=OPENAI_CLIP_STD,
        resample=PILImageResampling.BILINEAR,
    )
    return DeepseekVLHybridProcessor(
        image_processor=image_processor, tokenizer=tokenizer, chat_template=CHAT_TEMPLATE
    )


def build(out: Path, seed: int = 0, vocab_size: int = 512, context: int = 4096, low_res_only: bool = False) -> Path:
    """Write the checkpoint to `out` (replacing it) and return the path.

    `low_res_only` writes the 1.3B's family instead (DeepseekVLForConditionalGeneration, SigLIP only),
    for tests that must cover both families; the bundled checkpoint is the hybrid.
    """
    torch.manual_seed(seed)
    tokenizer = build_tokenizer(vocab_size)
    if low_res_only:
        processor = build_low_res_processor(tokenizer)
        model = DeepseekVLForConditionalGeneration(build_low_res_config(tokenizer, context)).eval()
    else:
        processor = build_processor(tokenizer)
        model = DeepseekVLHybridForConditionalGeneration(build_config(tokenizer, context)).eval()
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        do_sample=False,
    )
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    (out / "README.md").write_text(
        "# tiny-dsvl-hybrid\n\n"
        "A tiny DeepSeek-VL-Hybrid demo checkpoint for offline use and tests. It is NOT DeepSeek-VL: "
        f"random weights (seed {seed}), {sum(p.numel() for p in model.parameters()):,} parameters. "
        "Rebuild with `python scripts/build_tiny_checkpoint.py`.\n"
    )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    out = build(args.out, args.seed)
    files = {p.name: p.stat().st_size for p in sorted(out.iterdir())}
    print(json.dumps({"out": str(out), "files": files, "total_bytes": sum(files.values())}, indent=1))


if __name__ == "__main__":
    main()
