"""Reuse seen from a stateless /chat client: resending the history is served from the cache, exactly."""

from dataclasses import replace

import pytest
from gradio_client import Client, handle_file

from dsvl_app.reuse import ReuseCache
from tests.conftest import serve

pytestmark = pytest.mark.api

GREEDY = {"max_new_tokens": 24, "temperature": 0.0, "top_p": 1.0, "repetition_penalty": 1.0, "seed": 0}


@pytest.fixture(scope="module")
def servers(settings, random_handle):
    """The random-weight build served twice: with reuse (its own store) and without."""
    on = replace(random_handle, reuse=ReuseCache(2**30))
    off = replace(random_handle, reuse=ReuseCache(0))
    with serve(settings, on) as (_, url_on), serve(settings, off) as (_, url_off):
        yield on, Client(url_on, verbose=False), Client(url_off, verbose=False)


def test_resent_history_through_chat_is_reused_and_exact(servers, make_image):
    handle, with_reuse, without = servers
    red = make_image("red.png", colour=(230, 20, 20), size=(160, 120))
    green = make_image("green.png", colour=(20, 200, 40), size=(100, 140))
    turns = [{"text": "What is in it?", "files": [red]}, {"text": "Say more.", "files": []},
             {"text": "And this one?", "files": [green]}]
    forwards: list[int] = []  # positions each forward of the one shared language model computed
    hook = handle.model.model.language_model.register_forward_pre_hook(
        lambda module, args, kwargs: forwards.append(kwargs["inputs_embeds"].shape[1]), with_kwargs=True)
    history: list = []
    try:
        for n, turn in enumerate(turns):
            replies, prefilled = [], []
            for client in (with_reuse, without):
                message = {"text": turn["text"], "files": [handle_file(p) for p in turn["files"]]}
                forwards.clear()
                replies.append(client.predict(message, history, **GREEDY, api_name="/chat"))
                prefilled.append(forwards[0])
            assert replies[0] == replies[1] and replies[0]
            if n:  # from turn 2 on, the earlier turns came from the cache: a fraction was prefilled
                assert prefilled[0] < prefilled[1] / 2, prefilled
            history += [{"role": "user", "content": [*({"type": "file", "file": handle_file(p)} for p in turn["files"]),
                                                     {"type": "text", "text": turn["text"]}]},
                        {"role": "assistant", "content": replies[0]}]
    finally:
        hook.remove()
    stats = handle.reuse.stats()
    assert stats.prefix_entries == 1 and stats.feature_entries == 2  # one conversation, two images, all kept
