"""The synthetic training conversations are in the real chat format and supervise exactly the answers."""

import random

import pytest
import torch

from tests.conftest import load_script


@pytest.fixture(scope="module")
def train_module():
    return load_script("train_tiny_checkpoint"), load_script("shapes")


def _images(sample) -> list:
    return [b["image"] for m in sample.messages for b in m["content"] if b["type"] == "image"]


def _with_answer(sample) -> list[dict]:
    return [*sample.messages, {"role": "assistant", "content": [{"type": "text", "text": sample.answer}]}]


@pytest.mark.parametrize("kind", ["colour", "shape", "count", "order", "order_turns"])
def test_labels_cover_every_answer_and_its_end_of_sentence(handle, train_module, kind):
    train, shapes = train_module
    rng = random.Random(1)
    samples = [shapes.sample(rng, "train", kind) for _ in range(2)]
    eos = handle.processor.tokenizer.eos_token
    for images in (True, False):  # stages 3-4 (with images) and stage 2 (text warm-up, images left out)
        batch = train.encode_text(handle.processor, samples, images=images)
        for i, s in enumerate(samples):
            labels = batch["labels"][i]
            supervised = handle.processor.tokenizer.decode(labels[labels != -100])
            answers = [b["text"] for m in s.messages if m["role"] == "assistant" for b in m["content"]] + [s.answer]
            assert supervised == "".join(f" {a}{eos}" for a in answers)
            assert s.keyword in s.answer
            n_images = len(_images(s)) if images else 0
            assert (batch["input_ids"][i] == handle.processor.image_token_id).sum() == 576 * n_images
            # Right padding: the row ends with the last answer's end-of-sentence token.
            assert batch["attention_mask"][i].sum() == (labels != -100).nonzero().max() + 1


@pytest.mark.parametrize("kind", ["colour", "order", "order_turns"])
def test_training_ids_are_the_processors_own(handle, train_module, kind):
    """Stage 3 never runs the processor on pixels, so its ids must equal what the processor makes."""
    train, shapes = train_module
    sample = shapes.sample(random.Random(2), "train", kind)
    text = handle.processor.apply_chat_template(_with_answer(sample)) + handle.processor.tokenizer.eos_token
    expected = handle.processor(text=[text], images=[_images(sample)], return_tensors="pt")["input_ids"][0]
    assert torch.equal(train.encode_text(handle.processor, [sample])["input_ids"][0], expected)


def test_loss_on_cached_features_is_the_models_own_loss(random_handle, train_module):
    """The stage-3 shortcut (cached image features in place of pixels) computes the model's forward."""
    train, shapes = train_module
    model, processor = random_handle.model, random_handle.processor
    for kind in ("order", "order_turns", "count"):
        sample = shapes.sample(random.Random(4), "train", kind)
        batch = train.encode_text(processor, [sample])
        text = processor.apply_chat_template(_with_answer(sample)) + processor.tokenizer.eos_token
        inputs = processor(text=[text], images=[_images(sample)], return_tensors="pt")
        with torch.no_grad():
            expected = model(**inputs, labels=batch["labels"]).loss
            features = model.model.get_image_features(inputs["pixel_values"], inputs["high_res_pixel_values"])
            ours = train.language_loss(model, batch, features.pooler_output.flatten(0, 1),
                                       train.keyword_ids(processor), keyword_weight=1.0)
        assert torch.allclose(ours, expected, atol=1e-5), (kind, ours, expected)


def test_right_padding_changes_no_answer_loss(random_handle, train_module):
    """The language stages pass no attention mask, so padding a short conversation must not change its loss."""
    train, shapes = train_module
    model, processor = random_handle.model, random_handle.processor
    rng = random.Random(4)
    samples = [shapes.sample(rng, "train", "count"), shapes.sample(rng, "train", "order_turns")]
    keywords = train.keyword_ids(processor)
    torch.manual_seed(0)
    features = torch.randn(3 * 576, model.config.text_config.hidden_size)  # one image, then two
    batch = train.encode_text(processor, samples)
    assert batch["attention_mask"][0].sum() < batch["attention_mask"].shape[1]  # the first row is padded
    with torch.no_grad():
        together = train.language_loss(model, batch, features, keywords, keyword_weight=1.0)
        alone = [train.language_loss(model, train.encode_text(processor, [s]), f, keywords, keyword_weight=1.0)
                 for s, f in zip(samples, (features[:576], features[576:]))]
    answers = (batch["labels"][:, 1:] != -100).sum(dim=1)
    assert torch.allclose(together, (alone[0] * answers[0] + alone[1] * answers[1]) / answers.sum(), atol=1e-5)


