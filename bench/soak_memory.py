"""Memory soak: does the server's resident memory stay flat while it answers image questions all day?

    python bench/soak_memory.py                         # 1,600 requests about the same four images
    python bench/soak_memory.py --kind text --requests 800
    python bench/soak_memory.py --kind new              # a new image every request
    python bench/soak_memory.py --server-env MALLOC_ARENA_MAX=2   # try the server under another setting

Starts the real app (`python app.py --model tiny --cache-mb 64`, the bundled checkpoint) as a child process,
so that the memory measured is the server's alone; then sends `--requests` chat completions through `/v1`
with the `openai` client, `--concurrency` at a time, each with its image(s) as data URLs (as Open WebUI
sends them) and 16 new tokens. The server's resident set size (RSS, from /proc) is read every
`--every` rounds (at once, while the round's memory may not be given back yet). Printed: RSS after the warm-up
(the first `--warmup` requests), its growth from there to the end, the table of samples, and RSS 3 s after the
last request, when the engine is idle.
"""

from __future__ import annotations

import argparse
import base64
import io
import os
import random
import signal
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import openai  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402

from tests.conftest import free_port  # noqa: E402


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def data_url(seed: int) -> str:
    """A photo-sized picture with a few shapes, as a PNG data URL."""
    rng = random.Random(seed)
    image = Image.new("RGB", (640, 480), tuple(rng.randrange(256) for _ in range(3)))
    draw = ImageDraw.Draw(image)
    for _ in range(6):
        x, y = rng.randrange(600), rng.randrange(440)
        draw.ellipse((x, y, x + rng.randrange(20, 200), y + rng.randrange(20, 200)),
                     fill=tuple(rng.randrange(256) for _ in range(3)))
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kind", choices=("same", "new", "text"), default="same",
                        help="same: the same four images again and again; new: a new image each time; text: none")
    parser.add_argument("--requests", type=int, default=1600)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--every", type=int, default=20, help="rounds between two RSS samples")
    parser.add_argument("--warmup", type=int, default=160, help="requests before the baseline sample")
    parser.add_argument("--cache-mb", default="64")
    parser.add_argument("--server-env", action="append", default=[], help="NAME=VALUE for the server process")
    parser.add_argument("--server-arg", action="append", default=[], help="an extra app.py argument")
    parser.add_argument("--server-log", default=os.devnull, help="file for the server's output")
    args = parser.parse_args()

    port = free_port()
    env = dict(os.environ, HF_HUB_OFFLINE="1", GRADIO_ANALYTICS_ENABLED="False")
    env.update(item.split("=", 1) for item in args.server_env)
    command = [sys.executable, str(ROOT / "app.py"), "--model", "tiny", "--cache-mb", args.cache_mb,
               "--port", str(port), "--queue-size", str(4 * args.concurrency), *args.server_arg]
    log = open(args.server_log, "w")  # noqa: SIM115 - open for the server's whole life
    server = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                urllib.request.urlopen(base + "/v1/models", timeout=2).read()
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit("the server did not start") from None
                time.sleep(0.5)
        client = openai.OpenAI(base_url=base + "/v1", api_key="none", max_retries=0, timeout=120)
        model = client.models.list().data[0].id
        four = [data_url(i) for i in range(4)]
        counter = iter(range(10**9))

        def ask(i: int) -> str | None:
            if args.kind == "text":
                content: object = f"Request {i}: say something about shapes."
            else:
                images = four if args.kind == "same" else [data_url(1000 + next(counter))]
                content = [*({"type": "image_url", "image_url": {"url": url}} for url in images),
                           {"type": "text", "text": "What colour is the first image?"}]
            try:
                client.chat.completions.create(model=model, messages=[{"role": "user", "content": content}],
                                               max_tokens=16, temperature=0)
                return None
            except Exception as exc:  # noqa: BLE001 - counted, not fatal
                return f"{type(exc).__name__}: {exc}"

        samples: list[tuple[int, float]] = [(0, rss_mb(server.pid))]
        failures: list[str] = []
        done, t0 = 0, time.perf_counter()
        with ThreadPoolExecutor(args.concurrency) as pool:
            rounds = 0
            while done < args.requests:
                batch = min(args.concurrency, args.requests - done)
                failures += [f for f in pool.map(ask, range(done, done + batch)) if f]
                done += batch
                rounds += 1
                if rounds % args.every == 0 or done == args.requests:
                    samples.append((done, rss_mb(server.pid)))
        wall = time.perf_counter() - t0
        time.sleep(3)
        idle_mb = rss_mb(server.pid)
    finally:
        if os.environ.get("SOAK_SIGNAL_AT_END"):
            os.kill(server.pid, signal.SIGUSR1)
            time.sleep(3)
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(30)

    print(f"# python bench/soak_memory.py --kind {args.kind} --requests {args.requests} --cache-mb {args.cache_mb}"
          + "".join(f" --server-env {e}" for e in args.server_env) + "".join(f" --server-arg={a}" for a in args.server_arg))
    print(f"{args.requests} requests ({args.kind}), {args.concurrency} at a time, in {wall:.0f} s; "
          f"failures: {len(failures)}")
    for failure in sorted(set(failures))[:5]:
        print("  failure:", failure)
    print("requests   RSS MB")
    for n, mb in samples:
        print(f"{n:8d}  {mb:7.0f}")
    base_mb = next((mb for n, mb in samples if n >= args.warmup), samples[-1][1])
    print(f"RSS after warm-up ({args.warmup} requests): {base_mb:.0f} MB; at the end: {samples[-1][1]:.0f} MB; "
          f"growth after warm-up: {samples[-1][1] - base_mb:+.0f} MB (largest sample {max(mb for _, mb in samples):.0f} MB)")
    print(f"RSS 3 s after the last request (the engine idle): {idle_mb:.0f} MB")


if __name__ == "__main__":
    main()
