"""Many people at once: N users arriving together through the real server, `--batch N` against `--batch 1`.

    python bench/bench_many.py                                          # 1.3B architecture, this CPU
    python bench/bench_many.py --device cuda --arch 7b --users 8 --new-tokens 256   # a GPU

Times random-weight checkpoints in the real architectures (real timings, not real answers; written by
scripts/build_bench_checkpoints.py on first use), loaded once, `--dtype auto`. For each configuration a
fresh app is launched in this process (uvicorn, gradio's queue, /v1 — the real server) and N users send
one request each at the same moment: half through `/v1` (the `openai` client, streaming), half through
`/chat` (`gradio_client`), each with a new photo-sized image (nothing to reuse) and `--new-tokens` greedy
tokens (random weights never end a reply early). Printed, all measured in this one run:

- each user's time to first token (from the common start) and decode tokens/s, and the aggregate tokens/s
  (all tokens ÷ the time until the last reply ended), batch N against batch 1;
- for each running stream, its longest gap between two tokens while another user's prompt is being read
  (that user's request → first token) against its own median gap;
- exactness on this model: the same requests decoded together in-process (one forward for all rows)
  against each alone — the largest logit difference and the first differing token, per request.

Tokens are counted as the text increments the clients receive (one per token with these weights).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

import openai  # noqa: E402
import torch  # noqa: E402
from gradio_client import Client, handle_file  # noqa: E402

from bench.bench_reuse import draw  # noqa: E402
from dsvl_app import conversation as conv  # noqa: E402
from dsvl_app.engine import Engine, GenerationParams  # noqa: E402
from dsvl_app.model import load_model  # noqa: E402
from dsvl_app.openai_api import model_id_of  # noqa: E402
from dsvl_app.reuse import ReuseCache  # noqa: E402
from dsvl_app.settings import parse_settings  # noqa: E402
from dsvl_app.ui import build_demo, launch_kwargs  # noqa: E402

QUESTION = "Describe this picture in detail."


@dataclass
class User:
    """One client's view of its reply: when each increment arrived."""

    name: str
    via: str  # "/v1" or "/chat"
    image: str
    start: float = 0.0
    arrivals: list[float] = field(default_factory=list)
    error: str | None = None

    @property
    def ttft(self) -> float:
        return self.arrivals[0] - self.start

    @property
    def end(self) -> float:
        return self.arrivals[-1]

    @property
    def tokens_per_s(self) -> float:
        return (len(self.arrivals) - 1) / (self.arrivals[-1] - self.arrivals[0])

    def gaps(self) -> list[tuple[float, float]]:
        """(start, end) of every gap between two increments."""
        return list(zip(self.arrivals, self.arrivals[1:], strict=False))


def via_v1(url: str, model: str, user: User, tokens: int, start: threading.Barrier) -> None:
    client = openai.OpenAI(base_url=url + "v1", api_key="unused", max_retries=0, timeout=3600)
    image = conv_data_url(user.image)
    start.wait()
    user.start = time.perf_counter()
    stream = client.chat.completions.create(model=model, stream=True, max_tokens=tokens, temperature=0, messages=[
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": image}},
                                     {"type": "text", "text": QUESTION}]}])
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            user.arrivals.append(time.perf_counter())


def via_chat(url: str, model: str, user: User, tokens: int, start: threading.Barrier) -> None:
    client = Client(url, verbose=False)
    start.wait()
    user.start = time.perf_counter()
    job = client.submit({"text": QUESTION, "files": [handle_file(user.image)]}, [], tokens, 0.0, 1.0, 1.0, 0,
                        api_name="/chat")
    seen = ""
    for output in job:  # each update is the whole reply so far
        if output and output != seen:
            # An update may hold several increments: count the tokens (" <rN>" words) it adds.
            user.arrivals.extend([time.perf_counter()] * max(1, output[len(seen):].count("<r")))
            seen = output
    job.result()


def conv_data_url(path: str) -> str:
    import base64

    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode()