def test_feature_pool_draws_what_is_asked_and_caches_its_features(random_handle, train_module):
    train, shapes = train_module
    model, processor = random_handle.model, random_handle.processor
    pool = train.FeaturePool(model, processor, size=24, seed=5, batch=8)
    rng = random.Random(0)
    assert sorted(map(id, sum(pool.by_count.values(), []))) == sorted(map(id, pool.drawn))
    for n in shapes.NUMBERS:
        assert all(len(d.shapes) == n for d in pool.by_count[n])
    assert len(pool.by_count[1]) >= 16  # two thirds are single shapes (colour, shape and order questions)
    counting = train.FeaturePool(model, processor, size=24, seed=5, batch=8, counting=True)
    assert all(counting.by_count[n] for n in shapes.NUMBERS) and len(counting.by_count[1]) < 16  # all 1-4 shapes
    circle = pool.draw(rng, "train", shape="circle")
    assert circle.shapes[0][0] == "circle" and len(circle.shapes) == 1
    for colour in {d.shapes[0][1] for d in pool.by_count[1]}:
        drawn = pool.draw(rng, "train", colour=colour)
        assert len(drawn.shapes) == 1 and drawn.shapes[0][1] == colour
    sample = shapes.sample(rng, "train", "order", draw=pool.draw)
    assert all(id(d) in pool.row for d in sample.drawn)
    drawn = sample.drawn[1]
    pixels = processor.image_processor([drawn.image], return_tensors="pt")
    with torch.no_grad():
        features = model.model.get_image_features(pixels["pixel_values"], pixels["high_res_pixel_values"]).pooler_output
        # The aligner runs on the cached tower outputs: the same features the model computes from pixels.
        assert torch.allclose(pool.features(model, torch.tensor([pool.row[id(drawn)]])), features[0], atol=1e-5)
    # Joined with the counting pool (the chat stage's pool), every image keeps its own tower outputs.
    joined = pool.joined(counting)
    assert len(joined.drawn) == 48 and sum(map(len, joined.by_count.values())) == 48
    for d in (drawn, counting.drawn[-1]):
        home = pool if id(d) in pool.row else counting
        assert torch.equal(joined.towers[joined.row[id(d)]], home.towers[home.row[id(d)]])


