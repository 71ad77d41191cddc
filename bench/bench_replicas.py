"""Beyond one machine: the engine as Ray Serve replicas (`--replicas`), 2 replicas against 1, in one run.

    python bench/bench_replicas.py                    # this machine's CPU, the random-weight tiny build
    python bench/bench_replicas.py --tokens 800 --conversations 40

A local Ray instance runs the engine replicas (each `--batch 1`, so the ratio measures replicas, not
batching; on CPU each replica gets its share of the cores); the real app (uvicorn, gradio, /v1) runs in
this process in front of them. Printed, all measured in this one run:

- 4 conversations arriving together through /v1 (streaming, `openai` client), each a new image and
  `--tokens` greedy tokens (random weights never end early): the time until the last one finished, with
  2 replicas against 1;
- affinity: `--conversations` conversations of 3 turns (4 at a time, so the load is balanced), sent
  through the engine's submit (what /v1 and the UI call): how often turns 2 and 3 land on the replica of
  turn 1, how many of their prompt tokens were reused there, and how the conversations were spread.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

import build_tiny_checkpoint  # noqa: E402
import openai  # noqa: E402

from dsvl_app import conversation as conv  # noqa: E402
from dsvl_app import replicas  # noqa: E402
from dsvl_app.engine import GenerationParams  # noqa: E402
from dsvl_app.settings import parse_settings  # noqa: E402
from dsvl_app.ui import build_demo, launch_kwargs  # noqa: E402

EXAMPLES = ROOT / "assets" / "examples"
IMAGES = ["red_circle.png", "blue_square.png", "green_triangle.png", "yellow_circle.png", "three_shapes.png"]


def data_url(name: str) -> str:
    import base64

    return "data:image/png;base64," + base64.b64encode((EXAMPLES / name).read_bytes()).decode()


def four_at_once(url: str, tokens: int) -> tuple[float, list[float]]:
    """4 streaming /v1 conversations sent together: (seconds until the last ended, each one's seconds)."""
    client = openai.OpenAI(base_url=url + "v1", api_key="unused", max_retries=0, timeout=3600)
    start = threading.Barrier(4)

    def one(n: int) -> float:
        messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(IMAGES[n])}},
                                                 {"type": "text", "text": f"Describe picture {n + 1} in detail."}]}]
        start.wait()
        began = time.perf_counter()
        stream = client.chat.completions.create(model="ckpt", messages=messages, max_tokens=tokens, temperature=0,
                                                stream=True, stream_options={"include_usage": True})
        usage = [chunk.usage for chunk in stream if chunk.usage][-1]
        assert usage.completion_tokens == tokens, usage
        return time.perf_counter() - began

    began = time.perf_counter()
    with ThreadPoolExecutor(4) as pool:
        each = list(pool.map(one, range(4)))
    return time.perf_counter() - began, each


def affinity(engine, conversations: int) -> dict:
    """Conversations of 3 turns through engine.submit, 4 at a time."""
    params = GenerationParams(max_new_tokens=8)

    def talk(n: int) -> list[tuple[str, int, int]]:
        image = conv.ImageRef(str(EXAMPLES / IMAGES[n % len(IMAGES)]))
        history = [conv.Turn("user", (image, f"Conversation {n}: what is in the picture?"))]
        seen = []
        for follow_up in ("Tell me more.", "And the colours?", None):
            reply = engine.submit(history, params)
            text = "".join(reply)
            seen.append((reply.stats.replica, reply.stats.reused_tokens, reply.stats.prompt_tokens))
            history += [conv.Turn("assistant", (text,))]
            if follow_up:
                history += [conv.Turn("user", (follow_up,))]
        return seen

    with ThreadPoolExecutor(4) as pool:
        talks = list(pool.map(talk, range(conversations)))
    later = [(turns[0][0] == replica, reused, prompt) for turns in talks for replica, reused, prompt in turns[1:]]
    spread: dict[str, int] = {}
    for turns in talks:
        spread[turns[0][0]] = spread.get(turns[0][0], 0) + 1
    return {"later_turns": len(later), "same_replica": sum(same for same, _, _ in later),
            "reused": sum(reused for _, reused, _ in later), "prompt": sum(prompt for _, _, prompt in later),
            "spread": spread}


def run(checkpoint: str, count: int, tokens: int, conversations: int) -> dict:
    settings = parse_settings(["--model", checkpoint, "--replicas", str(count), "--batch", "1"], environ={})
    began = time.perf_counter()
    engine = replicas.start(settings)
    ready = time.perf_counter() - began
    demo = build_demo(settings, engine)
    kwargs = launch_kwargs(settings, engine)
    kwargs.update(server_port=_free_port(), prevent_thread_lock=True, quiet=True)
    demo.launch(**kwargs)
    try:
        four_at_once(demo.local_url, 8)  # warm-up: first requests load code paths in every process
        total, each = four_at_once(demo.local_url, tokens)
        result = {"replicas": count, "ready_s": ready, "total_s": total, "each_s": each}
        if count > 1 and conversations:
            result["affinity"] = affinity(engine, conversations)
        return result
    finally:
        demo.close()
        engine.close()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=600, help="new tokens per reply in the 4-at-once run")
    parser.add_argument("--conversations", type=int, default=40, help="3-turn conversations for the affinity rate")
    args = parser.parse_args()
    checkpoint = build_tiny_checkpoint.build(Path(tempfile.mkdtemp(prefix="dsvl-random-tiny-")) / "ckpt", seed=0)
    print(f"# python bench/bench_replicas.py --tokens {args.tokens} --conversations {args.conversations}")
    print(f"random-weight tiny build, {os.cpu_count()} CPU(s); each replica --batch 1 and its share of the CPUs")
    one = run(str(checkpoint), 1, args.tokens, 0)
    two = run(str(checkpoint), 2, args.tokens, args.conversations)
    print(f"\n4 conversations at once through /v1, {args.tokens} greedy tokens each, one new image each")
    for result in (one, two):
        each = ", ".join(f"{s:.1f}" for s in result["each_s"])
        print(f"  {result['replicas']} replica(s): all done in {result['total_s']:.1f} s (each: {each} s); "
              f"replicas ready in {result['ready_s']:.1f} s")
    print(f"  2 replicas ÷ 1: {two['total_s'] / one['total_s']:.2f}×  (bar ≤ 0.65×)")
    found = two["affinity"]
    rate = found["same_replica"] / max(found["later_turns"], 1)
    print(f"\naffinity, {args.conversations} conversations × 3 turns, 4 at a time, 2 replicas:")
    print(f"  turns 2 and 3 on turn 1's replica: {found['same_replica']} of {found['later_turns']} = {rate:.1%}  "
          "(bar ≥ 95 %)")
    print(f"  their prompt tokens reused: {found['reused']:,} of {found['prompt']:,} "
          f"({found['reused'] / max(found['prompt'], 1):.0%})")
    print(f"  conversations per replica (by turn 1): {sorted(found['spread'].values())}")


if __name__ == "__main__":
    main()
