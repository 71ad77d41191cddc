"""Soak test: many simultaneous /chat sessions against a launched app; completed/failed and latency percentiles.

    python bench/soak.py [--sessions 16] [--rounds 3] [--url http://127.0.0.1:7860/]

Without --url it launches the app in-process on the bundled tiny checkpoint (loopback only).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from gradio_client import Client, handle_file  # noqa: E402
from PIL import Image  # noqa: E402

COLOURS = ["red", "green", "blue", "yellow", "orange", "purple", "black", "pink"]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sessions", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3, help="requests per session")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--url", default=None)
    args = parser.parse_args()

    demo = None
    url = args.url
    if url is None:
        from dsvl_app.engine import Engine
        from dsvl_app.model import get_model
        from dsvl_app.settings import parse_settings
        from dsvl_app.ui import build_demo, launch_kwargs

        settings = parse_settings(["--model", "tiny", "--queue-size", str(max(64, args.sessions * 2))], environ={})
        engine = Engine(get_model(settings), settings)
        demo = build_demo(settings, engine)
        kwargs = launch_kwargs(settings, engine)
        kwargs.update(server_port=None, prevent_thread_lock=True, quiet=True)
        demo.launch(**kwargs)
        url = demo.local_url

    folder = Path(tempfile.mkdtemp(prefix="dsvl-soak-"))
    images = []
    for i in range(args.sessions):
        path = folder / f"session{i}.png"
        Image.new("RGB", (120 + 7 * i, 90 + 5 * i), COLOURS[i % len(COLOURS)]).save(path)
        images.append(path)

    def session(i: int) -> list[tuple[bool, float, str]]:
        results = []
        client = Client(url, verbose=False)
        history: list = []
        for r in range(args.rounds):
            message = {"text": f"Session {i}, round {r}: what colour is it?", "files": [handle_file(str(images[i]))] if r == 0 else []}
            t0 = time.perf_counter()
            try:
                reply = client.predict(message, history, args.max_new_tokens, 1.0, 0.95, 1.0, i, api_name="/chat")
                results.append((True, time.perf_counter() - t0, ""))
                history += [{"role": "user", "content": message["text"]}, {"role": "assistant", "content": reply}]
            except Exception as exc:  # noqa: BLE001 - a soak test counts failures, it does not stop on them
                results.append((False, time.perf_counter() - t0, f"{type(exc).__name__}: {exc}"))
        return results

    t0 = time.perf_counter()
    with ThreadPoolExecutor(args.sessions) as pool:
        outcomes = [r for rs in pool.map(session, range(args.sessions)) for r in rs]
    wall = time.perf_counter() - t0
    if demo is not None:
        demo.close()

    ok = [lat for good, lat, _ in outcomes if good]
    failed = [err for good, _, err in outcomes if not good]
    print(f"sessions {args.sessions} × rounds {args.rounds} = {len(outcomes)} requests in {wall:.1f} s")
    print(f"completed {len(ok)}  failed {len(failed)}")
    if ok:
        print(f"latency p50 {statistics.median(ok):.2f} s  p95 {percentile(ok, 0.95):.2f} s  max {max(ok):.2f} s")
    for err in sorted(set(failed))[:5]:
        print("  failure:", err)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