def run_users(handle, settings, batch: int, images: list[str], tokens: int) -> tuple[list[User], float]:
    """A fresh server with --batch `batch`; every user at once; (users, aggregate tokens/s)."""
    handle = replace(handle, reuse=ReuseCache(handle.reuse.capacity_bytes))  # an empty reuse cache of its own
    engine = Engine(handle, replace(settings, batch=batch))
    demo = build_demo(settings, engine)
    kwargs = launch_kwargs(settings, engine)
    kwargs.update(server_port=None, prevent_thread_lock=True, quiet=True)
    demo.launch(**kwargs)
    try:
        url, model = demo.local_url, model_id_of(handle)
        users = [User(f"user {i + 1}", "/v1" if i % 2 == 0 else "/chat", image) for i, image in enumerate(images)]
        barrier = threading.Barrier(len(users) + 1)

        def run(user: User) -> None:
            try:
                (via_v1 if user.via == "/v1" else via_chat)(url, model, user, tokens, barrier)
            except Exception as exc:  # noqa: BLE001 - reported in the table
                user.error = f"{type(exc).__name__}: {exc}"

        threads = [threading.Thread(target=run, args=(user,)) for user in users]
        for thread in threads:
            thread.start()
        barrier.wait()
        t0 = time.perf_counter()
        for thread in threads:
            thread.join()
        failed = [u for u in users if u.error or not u.arrivals]
        if failed:
            raise SystemExit(f"batch {batch}: {[(u.name, u.error) for u in failed]}")
        total = sum(len(u.arrivals) for u in users)
        return users, total / (max(u.end for u in users) - t0)
    finally:
        demo.close()


def worst_gap(users: list[User]) -> tuple[str, float, float]:
    """The stream whose longest gap during another user's prompt reading is largest against its median gap;
    (name, that gap, its median gap)."""
    worst = ("-", 0.0, 1.0)
    for user in users:
        gaps = user.gaps()
        if len(gaps) < 3:
            continue
        median = statistics.median(b - a for a, b in gaps)
        windows = [(o.start, o.arrivals[0]) for o in users if o is not user]
        during = [b - a for a, b in gaps if any(a < w1 and b > w0 for w0, w1 in windows)]
        if during and max(during) / median > worst[1] / worst[2]:
            worst = (user.name, max(during), median)
    return worst


