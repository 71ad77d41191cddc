"""The engine as Ray Serve replicas (--replicas): a local Ray instance with 2 replicas of the random-weight
tiny build on CPU, behind the real app (UI, /v1) in this process. About a minute in all; the app process test
starts its own Ray and stops it."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from dsvl_app import conversation as conv
from dsvl_app.engine import Engine
from dsvl_app.sampling import GenerationError, GenerationParams
from dsvl_app.settings import parse_settings
from tests.conftest import EXAMPLES, ROOT, free_port, serve, wait_until
from tests.e2e.conftest import ChatPage, open_page

pytest.importorskip("ray.serve")
replicas = pytest.importorskip("dsvl_app.replicas")

GREEDY = GenerationParams(max_new_tokens=24)
LONG = GenerationParams(max_new_tokens=2000, temperature=1.0, seed=3)


def turns_for(text: str, *images: str) -> list[conv.Turn]:
    return [conv.Turn("user", (*(conv.ImageRef(str(EXAMPLES / name)) for name in images), text))]


def ray_processes() -> dict[int, str]:
    out = subprocess.run(["ps", "-eo", "pid=,ppid=,args="], capture_output=True, text=True).stdout
    return {int(line.split()[0]): line for line in out.splitlines()
            if re.search(r"ray::|raylet|gcs_server|ray/dashboard|ray/_private", line)}


def descendants(root: int) -> set[int]:
    out = subprocess.run(["ps", "-eo", "pid=,ppid="], capture_output=True, text=True).stdout
    children: dict[int, list[int]] = {}
    for line in out.splitlines():
        pid, ppid = map(int, line.split())
        children.setdefault(ppid, []).append(pid)
    found, todo = set(), [root]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


def test_the_app_with_replicas_answers_and_sigterm_leaves_no_ray_process(tmp_path):
    """`python app.py --replicas 2`: one /v1 answer, then SIGTERM stops the app, Serve and Ray entirely."""
    port = free_port()
    log = tmp_path / "app.log"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "DSVL_STORE_DIR": str(tmp_path / "store")}
    with log.open("w") as out:
        app = subprocess.Popen([sys.executable, "app.py", "--model", "tiny", "--replicas", "2", "--port", str(port)],
                               cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        assert wait_until(lambda: "Running on local URL" in log.read_text() or app.poll() is not None, 180, 0.5), \
            log.read_text()[-3000:]
        assert "2 engine replica(s) on Ray Serve" in log.read_text()
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=60)
        reply = client.chat.completions.create(model="tiny-dsvl-hybrid", messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": _data_url("red_circle.png")}},
            {"type": "text", "text": "What colour is the shape?"}]}])
        assert reply.choices[0].message.content == "The shape is red."  # as the in-process app answers
        started = descendants(app.pid) & set(ray_processes())
        assert len(started) >= 4, ray_processes()  # gcs, raylet, controller, 2 replicas (and agents)
        began = time.monotonic()
        app.send_signal(signal.SIGTERM)
        app.wait(timeout=60)
        assert time.monotonic() - began < 30
        assert wait_until(lambda: not started & set(ray_processes()), 15, 0.5), \
            [ray_processes()[pid] for pid in started & set(ray_processes())]
        assert "Ray Serve and Ray stopped" in log.read_text()
    finally:
        if app.poll() is None:
            os.killpg(app.pid, signal.SIGKILL)


def _data_url(name: str) -> str:
    import base64

    return "data:image/png;base64," + base64.b64encode((EXAMPLES / name).read_bytes()).decode()


@pytest.fixture(scope="module")
def cluster(random_handle):
    """2 replicas (--batch 1 each) of the random-weight build behind the real app; yields (engine, url)."""
    settings = parse_settings(["--model", random_handle.source, "--replicas", "2", "--batch", "1"], environ={})
    engine = replicas.start(settings)
    try:
        with serve(settings, None, engine) as served:
            yield engine, served[1]
    finally:
        engine.close()


@pytest.fixture(scope="module")
def local(random_handle):
    """The same checkpoint in this process, one reply at a time: the reference answers."""
    return Engine(random_handle, parse_settings(["--model", random_handle.source, "--batch", "1"], environ={}))


def answer(engine, turns, params=GREEDY):
    reply = engine.submit(turns, params)
    text = "".join(reply)
    return text, reply.stats


def test_both_replicas_serve_and_answer_as_the_in_process_engine(cluster, local):
    engine, _ = cluster
    asks = [turns_for("Describe it.", "red_circle.png"), turns_for("What is this?", "blue_square.png"),
            turns_for("Tell me a story."), turns_for("Compare them.", "green_triangle.png", "yellow_circle.png")]
    with ThreadPoolExecutor(4) as pool:
        remote = list(pool.map(lambda turns: answer(engine, turns), asks))
    assert len({stats.replica for _, stats in remote}) == 2, [stats.replica for _, stats in remote]
    for (text, stats), turns in zip(remote, asks, strict=True):
        assert text == answer(local, turns)[0] and stats.new_tokens == 24


def _scrape(url: str) -> dict[tuple[str, frozenset], float]:
    from prometheus_client.parser import text_string_to_metric_families

    response = httpx.get(url + "metrics", timeout=30)
    assert response.status_code == 200, response.text
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(response.text) for s in family.samples}


def _total(samples: dict, name: str, **labels) -> float:
    return sum(v for (n, ls), v in samples.items() if n == name and set(labels.items()) <= set(ls))


def test_the_front_door_shows_every_replicas_metrics_and_counts_them_healthy(cluster):
    """After the test above, both replicas answered: /metrics has each one's samples (label `replica`), a /v1 reply's
    usage shows up in them, the front door's own refusals are labelled `front`, /health counts 2 of 2."""
    engine, url = cluster
    def both_healthy() -> bool:  # (each reports every REPORT_S; a busy machine may delay one report)
        health = httpx.get(url + "health", timeout=10)
        return health.status_code == 200 and health.json()["replicas"] == {"healthy": 2, "total": 2}
    assert wait_until(both_healthy, 30, 0.5), httpx.get(url + "health", timeout=10).text

    def both_answered() -> bool:  # each answered above (a replica reports every REPORT_S)
        samples = _scrape(url)
        names = {dict(ls).get("replica") for (n, ls) in samples if n == "dsvl_requests_finished_total"}
        return len(names - {"front"}) == 2 and "front" in names and all(
            _total(samples, "dsvl_requests_finished_total", replica=name) >= 1 for name in names - {"front"})
    assert wait_until(both_answered, 15, 0.5), _scrape(url)
    before = _scrape(url)
    client = openai.OpenAI(base_url=url + "v1", api_key="unused", max_retries=0, timeout=60)
    reply = client.chat.completions.create(model="ckpt", max_tokens=7, messages=[{"role": "user", "content": "Hi"}])
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="ckpt", max_tokens=7, temperature=9,
                                       messages=[{"role": "user", "content": "Hi"}])

    def counted() -> bool:  # (a replica reports every REPORT_S)
        now = _scrape(url)
        return _total(now, "dsvl_generation_tokens_total", surface="v1") - _total(
            before, "dsvl_generation_tokens_total", surface="v1") == reply.usage.completion_tokens
    assert wait_until(counted, 15, 0.5)
    after = _scrape(url)
    assert _total(after, "dsvl_prompt_tokens_total", surface="v1") - _total(
        before, "dsvl_prompt_tokens_total", surface="v1") == reply.usage.prompt_tokens
    assert _total(after, "dsvl_requests_refused_total", replica="front", reason="bad_parameter", surface="v1") == 1


