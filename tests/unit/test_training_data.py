"""The synthetic training conversations are in the real chat format and supervise exactly the answers."""

import importlib
import random
import sys
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"


@pytest.fixture(scope="module")
def train_module():
    sys.path.insert(0, str(SCRIPTS))
    try:
        yield importlib.import_module("train_tiny_checkpoint"), importlib.import_module("shapes")
    finally:
        sys.path.remove(str(SCRIPTS))


@pytest.mark.parametrize("kind", ["colour", "shape", "count", "order", "order_turns"])
def test_labels_cover_every_answer_and_its_end_of_sentence(handle, train_module, kind):
    train, shapes = train_module
    rng = random.Random(1)
    samples = [shapes.sample(rng, "train", kind) for _ in range(2)]
    batch = train.encode_batch(handle.processor, samples)
    eos = handle.processor.tokenizer.eos_token
    for i, s in enumerate(samples):
        labels = batch["labels"][i]
        supervised = handle.processor.tokenizer.decode(labels[labels != -100])
        answers = [b["text"] for m in s.messages if m["role"] == "assistant" for b in m["content"]] + [s.answer]
        assert supervised == "".join(f" {a}{eos}" for a in answers)
        assert s.keyword in s.answer
        n_images = sum(b["type"] == "image" for m in s.messages for b in m["content"])
        assert (batch["input_ids"][i] == handle.processor.image_token_id).sum() == 576 * n_images


def test_judging_needs_exactly_the_expected_word(train_module):
    train, _ = train_module
    assert train.judge("colour", "The shape is red.", "red")
    assert not train.judge("colour", "The shape is red or blue.", "red")
    assert not train.judge("count", "There are three shapes.", "two")


def test_heldout_backgrounds_are_never_used_in_training(train_module):
    _, shapes = train_module
    assert not set(shapes.BACKGROUNDS["train"]) & set(shapes.BACKGROUNDS["heldout"])