def exactness(handle, images: list[str], tokens: int) -> tuple[list[tuple[str, float, int | None]], int]:
    """Each request decoded together with the others (one forward for all rows) against alone.

    The requests run alone first; together they then find their prompts' keys/values in the reuse cache
    (computed by those same runs), so they join the batch at once and differ only by being decoded together.
    Returns the rows and the most rows seen in one decode step."""
    settings = parse_settings(["--model", "tiny"], environ={})
    settings = replace(settings, limits=replace(settings.limits, token_timeout_s=3600))
    shared = replace(handle, reuse=ReuseCache(handle.reuse.capacity_bytes or 2**34))
    params = GenerationParams(max_new_tokens=tokens)
    turns = [[conv.Turn("user", (conv.ImageRef(image), QUESTION))] for image in images]
    alone = []
    for t in turns:
        reply = Engine(shared, settings, batch=1).submit(t, params, record_logits=True)
        "".join(reply)
        alone.append(reply)
    rows_seen = {"max": 0}
    hook = shared.model.model.language_model.register_forward_pre_hook(
        lambda module, args, kwargs: rows_seen.update(max=max(rows_seen["max"], kwargs["inputs_embeds"].shape[0])),
        with_kwargs=True)
    try:
        engine = Engine(shared, settings, batch=len(images), decode="together")
        together = [engine.submit(t, params, record_logits=True) for t in turns]
        readers = [threading.Thread(target=lambda r=r: "".join(r)) for r in together]
        for reader in readers:
            reader.start()
        for reader in readers:
            reader.join()
    finally:
        hook.remove()
    rows = []
    for n, (reply, single) in enumerate(zip(together, alone, strict=True)):
        diff = max(float((a - b).abs().max()) for a, b in zip(reply.request.logits, single.request.logits, strict=False))
        first = next((i for i, (a, b) in enumerate(zip(reply.request.tokens, single.request.tokens, strict=False))
                      if a != b), None)
        rows.append((f"user {n + 1}", diff, first))
    return rows, rows_seen["max"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", choices=["1.3b", "7b"], default=None, help="default: 1.3b on CPU, 7b on CUDA")
    parser.add_argument("--model", default=None, help="a checkpoint folder (default: the random-weight build)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--users", type=int, default=None, help="default: 4 on CPU, 8 on CUDA")
    parser.add_argument("--new-tokens", type=int, default=None, help="default: 128 on CPU, 256 on CUDA")
    parser.add_argument("--exact-tokens", type=int, default=32, help="tokens per request in the exactness check (0: skip it)")
    parser.add_argument("--batch-decode", default="auto", choices=["auto", "together", "rows"])
    args = parser.parse_args()
    cuda = args.device.startswith("cuda")
    arch = args.arch or ("7b" if cuda else "1.3b")
    users, tokens = args.users or (8 if cuda else 4), args.new_tokens or (256 if cuda else 128)
    import build_bench_checkpoints as builder

    model_dir = Path(args.model) if args.model else builder.default_out(arch)
    if not (model_dir / "config.json").exists():
        print(f"writing the random-weight {arch} checkpoint to {model_dir} …", flush=True)
        builder.build(arch, model_dir)
    settings = parse_settings(["--model", str(model_dir), "--device", args.device, "--queue-size", "64",
                               "--token-timeout", "3600", "--batch-decode", args.batch_decode], environ={})
    handle = load_model(settings)
    cpu = "" if cuda else f", {torch.get_num_threads()} threads"
    print(f"{model_dir.name}: {handle.describe()} — {handle.dtype_reason}{cpu}")
    print(f"{users} users arriving together ({(users + 1) // 2} via /v1, {users // 2} via /chat), one new image "
          f"each, {tokens} greedy tokens each; --batch-decode {args.batch_decode}", flush=True)
    folder = Path(tempfile.mkdtemp(prefix="dsvl-many-"))
    warm = draw(folder, "warm", (120, 120, 120))  # first calls pay one-off costs (allocations, thread pools)
    "".join(Engine(replace(handle, reuse=ReuseCache(0)), settings, batch=1).submit(
        [conv.Turn("user", (conv.ImageRef(warm), "Hi."))], GenerationParams(max_new_tokens=2)))

    results = {}
    for batch in (users, 1):  # fresh pictures for each: nothing one run computed can help another
        images = [draw(folder, f"b{batch}u{i}", ((40 + 50 * i) % 250, (180 - 30 * i + 7 * batch) % 250, (60 + 9 * batch) % 250))
                  for i in range(users)]
        t0 = time.perf_counter()
        results[batch] = run_users(handle, settings, batch, images, tokens)
        print(f"  --batch {batch}: done in {time.perf_counter() - t0:.0f} s", flush=True)

    (many, agg_many), (one, agg_one) = results[users], results[1]
    print(f"\n{'user':<8}{'via':<7}{'TTFT b' + str(users):>10}{'TTFT b1':>10}{'ratio':>8}"
          f"{'tok/s b' + str(users):>11}{'tok/s b1':>10}{'ratio':>8}")
    for a, b in zip(many, one, strict=True):
        print(f"{a.name:<8}{a.via:<7}{a.ttft:>9.1f}s{b.ttft:>9.1f}s{a.ttft / b.ttft:>7.2f}×"
              f"{a.tokens_per_s:>11.2f}{b.tokens_per_s:>10.2f}{a.tokens_per_s / b.tokens_per_s:>7.2f}×")
    last_many, last_one = max(u.ttft for u in many), max(u.ttft for u in one)
    print(f"\nlast user's time to first token: {last_many:.1f} s against {last_one:.1f} s one at a time — "
          f"{last_many / last_one:.2f}×  (bar ≤ 0.7×)")
    print(f"aggregate tokens/s: {agg_many:.2f} against {agg_one:.2f} — {agg_many / agg_one:.2f}×  (bar ≥ "
          f"{'5' if cuda else '0.9'}×)")
    if cuda:
        alone = statistics.median(u.tokens_per_s for u in one)
        print(f"each user's tokens/s against its speed alone: min {min(u.tokens_per_s for u in many) / alone:.2f}×"
              "  (bar ≥ 0.6×)")
    name, gap, median = worst_gap(many)
    print(f"longest gap while another user's prompt is read: {name}, {gap:.2f} s against its median gap "
          f"{median:.2f} s — {gap / median:.1f}×  (bar ≤ 3×)")
    ended_first = min(u.end for u in many)
    print(f"every user's first token before any reply ended: {all(u.arrivals[0] < ended_first for u in many)}")

    if args.exact_tokens <= 0:
        return
    print(f"\nExactness, {args.exact_tokens} greedy tokens: decoded together (one forward for all rows) vs alone", flush=True)
    images = [draw(folder, f"exact{i}", (200 - 40 * i, 60 + 30 * i, 90)) for i in range(users)]
    rows, most = exactness(handle, images, args.exact_tokens)
    print(f"  (prompts' keys/values from the runs alone, so the rows differ only by decoding together; up to {most} rows "
          "in one step)")
    for name, diff, first in rows:
        print(f"  {name}: largest logit difference {diff:.2e}; "
              + ("tokens identical" if first is None else f"first differing token at {first}"))


if __name__ == "__main__":
    main()
