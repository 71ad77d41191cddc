"""Write random-weight checkpoints with the real DeepSeek-VL 1.3B and 7B architectures, for benchmarks.

Nothing is downloaded: the sizes are those of transformers' conversion scripts and the converted
`deepseek-community/deepseek-vl-{1.3b,7b}-chat` configs, the classes, image processor and chat template
are the real ones, and the weights are random (real timings, not real answers). The result loads with
`python app.py --model <dir>` like any checkpoint.

    python scripts/build_bench_checkpoints.py --arch 1.3b [--out bench/models/deepseek-vl-1.3b-random]
    python scripts/build_bench_checkpoints.py --arch 7b   # 14.6 GB of bfloat16 weights, ~16 GB of RAM to build

The tokenizer is the bundled tiny checkpoint's (the same special tokens and template) extended with
added tokens ` <r0>`, ` <r1>`, ... (each with a leading space, like a real word token) to the real
vocabulary of 102,400, so the language model head has its real size. Random weights would pick any
id; the head rows of the ordinary BPE ids and of the special tokens are zero, so a reply is made of
added tokens only. That keeps two properties of real replies that reuse across turns depends on and
a benchmark must not lose: the reply's text re-encodes to the same ids in the next turn's prompt
(`Assistant: ` + the reply), and (no end-of-sentence) it runs to `max_new_tokens`, so every run times
the same work.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import torch
from tokenizers import AddedToken
from transformers import (
    DeepseekVLConfig,
    DeepseekVLForConditionalGeneration,
    DeepseekVLHybridConfig,
    DeepseekVLHybridForConditionalGeneration,
    DeepseekVLImageProcessor,
    DeepseekVLProcessor,
    GenerationConfig,
)
from transformers.image_utils import IMAGENET_STANDARD_MEAN, IMAGENET_STANDARD_STD, PILImageResampling

sys.path.insert(0, str(Path(__file__).resolve().parent))
import build_tiny_checkpoint as tiny  # noqa: E402  (tokenizer, template and hybrid processor of the bundled format)

ROOT = Path(__file__).resolve().parent.parent
VOCAB = 102_400
CONTEXT = 16_384

# SigLIP-L at 384 (both families' low-res tower), no pooling head.
SIGLIP_L_384 = {
    "hidden_size": 1024, "intermediate_size": 4096, "image_size": 384, "patch_size": 16, "hidden_act": "gelu",
    "vision_use_head": False, "num_attention_heads": 16, "num_hidden_layers": 24,
}
ARCHS = {
    # deepseek-vl-1.3b-chat: DeepSeek-LLM 1.3B text model + SigLIP-L.
    "1.3b": {
        "text": {"hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 24, "num_attention_heads": 16,
                 "num_key_value_heads": 16},
        "hybrid": False,
    },
    # deepseek-vl-7b-chat: DeepSeek-LLM 7B text model + SigLIP-L (low-res) + SAM-B at 1024 (high-res).
    "7b": {
        "text": {"hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 30, "num_attention_heads": 32,
                 "num_key_value_heads": 32},
        "hybrid": True,
        "sam": {"hidden_size": 768, "mlp_dim": 3072, "image_size": 1024, "patch_size": 16, "num_attention_heads": 12,
                "num_hidden_layers": 12, "global_attn_indexes": [2, 5, 8, 11], "window_size": 14, "output_channels": 256},
    },
}


def default_out(arch: str) -> Path:
    return ROOT / "bench" / "models" / f"deepseek-vl-{arch}-random"


def build_tokenizer():
    """The tiny tokenizer with added tokens up to the real vocabulary size."""
    tokenizer = tiny.build_tokenizer(512)
    base = len(tokenizer)
    tokenizer.add_tokens([AddedToken(f" <r{i}>", normalized=False) for i in range(VOCAB - base)])
    assert len(tokenizer) == VOCAB
    return tokenizer, base


def build_config(arch: str, tokenizer) -> DeepseekVLConfig | DeepseekVLHybridConfig:
    spec = ARCHS[arch]
    text = {
        **spec["text"],
        "max_position_embeddings": CONTEXT,
        "vocab_size": VOCAB,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    common = {"text_config": text, "vision_config": dict(SIGLIP_L_384),
              "image_token_id": tokenizer.convert_tokens_to_ids(tiny.IMAGE),
              "tie_word_embeddings": False}  # DeepSeek-LLM keeps a separate output head
    if spec["hybrid"]:
        return DeepseekVLHybridConfig(**common, high_res_vision_config=dict(spec["sam"]))
    return DeepseekVLConfig(**common)


def build_processor(arch: str, tokenizer):
    if ARCHS[arch]["hybrid"]:
        return tiny.build_processor(tokenizer)
    image_processor = DeepseekVLImageProcessor(
        image_mean=IMAGENET_STANDARD_MEAN, image_std=IMAGENET_STANDARD_STD, resample=PILImageResampling.BILINEAR
    )
    return DeepseekVLProcessor(image_processor=image_processor, tokenizer=tokenizer, chat_template=tiny.CHAT_TEMPLATE)


def build(arch: str, out: Path, dtype: torch.dtype = torch.bfloat16, seed: int = 0) -> Path:
    """Write the checkpoint to `out` (replacing it) and return the path."""
    torch.manual_seed(seed)
    tokenizer, base = build_tokenizer()
    config = build_config(arch, tokenizer)
    cls = DeepseekVLHybridForConditionalGeneration if ARCHS[arch]["hybrid"] else DeepseekVLForConditionalGeneration
    model = cls._from_config(config, dtype=dtype).eval()
    with torch.no_grad():
        # Replies of added tokens only (see the module docstring): zero head rows for BPE ids and specials.
        model.lm_head.weight[:base].zero_()
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, do_sample=False,
    )
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    model.save_pretrained(out)
    build_processor(arch, tokenizer).save_pretrained(out)
    params = sum(p.numel() for p in model.parameters())
    (out / "README.md").write_text(
        f"# deepseek-vl-{arch}-random\n\nRandom weights (seed {seed}) in the real DeepSeek-VL {arch} architecture, "
        f"{params:,} parameters in {str(dtype).removeprefix('torch.')}: for timing only, its answers are noise. "
        "Written by `scripts/build_bench_checkpoints.py`.\n"
    )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", choices=sorted(ARCHS), required=True)
    parser.add_argument("--out", type=Path, default=None, help="default: bench/models/deepseek-vl-<arch>-random")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"],
                        help="storage dtype (the converted hub checkpoints store bfloat16)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    t0 = time.perf_counter()
    out = build(args.arch, args.out or default_out(args.arch), getattr(torch, args.dtype), args.seed)
    size = sum(p.stat().st_size for p in out.iterdir())
    print(json.dumps({"out": str(out), "bytes": size, "seconds": round(time.perf_counter() - t0, 1)}))


if __name__ == "__main__":
    main()
