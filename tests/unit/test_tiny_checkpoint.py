"""The bundled checkpoint is what the seeded script builds, in the real checkpoint's format."""

import importlib.util
import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from dsvl_app.model import TINY_DIR

ROOT = Path(__file__).resolve().parents[2]


def load_builder():
    spec = importlib.util.spec_from_file_location("build_tiny_checkpoint", ROOT / "scripts" / "build_tiny_checkpoint.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_script_rebuilds_the_bundled_checkpoint_exactly(tmp_path):
    out = load_builder().build(tmp_path / "ckpt", seed=0)
    for name in ["config.json", "tokenizer.json", "tokenizer_config.json", "processor_config.json"]:
        assert json.loads((out / name).read_text()) == json.loads((TINY_DIR / name).read_text()), name
    assert (out / "chat_template.jinja").read_text() == (TINY_DIR / "chat_template.jinja").read_text()
    rebuilt, bundled = load_file(out / "model.safetensors"), load_file(TINY_DIR / "model.safetensors")
    assert rebuilt.keys() == bundled.keys()
    assert all(torch.equal(rebuilt[k], bundled[k]) for k in bundled)


def test_real_prompt_format(handle):
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "A cat."}]},
        {"role": "user", "content": [{"type": "text", "text": "Sure?"}, {"type": "text", "text": "Really?"}]},
    ]
    prompt = handle.processor.apply_chat_template(messages, add_generation_prompt=True)
    assert prompt == (
        "You are a helpful language and vision assistant. You are able to understand the visual content that the "
        "user provides, and assist the user with a variety of tasks using natural language.\n\n"
        "User: <image_placeholder>What is it?\n\nAssistant: A cat.<｜end▁of▁sentence｜>"
        "User: Sure? Really?\n\nAssistant:"
    )
    tok = handle.processor.tokenizer
    assert (tok.bos_token, tok.eos_token, tok.pad_token, tok.image_token) == (
        "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<image_placeholder>")
    assert handle.model.config.image_token_id == tok.convert_tokens_to_ids("<image_placeholder>")


def test_real_image_processor_settings_and_576_positions(handle):
    ip = handle.processor.image_processor
    assert (ip.size["height"], ip.high_res_size["height"]) == (384, 1024)
    assert tuple(ip.image_mean) == (0.5, 0.5, 0.5) and tuple(ip.image_std) == (0.5, 0.5, 0.5)
    assert tuple(round(x, 4) for x in ip.high_res_image_mean) == (0.4815, 0.4578, 0.4082)
    vision = handle.model.config.vision_config
    assert (vision.image_size // vision.patch_size) ** 2 == 576 == handle.processor.num_image_tokens