def test_a_conversation_stays_on_its_replica_and_reuses_its_earlier_turns(cluster, caplog):
    """Two conversations through /v1 at once, 3 turns each: every turn on its first turn's replica, turns 2 and 3
    with their earlier turns' keys/values reused (the access log says both)."""
    _, url = cluster
    client = openai.OpenAI(base_url=url + "v1", api_key="unused", max_retries=0, timeout=120)

    start = threading.Barrier(2)

    def talk(image: str, question: str) -> list[int]:
        """The prompt size of each turn (how this conversation's lines are found in the log)."""
        messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": _data_url(image)}},
                                                 {"type": "text", "text": question}]}]
        sizes = []
        start.wait()
        for follow_up in ("Say more.", "And then?", None):
            # Turn 1 is long, so that both conversations are in flight together: the second goes to the idle
            # replica (by load; two short replies one after the other may meet on one replica, which is fine).
            tokens = 300 if not sizes else 16
            reply = client.chat.completions.create(model="ckpt", messages=messages, max_tokens=tokens, temperature=0)
            sizes.append(reply.usage.prompt_tokens)
            messages += [{"role": "assistant", "content": reply.choices[0].message.content}]
            if follow_up:
                messages += [{"role": "user", "content": follow_up}]
        return sizes

    caplog.set_level("INFO", logger="dsvl_app.openai_api")
    with ThreadPoolExecutor(2) as pool:
        # Images no earlier test began a prompt with: two new conversations.
        talks = list(pool.map(talk, ["three_shapes.png", "yellow_circle.png"], ["What is it?", "What is in this picture?"]))
    lines = [r.getMessage() for r in caplog.records if "POST /v1/chat/completions 200" in r.getMessage()]
    assert len(lines) == 6 and len({size for sizes in talks for size in sizes}) == 6, (talks, lines)
    first_replicas = set()
    for sizes in talks:
        mine = [next(line for line in lines if f" {size} prompt +" in line) for size in sizes]
        assert len({re.search(r"replica (\S+)", line)[1] for line in mine}) == 1, mine  # one replica
        assert all("prompt tokens reused" in line for line in mine[1:]), mine  # its earlier turns reused
        first_replicas.add(re.search(r"replica (\S+)", mine[0])[1])
    assert len(first_replicas) == 2, lines  # two new conversations at once: one on each replica


