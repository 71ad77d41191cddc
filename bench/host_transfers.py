"""Ready for a GPU? Device→host transfers per decode step, and how far each step looks back.

    python bench/host_transfers.py                      # the random-weight tiny build, 4 rows, this CPU
    python bench/host_transfers.py --rows 8 --device cuda --arch 1.3b

On a GPU every conversion of a tensor to a Python value (`int()`, `.item()`, `.tolist()`, `bool()`, …) makes
the host wait for the device, so a decode step should read its tokens once. This runs `--rows` replies
together (greedy, seeded sampling, a repetition penalty, top-k: a mix, so that every path is taken) and counts,
on the engine's thread only, the conversions made during `--steps` decode steps once every row is decoding;
and it records each decode forward's attended length against the rows' capacity (prompt + max_new_tokens).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

import torch  # noqa: E402
from PIL import Image  # noqa: E402

from dsvl_app import conversation as conv  # noqa: E402
from dsvl_app.engine import Engine  # noqa: E402
from dsvl_app.model import load_model  # noqa: E402
from dsvl_app.sampling import GenerationParams  # noqa: E402
from dsvl_app.settings import parse_settings  # noqa: E402

CONVERSIONS = ("item", "tolist", "__int__", "__float__", "__bool__", "__index__", "cpu", "numpy")


def checkpoint(arch: str) -> Path:
    if arch == "tiny":
        import build_tiny_checkpoint

        return build_tiny_checkpoint.build(Path(tempfile.mkdtemp(prefix="dsvl-random-tiny-")) / "ckpt", seed=0)
    import build_bench_checkpoints as builder

    model_dir = builder.default_out(arch)
    if not (model_dir / "config.json").exists():
        builder.build(arch, model_dir)
    return model_dir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="tiny", help="tiny (random-weight tiny build), 1.3b or 7b (bench checkpoints)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--rows", type=int, default=4)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--new-tokens", type=int, default=400)
    args = parser.parse_args()

    settings = parse_settings(["--model", str(checkpoint(args.arch)), "--device", args.device], environ={})
    handle = load_model(settings)
    engine = Engine(handle, settings, batch=args.rows, decode="together")
    scheduler = engine.scheduler
    folder = Path(tempfile.mkdtemp(prefix="dsvl-transfers-"))
    mix = [GenerationParams(max_new_tokens=args.new_tokens),
           GenerationParams(max_new_tokens=args.new_tokens, temperature=1.0, top_p=0.9, seed=1),
           GenerationParams(max_new_tokens=args.new_tokens, repetition_penalty=1.2),
           GenerationParams(max_new_tokens=args.new_tokens, temperature=0.8, top_k=20, seed=2)]
    replies = []
    for i in range(args.rows):
        path = folder / f"{i}.png"
        Image.new("RGB", (64 + 8 * i, 48), (40 * i % 256, 120, 200)).save(path)
        turns = [conv.Turn("user", (conv.ImageRef(str(path)), f"Describe picture {i}."))]
        replies.append(engine.submit(turns, replace(mix[i % len(mix)])))

    counted = {"on": False, "n": 0}
    engine_thread: dict[str, int | None] = {"id": None}
    views: list[tuple[int, int]] = []
    originals = {name: getattr(torch.Tensor, name) for name in CONVERSIONS}

    def counting(name):
        real = originals[name]

        def wrapper(self, *a, **k):
            if counted["on"] and threading.get_ident() == engine_thread["id"]:
                counted["n"] += 1
            return real(self, *a, **k)

        return wrapper

    def hook(module, a, kwargs):
        engine_thread["id"] = threading.get_ident()
        if kwargs.get("past_key_values") is scheduler.pool.cache:
            views.append((scheduler.pool.view_len, max(r.capacity for r in scheduler.running)))

    remove = handle.model.model.language_model.register_forward_pre_hook(hook, with_kwargs=True)
    for name in CONVERSIONS:
        setattr(torch.Tensor, name, counting(name))
    try:
        readers = [threading.Thread(target=lambda r=r: "".join(r)) for r in replies]
        for reader in readers:
            reader.start()
        deadline = time.monotonic() + 600
        while not (len(scheduler.running) == args.rows and all(r.stats.new_tokens for r in replies)):
            if time.monotonic() > deadline or all(r.finished for r in replies):
                raise SystemExit("the rows never decoded together")
            time.sleep(0.01)
        steps, t0 = scheduler.steps, time.perf_counter()
        counted["on"] = True
        while scheduler.steps - steps < args.steps:
            time.sleep(0.005)
        counted["on"] = False
        steps, seconds = scheduler.steps - steps, time.perf_counter() - t0
    finally:
        for name, real in originals.items():
            setattr(torch.Tensor, name, real)
        remove.remove()
        for reply in replies:
            reply.cancel()
    print(f"# python bench/host_transfers.py --arch {args.arch} --device {args.device} --rows {args.rows} "
          f"--steps {args.steps}")
    print(f"{handle.label} on {handle.device} ({str(handle.dtype).removeprefix('torch.')}), {args.rows} rows decoded "
          f"together (greedy, sampled, repetition penalty, top-k)")
    print(f"device→host conversions on the engine's thread: {counted['n']} in {steps} decode steps = "
          f"{counted['n'] / steps:.2f} per step ({seconds / steps * 1000:.1f} ms a step)")
    looked = [view for view, _ in views]
    capacity = max(cap for _, cap in views)
    print(f"attended positions per decode forward: {min(looked)}–{max(looked)} (the rows' capacity: {capacity})")


if __name__ == "__main__":
    main()
