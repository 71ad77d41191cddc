"""Time to first token and tokens/s through /chat versus a direct `model.generate` on the same inputs.

Runs on CPU and prints ratios measured in this one run:

    python bench/bench_chat.py [--runs 5] [--max-new-tokens 256] [--model PATH]

By default it times the untrained build of the bundled tiny format (same classes, sizes and cost per
token as the bundled checkpoint): the trained checkpoint ends its answer after one short sentence,
too few tokens to time a stream.

The direct baseline is plain transformers: `model.generate` on a thread feeding a
`TextIteratorStreamer`. /chat is the launched app through gradio_client (HTTP, queue, SSE).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from gradio_client import Client, handle_file  # noqa: E402
from PIL import Image  # noqa: E402
from transformers import TextIteratorStreamer  # noqa: E402

from dsvl_app.engine import Engine  # noqa: E402
from dsvl_app.model import get_model  # noqa: E402
from dsvl_app.settings import parse_settings  # noqa: E402
from dsvl_app.ui import build_demo, launch_kwargs  # noqa: E402

IMAGES = [ROOT / "assets" / "examples" / "red_circle.png", ROOT / "assets" / "examples" / "blue_square.png"]
QUESTION = "What colour is the first image? What colour is the second image?"


def untrained_checkpoint() -> str:
    """Build the tiny format with random weights in a temporary folder (they keep writing)."""
    import tempfile

    sys.path.insert(0, str(ROOT / "scripts"))
    import build_tiny_checkpoint

    return str(build_tiny_checkpoint.build(Path(tempfile.mkdtemp(prefix="dsvl-bench-")) / "tiny-untrained"))


def direct(handle, max_new_tokens: int, seed: int) -> tuple[float, float, int]:
    """(ttft, tokens/s, tokens) for plain model.generate + TextIteratorStreamer."""
    import torch

    messages = [{"role": "user", "content": [*({"type": "image", "image": Image.open(p).convert("RGB")} for p in IMAGES),
                                             {"type": "text", "text": QUESTION}]}]
    t0 = time.perf_counter()
    inputs = handle.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                  return_dict=True, return_tensors="pt")
    streamer = TextIteratorStreamer(handle.processor.tokenizer, skip_prompt=True, skip_special_tokens=True)
    torch.manual_seed(seed)
    kwargs = dict(**inputs, max_new_tokens=max_new_tokens, do_sample=True, temperature=1.0, top_p=0.95,
                  streamer=streamer)
    thread = threading.Thread(target=handle.model.generate, kwargs=kwargs)
    thread.start()
    first = None
    for text in streamer:
        if text and first is None:
            first = time.perf_counter()
    end = time.perf_counter()
    thread.join()
    return first - t0, (max_new_tokens - 1) / (end - first), max_new_tokens


def via_api(client: Client, max_new_tokens: int, seed: int) -> tuple[float, float]:
    """(ttft, tokens/s) seen by a gradio_client caller of /chat (uploads excluded, as in direct)."""
    files = [handle_file(str(p)) for p in IMAGES]
    t0 = time.perf_counter()
    job = client.submit({"text": QUESTION, "files": files}, [], max_new_tokens, 1.0, 0.95, 1.0, seed, api_name="/chat")
    first = None
    for update in job:
        if update and first is None:
            first = time.perf_counter()
    end = time.perf_counter()
    return first - t0, (max_new_tokens - 1) / (end - first)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--model", default=None, help="checkpoint to time (default: the untrained tiny build)")
    args = parser.parse_args()

    settings = parse_settings(["--model", args.model or untrained_checkpoint(), "--port", "0"], environ={})
    handle = get_model(settings)
    engine = Engine(handle, settings)
    demo = build_demo(settings, engine)
    kwargs = launch_kwargs(settings, engine)
    kwargs.update(server_port=None, prevent_thread_lock=True, quiet=True)
    demo.launch(**kwargs)
    client = Client(demo.local_url, verbose=False)
    # Warm-up both paths (first calls pay one-off costs: allocations, uploads, thread pools).
    direct(handle, 16, 0)
    via_api(client, 16, 0)

    rows = {"direct": [], "api": []}
    for run in range(args.runs):
        ttft, tps, _ = direct(handle, args.max_new_tokens, run)
        rows["direct"].append((ttft, tps))
        rows["api"].append(via_api(client, args.max_new_tokens, run))
    demo.close()

    med = {k: (statistics.median(r[0] for r in v), statistics.median(r[1] for r in v)) for k, v in rows.items()}
    print(f"{args.model or 'untrained tiny build'}, CPU, 2 images, {args.max_new_tokens} new tokens, median of {args.runs} runs")
    print(f"{'path':<8} {'TTFT (s)':>10} {'tokens/s':>10}")
    for name, (ttft, tps) in med.items():
        print(f"{name:<8} {ttft:>10.3f} {tps:>10.1f}")
    print(f"ratio /chat ÷ direct: TTFT x{med['api'][0] / med['direct'][0]:.2f}, "
          f"tokens/s x{med['api'][1] / med['direct'][1]:.2f}")


if __name__ == "__main__":
    main()
