"""The synthetic training conversations are in the real chat format and supervise exactly the answers."""

import random

import pytest
import torch

from tests.conftest import load_script


@pytest.fixture(scope="module")
def train_module():
    return load_script("train_tiny_checkpoint"), load_script("shapes")


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


def test_cell_labels_match_what_the_processor_feeds_the_model(handle, train_module):
    """Cells labelled with a shape show that shape's colour in the processor's own 384 view (24x24 grid)."""
    train, shapes = train_module
    rng = random.Random(3)
    ip = handle.processor.image_processor
    mean, std = torch.tensor(ip.image_mean)[:, None], torch.tensor(ip.image_std)[:, None]
    checked = wrong = 0
    for _ in range(10):
        drawn = shapes.draw_image(rng, "heldout", count=rng.randint(1, 4))
        pixels = ip(drawn.image, return_tensors="pt")["pixel_values"][0]  # 3 x 384 x 384
        centres = (pixels[:, 8::16, 8::16].flatten(1) * std + mean) * 255  # 3 x 576, de-normalised
        labels = train.cell_labels([drawn])
        for cell in torch.nonzero(labels["colour"][0]).flatten().tolist():
            colour = list(shapes.COLOURS)[labels["colour"][0, cell] - 1]
            checked += 1
            wrong += bool((centres[:, cell] - torch.tensor(shapes.COLOURS[colour])).abs().max() > 40)
        assert labels["count"][0] == len(drawn.shapes) - 1
        assert labels["edge"][0].sum() > 0 and not (labels["edge"][0] & (labels["colour"][0] == 0)).any()
    assert checked > 200 and wrong / checked < 0.03  # only cells whose centre sits on an anti-aliased edge