def test_stop_stops_the_work_inside_the_replica(cluster):
    engine, _ = cluster
    turns = turns_for("Tell me everything.", "green_triangle.png")
    reply = engine.submit(turns, LONG)
    pieces = reply.updates()
    assert wait_until(lambda: next(pieces) is not None and reply.stats.new_tokens >= 5, 60, 0)
    assert replica_status(engine, turns)["replies"] == 1
    reply.close()  # what Stop, a closed tab and a dropped /v1 client do
    assert wait_until(lambda: replica_status(engine, turns)["replies"] == 0, 10, 0.2)


@pytest.mark.browser
def test_a_ui_conversation_stays_on_one_replica_and_its_meters_show_reuse(cluster, browser):
    _, url = cluster
    with open_page(browser, url) as page:
        chat = ChatPage(page)
        chat.set_control("max-new-tokens", 12)
        seen = []
        for n, (text, images) in enumerate([("What is it?", [str(EXAMPLES / "red_circle.png")]), ("More.", []),
                                            ("Again.", [])]):
            chat.send(text, *images)
            chat.wait_reply_done()
            meters = chat.meters()
            seen.append(re.search(r"Replica\s+(\S+)", meters)[1])
            if n:
                assert re.search(r"Reused from earlier turns\s+[1-9]", meters), meters
        assert len(set(seen)) == 1, seen


def test_a_killed_replica_ends_its_reply_with_a_specific_error_and_the_next_is_answered(cluster, local):
    """Run last: it kills a replica (Serve starts a new one)."""
    engine, url = cluster
    turns = turns_for("Tell me everything.", "blue_square.png")
    reply = engine.submit(turns, LONG)
    pieces = reply.updates()
    assert wait_until(lambda: next(pieces) is not None and reply.stats.new_tokens >= 5, 60, 0)
    pid = replica_status(engine, turns)["pid"]
    os.kill(pid, signal.SIGKILL)
    began = time.monotonic()
    with pytest.raises(GenerationError, match="engine replica writing this reply stopped"):
        for _ in pieces:
            pass
    assert time.monotonic() - began < 10
    # The next request (this very conversation again, as the UI's retry sends it) is answered by a healthy replica.
    text, stats = answer(engine, turns)
    assert text == answer(local, turns)[0]
    body = {"model": "ckpt", "max_tokens": 8, "messages": [{"role": "user", "content": "Hello?"}]}
    assert httpx.post(url + "v1/chat/completions", json=body, timeout=60).status_code == 200
    # Serve replaces the dead replica; /health counts the new one once it reports.
    assert wait_until(lambda: _running_replicas() == 2, 90, 1), _running_replicas()
    assert wait_until(lambda: httpx.get(url + "health", timeout=10).json()["replicas"]["healthy"] == 2, 30, 1)


@pytest.mark.browser
def test_in_the_ui_a_killed_replica_keeps_the_conversation_which_goes_on(cluster, browser):
    """After the kill test: Serve is back to 2 replicas. A reply cut by its replica's death keeps what was written,
    says why, unlocks the input, and the next message is answered."""
    _, url = cluster
    assert wait_until(lambda: _running_replicas() == 2, 90, 1)
    with open_page(browser, url) as page:
        chat = ChatPage(page)
        chat.set_control("max-new-tokens", 2000)
        chat.set_control("temperature", 1)
        chat.send("Tell me everything.", str(EXAMPLES / "three_shapes.png"))
        assert wait_until(lambda: (found := re.search(r"New tokens\s+(\d+)", chat.meters())) and int(found[1]) >= 20,
                          60, 0.1), chat.meters()
        replica = re.search(r"Replica\s+(\S+)", chat.meters())[1]
        # The same first message routes a status call to the replica writing this conversation.
        status = replica_status(cluster[0], turns_for("Tell me everything.", "three_shapes.png"))
        assert status["replica"] == replica and status["replies"] == 1, (status, replica)
        os.kill(status["pid"], signal.SIGKILL)
        assert "engine replica writing this reply stopped" in chat.toast_text(timeout=10)
        cut = chat.wait_reply_done()
        assert len(cut) > 10  # what was written stays
        chat.set_control("max-new-tokens", 8)
        chat.send("Go on.")
        assert chat.wait_reply_done(timeout=90) and len(chat.bot_texts()) == 2
        assert re.search(r"Replica\s+(\S+)", chat.meters())[1] != replica


def replica_status(engine, turns) -> dict:
    """The status of the replica holding this conversation (routed there by its prefix, as its turns are).

    Asked from a thread: Playwright's sync API leaves an event loop on this one, and Serve refuses sync calls there.
    """
    from dsvl_app.engine import prepare

    affinity = engine.affinity(prepare(engine.handle, engine.limits, turns, GREEDY, hash_images=True))
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(lambda: engine.deployment.status.remote(affinity=affinity).result()).result()


def _running_replicas() -> int:
    from ray import serve

    status = serve.status().applications[replicas.APP_NAME].deployments["engine"]
    return status.replica_states.get("RUNNING", 0)
