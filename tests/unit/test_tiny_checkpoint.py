"""The bundled checkpoint: the builder's real format, trained weights that see, and its accuracy report."""

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from dsvl_app.model import TINY_DIR
from tests.conftest import load_script

ROOT = Path(__file__).resolve().parents[2]


def test_bundled_checkpoint_is_the_builders_format_with_trained_weights(tmp_path):
    out = load_script("build_tiny_checkpoint").build(tmp_path / "ckpt", seed=0)
    for name in ["config.json", "tokenizer.json", "tokenizer_config.json", "processor_config.json"]:
        assert json.loads((out / name).read_text()) == json.loads((TINY_DIR / name).read_text()), name
    assert (out / "chat_template.jinja").read_text() == (TINY_DIR / "chat_template.jinja").read_text()
    untrained, bundled = load_file(out / "model.safetensors"), load_file(TINY_DIR / "model.safetensors")
    assert {k: v.shape for k, v in untrained.items()} == {k: v.shape for k, v in bundled.items()}
    assert not torch.equal(untrained["model.vision_model.embeddings.patch_embedding.weight"],
                           bundled["model.vision_model.embeddings.patch_embedding.weight"])
    assert sum(p.stat().st_size for p in TINY_DIR.iterdir()) <= 5 * 2**20
    assert "NOT DeepSeek-VL" in (TINY_DIR / "README.md").read_text()


def test_committed_accuracy_report_shows_both_vision_paths_matter():
    """The training script's own held-out report, committed beside the weights (targets: issue 5)."""
    report = json.loads((TINY_DIR / "accuracy.json").read_text())
    accuracy = report["heldout_accuracy"]
    assert report["eval_per_type"] >= 300 and report["train_seconds"] <= 20 * 60
    assert accuracy["colour"] >= 0.95 and accuracy["shape"] >= 0.95 and accuracy["order"] >= 0.95
    assert accuracy["count"] >= 0.90
    assert report["ablation_low_res_blanked"]["colour"] < 0.5 <= accuracy["colour"]  # colour comes from SigLIP
    assert report["ablation_high_res_blanked"]["shape"] < 0.5 <= accuracy["shape"]  # shape comes from SAM


def test_it_answers_fresh_heldout_images(handle):
    """Greedy answers on images drawn now (a seed the report did not use)."""
    train = load_script("train_tiny_checkpoint")
    accuracy = train.evaluate(handle.model, handle.processor, per_type=12, seed=424242)
    assert min(accuracy["colour"], accuracy["shape"], accuracy["order"]) >= 11 / 12, accuracy
    assert accuracy["count"] >= 9 / 12, accuracy  # 93 % in the report (300 counts): at most three misses here
    no_high_res = train.evaluate(handle.model, handle.processor, per_type=12, seed=424242, ablate="high_res_pixel_values")
    assert no_high_res["shape"] <= 6 / 12, no_high_res


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


def test_evaluate_only_rewrites_the_report_and_keeps_the_training_facts(tmp_path, monkeypatch):
    """`--evaluate-only` re-measures the bundled weights (say, on more images) without training them again."""
    import shutil

    train = load_script("train_tiny_checkpoint")
    out = tmp_path / "tiny"
    shutil.copytree(TINY_DIR, out)
    monkeypatch.setattr(train, "OUT", out)
    monkeypatch.setattr("sys.argv", ["train_tiny_checkpoint.py", "--evaluate-only", "--eval-per-type", "2"])
    train.main()
    before, after = json.loads((TINY_DIR / "accuracy.json").read_text()), json.loads((out / "accuracy.json").read_text())
    assert after["eval_per_type"] == 2 and after["train_seconds"] == before["train_seconds"]
    assert after["steps"] == before["steps"] and set(after["heldout_accuracy"]) == set(before["heldout_accuracy"])
    assert (out / "model.safetensors").read_bytes() == (TINY_DIR / "model.safetensors").read_bytes()
    assert "2 fresh images per question type" in (out / "README.md").read_text()
