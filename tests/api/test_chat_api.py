"""The public /chat endpoint through the real gradio_client against the launched app."""

import pytest
from gradio_client import handle_file
from gradio_client.exceptions import AppError
from PIL import Image

from dsvl_app.engine import GenerationParams
from tests.conftest import generate_text

pytestmark = pytest.mark.api

SAMPLING = {"max_new_tokens": 24, "temperature": 1.0, "top_p": 0.95, "repetition_penalty": 1.0, "seed": 7}


def engine_reply(handle, messages) -> str:
    """What model.generate answers for hand-written template messages (the reference)."""
    inputs = handle.processor.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    return generate_text(handle, inputs, GenerationParams(**SAMPLING))


def pil(path):
    return Image.open(path).convert("RGB")


def chat(client, message, history, **overrides):
    job = client.submit(message, history, **{**SAMPLING, **overrides}, api_name="/chat")
    final = job.result(timeout=120)
    return final, job.outputs()


def test_only_chat_is_exposed(client):
    info = client.view_api(return_format="dict", print_info=False)
    assert list(info["named_endpoints"]) == ["/chat"] and not info["unnamed_endpoints"]
    names = [p["parameter_name"] for p in info["named_endpoints"]["/chat"]["parameters"]]
    assert names == ["message", "history", "max_new_tokens", "temperature", "top_p", "repetition_penalty", "seed",
                     "top_k", "min_p", "answer_format", "json_schema", "pdf_pages"]  # the newest last: older clients work


def test_streams_a_reply_about_two_images(random_client, random_handle, make_image):
    client, handle = random_client, random_handle  # random weights write long enough to watch it stream
    a = make_image("a.png", colour=(255, 0, 0), size=(200, 120))
    b = make_image("b.png", colour=(0, 0, 255), size=(90, 160))
    final, updates = chat(client, {"text": "Compare them.", "files": [handle_file(a), handle_file(b)]}, [])
    assert len(updates) >= 3
    assert all(later.startswith(earlier) for earlier, later in zip(updates, updates[1:]))  # full reply so far
    expected = engine_reply(handle, [{"role": "user", "content": [
        {"type": "image", "image": pil(a)}, {"type": "image", "image": pil(b)}, {"type": "text", "text": "Compare them."}]}])
    assert final == expected and len(final) > 0


def history_shapes(first):
    f = lambda: handle_file(first)  # noqa: E731 - a fresh upload descriptor per shape
    return {
        "typed parts": [{"role": "user", "content": [{"type": "file", "file": f()}, {"type": "text", "text": "What is it?"}]},
                        {"role": "assistant", "content": [{"type": "text", "text": "A shape."}]}],
        "plain strings": [{"role": "user", "content": {"path": f()}}, {"role": "user", "content": "What is it?"},
                          {"role": "assistant", "content": "A shape."}],
        "bare file": [{"role": "user", "content": f()}, {"role": "user", "content": "What is it?"},
                      {"role": "assistant", "content": "A shape."}],
    }


@pytest.mark.parametrize("shape", ["typed parts", "plain strings", "bare file"])
def test_history_in_every_shape(client, handle, make_image, shape):
    first = make_image("first.png", colour=(0, 200, 0))
    second = make_image("second.png", colour=(250, 250, 0))
    history = history_shapes(first)[shape]
    final, _ = chat(client, {"text": "And this?", "files": [handle_file(second)]}, history)
    expected = engine_reply(handle, [
        {"role": "user", "content": [{"type": "image", "image": pil(first)}, {"type": "text", "text": "What is it?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "A shape."}]},
        {"role": "user", "content": [{"type": "image", "image": pil(second)}, {"type": "text", "text": "And this?"}]},
    ])
    assert final == expected


def error_of(client, message, history=(), **overrides) -> str:
    with pytest.raises(AppError) as info:
        chat(client, message, list(history), **overrides)
    return str(info.value)


def test_errors_are_specific_and_the_app_keeps_serving(client, make_image, tmp_path):
    text = tmp_path / "notes.png"
    text.write_text("not an image at all")
    assert "notes.png" in error_of(client, {"text": "hi", "files": [handle_file(str(text))]})
    assert "empty" in error_of(client, {"text": "  ", "files": []})
    five = [handle_file(make_image(f"i{i}.png")) for i in range(5)]
    assert "at most 4 are allowed per message" in error_of(client, {"text": "x", "files": five})
    assert "Too many tokens" in error_of(client, {"text": "word " * 5000, "files": []})
    assert "greater than maximum value 2" in error_of(client, {"text": "hi", "files": []}, temperature=5)
    assert "less than minimum value 0" in error_of(client, {"text": "hi", "files": []}, top_k=-1)
    outside = [{"role": "user", "content": {"path": "/etc/hostname"}}, {"role": "assistant", "content": "ok"}]
    assert "not a file uploaded to this app" in error_of(client, {"text": "hi", "files": []}, outside)
    assert "role" in error_of(client, {"text": "hi", "files": []}, [{"role": "system", "content": "x"}])
    final, _ = chat(client, {"text": "Still there?", "files": [handle_file(make_image("ok.png"))]}, [])
    assert isinstance(final, str) and final


def test_top_k_and_min_p_shape_sampling(random_client, random_handle):
    """top_k 1 or min_p 1 leave only the most likely token: sampling then gives the greedy reply; without them
    the same seed samples another one (random weights spread the probability)."""
    message = {"text": "Describe a sunset in detail.", "files": []}
    greedy, _ = chat(random_client, message, [], temperature=0.0)
    sampled, _ = chat(random_client, message, [], temperature=1.0, top_k=0, top_p=1.0)
    assert sampled != greedy
    assert chat(random_client, message, [], temperature=1.0, top_k=1, top_p=1.0)[0] == greedy
    assert chat(random_client, message, [], temperature=1.0, top_k=0, min_p=1.0, top_p=1.0)[0] == greedy
    reference = generate_text(random_handle, random_handle.processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "text", "text": message["text"]}]}], add_generation_prompt=True,
        tokenize=True, return_dict=True, return_tensors="pt"), GenerationParams(**{**SAMPLING, "top_k": 5, "min_p": 0.1}))
    assert chat(random_client, message, [], top_k=5, min_p=0.1)[0] == reference  # as generate(top_k=5, min_p=0.1)
