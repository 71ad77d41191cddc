"""Train the bundled tiny DeepSeek-VL-Hybrid checkpoint to answer simple visual questions.

Seeded, CPU only. Builds the untrained checkpoint with build_tiny_checkpoint.py (real classes,
processor, chat template) and trains it in two stages, like the real model whose vision towers
come pretrained:

1. vision pretraining: the SigLIP and SAM towers and the aligner learn per-cell labels on the
   24x24 grid the language model sees (which colour and which shape covers each cell, and how many
   shapes the image holds), through small linear heads that are thrown away afterwards;
2. chat: the whole model learns synthetic shape conversations in the real chat format (single- and
   multi-image, multi-turn); the per-cell loss stays on at a lower weight so the vision features
   are not forgotten.

It then writes the weights to assets/ together with `accuracy.json`: held-out accuracy per question
type and the vision-branch ablations.

    python scripts/train_tiny_checkpoint.py [--minutes 19] [--eval-per-type 100]
"""

from __future__ import annotations

import argparse
import json
import math
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import build_tiny_checkpoint as builder  # noqa: E402
import shapes  # noqa: E402
from transformers import AutoModelForImageTextToText, AutoProcessor  # noqa: E402

OUT = builder.DEFAULT_OUT
KINDS = ("colour", "shape", "count", "order")
ANSWER_WORDS = {
    "colour": set(shapes.COLOURS),
    "order": set(shapes.COLOURS),
    "shape": set(shapes.SHAPES),
    "count": set(shapes.NUMBERS.values()),
}
COLOUR_IDS = {name: i + 1 for i, name in enumerate(shapes.COLOURS)}  # 0 = background
SHAPE_IDS = {name: i + 1 for i, name in enumerate(shapes.SHAPES)}


def _length(processor, text: str) -> int:
    """Token count of a rendered prompt once the processor expands each image token."""
    expanded = text.replace(processor.image_token, processor.image_token * processor.num_image_tokens)
    return len(processor.tokenizer(expanded)["input_ids"])


def cell_labels(drawn: list[shapes.Drawn], grid: int = 24) -> dict[str, torch.Tensor]:
    """Per-cell colour and shape ids (0 = background), the shape count, and which cells lie on an edge."""
    colour = torch.zeros(len(drawn), grid * grid, dtype=torch.long)
    shape = torch.zeros_like(colour)
    for b, d in enumerate(drawn):
        for k, instance in enumerate(d.cell_instances(grid)):
            if instance:
                kind, name = d.shapes[instance - 1]
                colour[b, k], shape[b, k] = COLOUR_IDS[name], SHAPE_IDS[kind]
    # Shape is decided where a shape meets something else; inside it every shape looks the same.
    g = colour.view(-1, grid, grid)
    padded = torch.nn.functional.pad(g, (1, 1, 1, 1), mode="replicate")
    edge = ((padded[:, 1:-1, :-2] != g) | (padded[:, 1:-1, 2:] != g)
            | (padded[:, :-2, 1:-1] != g) | (padded[:, 2:, 1:-1] != g))
    count = torch.tensor([len(d.shapes) - 1 for d in drawn])
    return {"colour": colour, "shape": shape, "edge": edge.view(len(drawn), -1) & (colour > 0), "count": count}


def encode_vision_batch(processor, drawn: list[shapes.Drawn]) -> dict:
    """Processor pixel tensors for images alone, with their per-cell labels (stage 1)."""
    pixels = processor.image_processor([d.image for d in drawn], return_tensors="pt")
    return {"pixel_values": pixels["pixel_values"], "high_res_pixel_values": pixels["high_res_pixel_values"],
            "cells": cell_labels(drawn)}


def encode_batch(processor, samples: list[shapes.Sample]):
    """Processor inputs for a batch; labels cover every assistant answer and its end-of-sentence token."""
    texts, spans, images = [], [], []
    for s in samples:
        messages = [*s.messages, {"role": "assistant", "content": [{"type": "text", "text": s.answer}]}]
        texts.append(processor.apply_chat_template(messages) + processor.tokenizer.eos_token)
        # An answer runs from the end of its prompt to its end-of-sentence token (the separator after it).
        spans.append([
            (_length(processor, processor.apply_chat_template(messages[:k], add_generation_prompt=True)),
             _length(processor, processor.apply_chat_template(messages[: k + 1])) + 1)
            for k, m in enumerate(messages) if m["role"] == "assistant"
        ])
        images.append([b["image"] for m in s.messages for b in m["content"] if b["type"] == "image"])
    inputs = processor(text=texts, images=images, padding=True, return_tensors="pt")
    labels = torch.full_like(inputs["input_ids"], -100)
    for i, row in enumerate(spans):
        for start, end in row:
            labels[i, start:end] = inputs["input_ids"][i, start:end]
    inputs["labels"] = labels
    return inputs


