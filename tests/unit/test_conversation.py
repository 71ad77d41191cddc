from dataclasses import replace

import pytest
import torch
from PIL import Image

from dsvl_app import conversation as conv
from dsvl_app.media import ImageRejected


@pytest.fixture
def images(make_image):
    return {
        "red": make_image("red.png", colour=(255, 0, 0), size=(300, 200)),
        "green": make_image("green.jpg", colour=(0, 255, 0), size=(64, 128)),
        "blue": make_image("blue.png", colour=(0, 0, 255), size=(50, 50)),
        "white": make_image("white.png", colour=(255, 255, 255), size=(40, 90)),
    }


def browser_history(p):
    """The shape the browser sends: typed parts, files split from text like gradio's chat does."""
    return [
        {"role": "user", "content": [{"type": "file", "file": {"path": p["red"], "mime_type": "image/png"}}]},
        {"role": "user", "content": [{"type": "text", "text": "What colour is this?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "Red."}]},
        {"role": "user", "content": [{"type": "text", "text": "Compare"}, {"type": "file", "file": {"path": p["green"]}},
                                     {"type": "text", "text": "with"}, {"type": "file", "file": {"path": p["blue"]}}]},
        {"role": "assistant", "content": [{"type": "text", "text": "Green and blue."}]},
    ]


def client_history(p):
    """The shapes gradio_client and Python callers send: strings, {"path"} dicts, tuples."""
    return [
        {"role": "user", "content": {"path": p["red"]}},
        {"role": "user", "content": "What colour is this?"},
        {"role": "assistant", "content": "Red."},
        {"role": "user", "content": ["Compare", {"path": p["green"]}, "with", {"file": {"path": p["blue"]}}]},
        {"role": "assistant", "content": [{"text": "Green and blue."}]},
    ]


def tuple_history(p):
    import gradio as gr

    return [
        gr.ChatMessage(role="user", content=(p["red"],)),
        gr.ChatMessage(role="user", content="What colour is this?"),
        {"role": "assistant", "content": "Red."},
        {"role": "user", "content": "Compare"},
        {"role": "user", "content": [p["green"]]},  # (path,) tuple after a JSON round trip
        {"role": "user", "content": "with"},
        {"role": "user", "content": (p["blue"], "alt text")},
        {"role": "assistant", "content": "Green and blue."},
    ]


def hand_written(p, pil):
    """The equivalent chat-template messages, written by hand."""
    return [
        {"role": "user", "content": [{"type": "image", "image": pil["red"]}, {"type": "text", "text": "What colour is this?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "Red."}]},
        {"role": "user", "content": [{"type": "text", "text": "Compare"}, {"type": "image", "image": pil["green"]},
                                     {"type": "text", "text": "with"}, {"type": "image", "image": pil["blue"]}]},
        {"role": "assistant", "content": [{"type": "text", "text": "Green and blue."}]},
        {"role": "user", "content": [{"type": "image", "image": pil["white"]}, {"type": "text", "text": "And this one?"}]},
    ]


@pytest.mark.parametrize("shape", [browser_history, client_history, tuple_history])
def test_prompt_ids_equal_processor_on_hand_written_messages(handle, settings, images, shape):
    message = {"text": "And this one?", "files": [images["white"]]}
    prompt = conv.build_prompt(handle.processor, shape(images), message, settings.limits, handle.context_tokens, 64)
    ours = conv.encode(handle.processor, prompt.messages)
    pil = {k: Image.open(v).convert("RGB") for k, v in images.items()}
    expected = handle.processor.apply_chat_template(
        hand_written(images, pil), add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    assert torch.equal(ours["input_ids"], expected["input_ids"])
    assert torch.allclose(ours["pixel_values"], expected["pixel_values"])
    assert torch.allclose(ours["high_res_pixel_values"], expected["high_res_pixel_values"])
    assert prompt.prompt_tokens == ours["input_ids"].shape[-1]  # the budget counts exactly what the model gets
    assert (ours["input_ids"] == handle.processor.image_token_id).sum() == 4 * 576


def test_image_order_is_preserved_across_turns(handle, settings, images):
    message = {"text": "And this one?", "files": [images["white"]]}
    prompt = conv.build_prompt(handle.processor, browser_history(images), message, settings.limits, 4096, 16)
    assert prompt.image_names == ["red.png", "green.jpg", "blue.png", "white.png"]
    pixels = conv.encode(handle.processor, prompt.messages)["pixel_values"]
    centre = pixels[:, :, 192, 192]  # normalised (x-0.5)/0.5: +1 full, -1 none
    expected = torch.tensor([[1, -1, -1], [-1, 1, -1], [-1, -1, 1], [1, 1, 1]], dtype=centre.dtype)
    assert torch.allclose(centre, expected, atol=0.02)


def test_new_message_images_come_before_text_and_plain_string_message(images):
    turn = conv.parse_message({"text": "hi", "files": [images["red"], {"path": images["blue"]}]})
    assert [p.name if isinstance(p, conv.ImageRef) else p for p in turn.parts] == ["red.png", "blue.png", "hi"]
    assert conv.parse_message("just text").parts == ("just text",)


def test_empty_message_is_refused():
    for message in [{"text": "   ", "files": []}, None, ""]:
        with pytest.raises(conv.ConversationError, match="empty"):
            conv.parse_message(message)


def test_unknown_roles_and_shapes_are_refused(images):
    with pytest.raises(conv.ConversationError, match="role"):
        conv.parse_history([{"role": "tool", "content": "x"}])
    with pytest.raises(conv.ConversationError, match="Unrecognised"):
        conv.parse_history([{"role": "user", "content": {"weird": 1}}])


def test_budget_drops_whole_oldest_turns_and_says_so(handle, settings, images):
    history = browser_history(images)  # turn 1: 1 image, turn 2: 2 images
    message = {"text": "And this one?", "files": [images["white"]]}
    full = conv.count_prompt_tokens(handle.processor, conv.conversation_turns(history, message))
    # Room for everything but the first exchange (one image = 576 tokens).
    context = full - 576 + 32
    prompt = conv.build_prompt(handle.processor, history, message, settings.limits, context, 32)
    assert prompt.dropped_turns == 1 and prompt.dropped_images == 1
    assert prompt.image_names == ["green.jpg", "blue.png", "white.png"]
    assert prompt.turns[0].role == "user" and "Compare" in prompt.turns[0].parts
    assert prompt.prompt_tokens + 32 <= context
    assert "Dropped the 1 oldest exchange(s) (1 image(s))" in prompt.notes[0]
    # Tighter: only the newest message fits.
    prompt = conv.build_prompt(handle.processor, history, message, settings.limits, 576 + 200, 32)
    assert prompt.dropped_turns == 2 and prompt.image_names == ["white.png"]


def test_newest_message_alone_too_long_is_a_clear_error(handle, settings, images):
    message = {"text": "describe", "files": [images["red"], images["green"]]}
    with pytest.raises(conv.ContextOverflow, match=r"Too many tokens.*2 image\(s\).*context of 1000 tokens"):
        conv.build_prompt(handle.processor, [], message, settings.limits, 1000, 64)


def test_image_limits_per_message_and_per_conversation(handle, settings, images):
    limits = replace(settings.limits, images_per_message=2, images_per_conversation=4)
    many = {"text": "x", "files": [images["red"], images["green"], images["blue"]]}
    with pytest.raises(conv.TooManyImages, match="3 images; at most 2"):
        conv.build_prompt(handle.processor, [], many, limits, 8192, 16)
    two_more = {"text": "x", "files": [images["white"], images["red"]]}
    with pytest.raises(conv.TooManyImages, match="5 images; at most 4"):
        conv.build_prompt(handle.processor, browser_history(images), two_more, limits, 8192, 16)


def test_bad_new_upload_and_vanished_old_image_are_named(handle, settings, images, tmp_path):
    bad = tmp_path / "fake.png"
    bad.write_text("hello")
    with pytest.raises(ImageRejected, match="fake.png"):
        conv.build_prompt(handle.processor, [], {"text": "x", "files": [str(bad)]}, settings.limits, 4096, 16)
    history = [{"role": "user", "content": {"path": str(tmp_path / "deleted.png")}}, {"role": "assistant", "content": "ok"}]
    with pytest.raises(ImageRejected, match="deleted.png.*earlier in the conversation"):
        conv.build_prompt(handle.processor, history, "and now?", settings.limits, 4096, 16)


def test_trailing_unanswered_user_turn_merges_with_new_message(images):
    turns = conv.conversation_turns([{"role": "user", "content": "first"}], {"text": "second", "files": [images["red"]]})
    assert len(turns) == 1 and turns[0].parts[0] == "first" and turns[0].parts[-1] == "second"


def test_split_last_exchange_and_edit_keep_images(images):
    history = browser_history(images)
    before, message = conv.split_last_exchange(history)
    assert before == history[:3]
    assert message == {"text": "Compare with", "files": [images["green"], images["blue"]]}
    before, message = conv.edit_user_message(history, 1, "Which colour?")  # the text part of the first turn
    assert before == [] and message == {"text": "Which colour?", "files": [images["red"]]}
    with pytest.raises(conv.ConversationError, match="Only your own messages"):
        conv.edit_user_message(history, 2, "x")
    assert conv.count_images(history) == 3 and conv.split_last_exchange([]) == ([], {"text": "", "files": []})