def _images_per_conversation(batches, n: int) -> list[int]:
    return [len(b["rows"]) // len(b["input_ids"]) for b in (next(batches) for _ in range(n))]


def test_chat_stage_opens_with_image_order_then_mixes(random_handle, train_module):
    """Stage 3: two-image conversations only for its first steps, then one step in three."""
    train, _ = train_module
    model, processor = random_handle.model, random_handle.processor
    pool = train.FeaturePool(model, processor, size=24, seed=5, batch=8)
    batches = iter(train.Batches(processor, seed=0, batch_size=3, stage=train.CHAT, pool=pool, order_steps=4))
    assert _images_per_conversation(batches, 10) == [2, 2, 2, 2, 1, 1, 2, 1, 1, 2]


def test_counting_stage_replays_shape_and_image_order_every_second_step(random_handle, train_module):
    """Stage 4: count questions, and every 2nd step chat — twice "what shape", then two-image conversations."""
    train, _ = train_module
    model, processor = random_handle.model, random_handle.processor
    pool = train.FeaturePool(model, processor, size=24, seed=5, batch=8)
    batches = iter(train.Batches(processor, seed=0, batch_size=6, stage=train.COUNTING, pool=pool))
    steps = [next(batches) for _ in range(12)]
    assert [len(b["rows"]) // len(b["input_ids"]) for b in steps] == [1, 1, 1, 1, 1, 2] * 2

    def answers(batch) -> list[str]:  # the supervised answers of each conversation
        return [processor.decode(row[row != -100], skip_special_tokens=True).strip() for row in batch["labels"]]

    for k in range(0, 12, 2):
        assert all(a.startswith("There") for a in answers(steps[k]))
    for k in (1, 3, 7, 9):
        assert all(a.endswith(("circle.", "square.", "triangle.")) for a in answers(steps[k]))
    for k in (5, 11):
        assert all(" image is " in a for a in answers(steps[k]))


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


def test_training_is_reproducible_step_for_step(train_module, tmp_path):
    """Stages run a fixed number of steps on seeded data: the same seed trains the same weights."""
    from safetensors.torch import load_file
    from transformers import AutoModelForImageTextToText, AutoProcessor

    train, _ = train_module
    path = load_script("build_tiny_checkpoint").build(tmp_path / "ckpt", seed=0)
    processor = AutoProcessor.from_pretrained(path)

    def run(vision_from=None) -> dict[str, torch.Tensor]:
        model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32)
        torch.manual_seed(0)
        model.train()
        if vision_from:
            train.load_vision(model, vision_from)
        else:
            train.run_vision_stage(model, processor, 2, seed=0, batch_size=2, lr=3e-3)
            model.save_pretrained(tmp_path / "stage1")  # what --save-vision writes
        train.freeze_towers(model)
        pool = train.FeaturePool(model, processor, size=96, seed=0, batch=16)
        counting = train.FeaturePool(model, processor, size=16, seed=1, batch=16, counting=True)
        train.run_language_stage(train.TEXT, model, processor, pool, 2, seed=0, batch_size=2, lr=2e-3)
        train.run_language_stage(train.CHAT, model, processor, pool.joined(counting), 3, seed=0, batch_size=2,
                                 lr=2e-3, order_steps=1)
        train.run_language_stage(train.COUNTING, model, processor, pool.joined(counting), 4, seed=0, batch_size=2,
                                 lr=2e-3)
        return {k: v.clone() for k, v in model.state_dict().items()}

    first, second = run(), run()
    initial = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32).state_dict()
    assert all(torch.equal(first[k], second[k]) for k in first)
    changed = {k for k in first if not torch.equal(first[k], initial[k])}
    assert any("vision_model" in k for k in changed) and any("language_model.layers" in k for k in changed)
    # The language stages train the aligner further but leave the towers as stage 1 left them.
    stage1 = load_file(tmp_path / "stage1" / "model.safetensors")
    assert not torch.equal(first["model.aligner.proj.weight"], stage1["model.aligner.proj.weight"])
    assert all(torch.equal(first[k], stage1[k]) for k in stage1 if "vision_model" in k)
    # --vision-from the model as stage 1 left it (--save-vision) trains exactly the same weights.
    reused = run(vision_from=tmp_path / "stage1")
    assert all(torch.equal(first[k], reused[k]) for k in first)


def test_vision_weights_come_only_from_a_matching_checkpoint(train_module, tmp_path):
    from safetensors.torch import save_file
    from transformers import AutoModelForImageTextToText

    train, _ = train_module
    path = load_script("build_tiny_checkpoint").build(tmp_path / "ckpt", seed=0)
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32)
    (tmp_path / "other").mkdir()
    save_file({"something.else": torch.zeros(2)}, tmp_path / "other" / "model.safetensors")
    with pytest.raises(ValueError, match="vision weights"):
        train.load_vision(model, tmp_path / "other")


def test_pooled_count_reads_each_image_as_a_whole(train_module):
    """Stage 1's count pool sees only its own image's cells, wherever they are (like attention over tokens)."""
    train, _ = train_module
    torch.manual_seed(0)
    pool = train.AttentionPool(hidden=8, out=4)
    features = torch.randn(2, 576, 8)
    out = pool(features)
    shuffled = features[:, torch.randperm(576)]
    assert torch.allclose(pool(shuffled), out, atol=1e-5)
    other = features.clone()
    other[1] = torch.randn(576, 8)
    changed = pool(other)
    assert torch.allclose(changed[0], out[0], atol=1e-6) and not torch.allclose(changed[1], out[1])


def test_pooled_count_trains_the_towers(train_module, tmp_path):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    train, _ = train_module
    path = load_script("build_tiny_checkpoint").build(tmp_path / "ckpt", seed=0)
    processor = AutoProcessor.from_pretrained(path)

    def towers(pooled_count: bool) -> torch.Tensor:
        model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32)
        torch.manual_seed(0)
        model.train()
        train.run_vision_stage(model, processor, 2, seed=0, batch_size=2, lr=3e-3, pooled_count=pooled_count)
        return model.model.vision_model.embeddings.patch_embedding.weight.detach().clone()

    assert not torch.equal(towers(False), towers(True))