def chat_sample(rng: random.Random, batch_index: int) -> shapes.Sample:
    """Stage-2 mix: single-image questions first, then image order (one message or spread over turns)."""
    if batch_index < 100:
        return shapes.sample(rng, "train", rng.choice(["colour", "shape", "count"]))
    return shapes.sample(rng, "train", rng.choice(["colour", "shape", "count", "order", "order", "order_turns"]))


class Batches(torch.utils.data.IterableDataset):
    """Endless seeded training batches, drawn and encoded in a worker process so that overlaps training."""

    def __init__(self, processor, seed: int, batch_size: int, stage: int):
        self.processor, self.seed, self.batch_size, self.stage = processor, seed, batch_size, stage

    def __iter__(self):
        torch.set_num_threads(1)
        rng = random.Random(self.seed * 10 + self.stage)
        index = 0
        while True:
            if self.stage == 1:
                drawn = [shapes.draw_image(rng, "train", count=rng.randint(1, 4)) for _ in range(self.batch_size)]
                yield encode_vision_batch(self.processor, drawn)
            else:
                samples = [chat_sample(rng, index) for _ in range(self.batch_size)]
                batch = encode_batch(self.processor, samples)
                batch["cells"] = cell_labels([d for s in samples for d in s.drawn])
                yield batch
            index += 1


class CellHeads(torch.nn.Module):
    """Linear read-outs of the aligner's per-cell features; training only, never saved.

    The chat loss gives one useful token per answer; per-cell labels give hundreds per image, which is
    what lets the tiny towers learn shapes at all within the budget (measured).
    """

    def __init__(self, hidden: int):
        super().__init__()
        self.colour = torch.nn.Linear(hidden, len(shapes.COLOURS) + 1)
        self.shape = torch.nn.Linear(hidden, len(shapes.SHAPES) + 1)
        self.count = torch.nn.Linear(hidden, len(shapes.NUMBERS))

    def loss(self, features: torch.Tensor, cells: dict[str, torch.Tensor]) -> torch.Tensor:
        f = torch.nn.functional
        features = features.reshape(len(cells["count"]), -1, features.shape[-1])  # one row per image
        colour, shape, count = self.colour(features), self.shape(features), self.count(features)
        edge = cells["edge"]
        per_cell_count = cells["count"][:, None].expand(-1, features.shape[1])
        return (f.cross_entropy(colour.flatten(0, 1), cells["colour"].flatten())
                + f.cross_entropy(shape.flatten(0, 1), cells["shape"].flatten())
                + 2 * f.cross_entropy(shape[edge], cells["shape"][edge])
                + f.cross_entropy(count.flatten(0, 1), per_cell_count.flatten()))


def judge(kind: str, reply: str, keyword: str) -> bool:
    """Right when the reply names exactly the expected colour/shape/number."""
    words = {w.strip(".,!?").lower() for w in reply.split()}
    named = words & ANSWER_WORDS[kind]
    return named == {keyword}


@torch.inference_mode()
def evaluate(model, processor, per_type: int, seed: int, ablate: str | None = None) -> dict[str, float]:
    """Held-out accuracy per question type with greedy decoding (backgrounds unseen in training)."""
    rng = random.Random(seed)
    model.eval()
    results = {}
    for kind in KINDS:
        right = 0
        for _ in range(per_type):
            s = shapes.sample(rng, "heldout", kind=rng.choice(["order", "order_turns"]) if kind == "order" else kind)
            inputs = processor.apply_chat_template(s.messages, add_generation_prompt=True, tokenize=True,
                                                   return_dict=True, return_tensors="pt")
            if ablate:
                inputs[ablate] = torch.zeros_like(inputs[ablate])
            out = model.generate(**inputs, max_new_tokens=12, do_sample=False)
            reply = processor.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
            right += judge(s.kind, reply, s.keyword)
        results[kind] = right / per_type
    return results


def _schedule(optimizer, lr: float, step: int, progress: float) -> None:
    """Warm-up then cosine decay over the stage's time budget (steps are not known in advance)."""
    scale = min(1.0, (step + 1) / 50) * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))
    for group in optimizer.param_groups:
        group["lr"] = lr * scale


def run_stage(stage: int, model, processor, heads: CellHeads, seconds: float, seed: int, batch_size: int,
              lr: float, log_every: int = 25) -> int:
    """Train one stage for `seconds`; returns the number of steps taken."""
    vision = [p for n, p in model.named_parameters() if "language_model" not in n and "lm_head" not in n]
    params = vision if stage == 1 else list(model.parameters())
    optimizer = torch.optim.AdamW([*params, *heads.parameters()], lr=lr, weight_decay=0.01)
    loader = torch.utils.data.DataLoader(Batches(processor, seed, batch_size, stage), batch_size=None,
                                         num_workers=1, prefetch_factor=4)
    batches = iter(loader)
    t0 = time.time()
    step, ema = 0, None
    while (elapsed := time.time() - t0) < seconds:
        _schedule(optimizer, lr, step, elapsed / seconds)
        batch = next(batches)
        cells = batch.pop("cells")
        if stage == 1:
            features = model.model.get_image_features(batch["pixel_values"], batch["high_res_pixel_values"])
            loss = heads.loss(features.pooler_output, cells)
        else:
            out = model(**batch)
            loss = out.loss + 0.3 * heads.loss(out.image_hidden_states, cells)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        step += 1
        ema = loss.item() if ema is None else 0.95 * ema + 0.05 * loss.item()
        if step % log_every == 0:
            print(f"stage {stage} step {step:5d}  {elapsed:6.0f}s  loss {ema:.4f}", flush=True)
    del batches, loader
    return step


def train(minutes: float, vision_share: float, seed: int, batch_size: int, lr: float):
    out = builder.build(OUT, seed=seed)
    processor = AutoProcessor.from_pretrained(out)
    model = AutoModelForImageTextToText.from_pretrained(out, dtype=torch.float32)
    model.train()
    torch.manual_seed(seed)
    heads = CellHeads(model.config.text_config.hidden_size)
    budget = minutes * 60
    t0 = time.time()
    steps = [run_stage(1, model, processor, heads, budget * vision_share, seed, 2 * batch_size, lr)]
    steps.append(run_stage(2, model, processor, heads, budget - (time.time() - t0), seed, batch_size, lr))
    model.eval()
    return model, processor, steps, time.time() - t0


def write_model_card(out: Path, report: dict, parameters: int) -> None:
    """README beside the weights: what the checkpoint is (not DeepSeek-VL) and its held-out accuracy."""
    table = "\n".join(
        f"| {kind} | {report['heldout_accuracy'][kind]:.0%} | {report['ablation_high_res_blanked'][kind]:.0%} "
        f"| {report['ablation_low_res_blanked'][kind]:.0%} |" for kind in KINDS)
    (out / "README.md").write_text(
        "# tiny-dsvl-hybrid\n\n"
        "A tiny DeepSeek-VL-Hybrid demo checkpoint for offline use and tests. It is NOT DeepSeek-VL: "
        f"{parameters:,} parameters trained for {report['train_seconds'] / 60:.0f} minutes on CPU "
        f"(seed {report['seed']}) on synthetic shapes only. It is asked what colour or shape a shape is, how many "
        "shapes there are (1-4) and what colour the first/second image is, and answers in one short sentence; "
        "see the table for how often it is right.\n\n"
        "Rebuild with `python scripts/train_tiny_checkpoint.py` (the untrained format alone: "
        "`python scripts/build_tiny_checkpoint.py`).\n\n"
        f"Held-out accuracy ({report['eval_per_type']} fresh images per question type, greedy; see accuracy.json):\n\n"
        "| question | accuracy | high-res view blanked | low-res view blanked |\n|---|---|---|---|\n" + table + "\n"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=19.0, help="training time budget (both stages)")
    parser.add_argument("--vision-share", type=float, default=0.4, help="share of the budget for stage 1")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=8, help="conversations per step (stage 1: twice as many images)")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--eval-per-type", type=int, default=100)
    args = parser.parse_args()

    model, processor, steps, seconds = train(args.minutes, args.vision_share, args.seed, args.batch_size, args.lr)
    # Only the weights change: the builder's config, tokenizer and processor files stay as written.
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        shutil.copy(Path(tmp) / "model.safetensors", OUT / "model.safetensors")
    print(f"trained {steps} steps in {seconds:.0f}s; evaluating on held-out images…", flush=True)
    eval_seed = 10_000 + args.seed
    report = {
        "seed": args.seed,
        "steps": {"vision_pretraining": steps[0], "chat": steps[1]},
        "train_seconds": round(seconds),
        "batch_size": args.batch_size,
        "eval_per_type": args.eval_per_type,
        "heldout_accuracy": evaluate(model, processor, args.eval_per_type, eval_seed),
        "ablation_high_res_blanked": evaluate(model, processor, args.eval_per_type, eval_seed,
                                              ablate="high_res_pixel_values"),
        "ablation_low_res_blanked": evaluate(model, processor, args.eval_per_type, eval_seed, ablate="pixel_values"),
    }
    (OUT / "accuracy.json").write_text(json.dumps(report, indent=2) + "\n")
    write_model_card(OUT, report, sum(p.numel() for p in model.parameters()))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
