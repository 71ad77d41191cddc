"""Real-size benchmark: reuse across turns, bfloat16 on CPU, /chat against direct generate, decode speed.

    python bench/bench_reuse.py                                  # the 1.3B architecture on this CPU
    python bench/bench_reuse.py --device cuda --arch 7b          # the 7B in bfloat16 on a GPU

Times random-weight checkpoints in the real architectures (real timings, not real answers), written by
scripts/build_bench_checkpoints.py on first use. Every figure is measured in this one run:

1. a fresh three-turn conversation — turn 1 one image, turn 2 a new image, turn 3 text only, and a
   variant whose turn 3 brings a new image (also once with the image encoded on attach, as the UI does
   while you type) — time to first token per turn with reuse off and on, the replies compared (greedy;
   float32 on CPU, where exactness is checked), decode tokens/s;
2. the same conversation through `/chat` (gradio_client, history resent each turn) against the engine;
3. turn 1 with `--dtype auto` against float32 (CPU);
4. `/chat` against a direct `model.generate` on the same inputs (fresh images, so nothing is reused);
5. decode tokens/s against its bound (weight bytes read per token ÷ measured memory bandwidth), and
   transformers' default DynamicCache against the engine's static cache at ~3k tokens of context.

Time to first token is measured from the request (prompt building, processor, hashing included) to
the first streamed text.
"""

from __future__ import annotations

import argparse
import statistics
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
from gradio_client import Client, handle_file  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402
from transformers import TextIteratorStreamer  # noqa: E402

from dsvl_app import conversation as conv  # noqa: E402
from dsvl_app.engine import Engine, GenerationParams, Prefetcher  # noqa: E402
from dsvl_app.media import load_image  # noqa: E402
from dsvl_app.model import load_model  # noqa: E402
from dsvl_app.reuse import ReuseCache  # noqa: E402
from dsvl_app.settings import Limits, parse_settings  # noqa: E402
from dsvl_app.ui import build_demo, launch_kwargs  # noqa: E402

LIMITS = Limits()


def draw(folder: Path, name: str, colour: tuple[int, int, int], size=(1024, 768)) -> str:
    """A photo-sized test image (the processor resizes it as it would a real one)."""
    image = Image.new("RGB", size, (235, 232, 225))
    draw_ = ImageDraw.Draw(image)
    draw_.ellipse((size[0] // 4, size[1] // 4, size[0] // 2, size[1] // 2), fill=colour)
    draw_.rectangle((size[0] // 2, size[1] // 2, 3 * size[0] // 4, 7 * size[1] // 8), fill=colour[::-1])
    path = folder / f"{name}.png"
    image.save(path)
    return str(path)


def exchange(message: dict, reply: str) -> list[dict]:
    return ([{"role": "user", "content": {"path": p}} for p in message["files"]]
            + [{"role": "user", "content": message["text"]}, {"role": "assistant", "content": reply}])


def engine_for(handle, limits: Limits = LIMITS) -> Engine:
    """An engine of its own for `handle` (one reply at a time here: this benchmark times single replies)."""
    settings = replace(parse_settings(["--model", "tiny"], environ={}), limits=replace(limits, token_timeout_s=3600))
    return Engine(handle, settings, batch=1)


def engine_turn(handle, history: list, message: dict, params: GenerationParams,
                limits: Limits = LIMITS) -> tuple[str, float, object]:
    """One turn through the engine path /chat takes; (reply, time to first text, stats)."""
    t0 = time.perf_counter()
    reply = engine_for(handle, limits).submit(conv.conversation_turns(history, message), params,
                                      new=conv.parse_message(message), load=load_image)
    first, pieces = None, []
    for piece in reply:
        first = first or time.perf_counter()
        pieces.append(piece)
    return "".join(pieces), first - t0, reply.stats


def conversation(images: dict[str, str]) -> list[tuple[str, list[int], dict]]:
    """(label, indices of the turns before it, message): turns 1-3 and the variant turn 3."""
    return [
        ("1: one image", [], {"text": "What is in this picture?", "files": [images["a"]]}),
        ("2: a new image", [0], {"text": "And how does this one differ?", "files": [images["b"]]}),
        ("3: text only", [0, 1], {"text": "Which of the two would you choose, and why?", "files": []}),
        ("3': a new image", [0, 1], {"text": "Now compare a third one.", "files": [images["c"]]}),
        ("3'': new, attached", [0, 1], {"text": "Now compare a third one.", "files": [images["d"]]}),
    ]


def run_conversations(off_handle, on_handle, images, params) -> tuple[list[dict], list[dict]]:
    """The turns in order, each without reuse and then with it, back to back (the machine's speed drifts).

    Each side continues its own conversation; the last turn's image is encoded on attach first on the
    reuse side, as the UI does while you type (without reuse there is nothing to encode ahead into).
    """
    turns = conversation(images)
    sides = {"off": (off_handle, [], []), "on": (on_handle, [], [])}
    for n, (label, before, message) in enumerate(turns):
        for name, (handle, replies, rows) in sides.items():
            history = [m for i in before for m in exchange(turns[i][2], replies[i])]
            if name == "on" and n == len(turns) - 1:
                prefetcher = Prefetcher(engine_for(handle), lambda path: load_image(path, LIMITS))
                if prefetcher.submit(message["files"]):
                    while prefetcher.encoded < len(message["files"]):
                        time.sleep(0.05)
            reply, ttft, stats = engine_turn(handle, history, message, params)
            replies.append(reply)
            rows.append({"label": label, "reply": reply, "ttft": ttft, "prompt": stats.prompt_tokens,
                         "reused": stats.reused_tokens, "images": stats.images, "images_reused": stats.images_reused,
                         "tps": stats.tokens_per_s})
    return sides["off"][2], sides["on"][2]


def dtype_ratio(fast, slow, folder: Path, runs: int) -> tuple[float, float]:
    """Median time to first token of a fresh one-image turn (no reuse) in two dtypes, runs alternating."""
    params, times = GenerationParams(max_new_tokens=2), {"fast": [], "slow": []}
    for run in range(runs):
        message = {"text": "What is in this picture?", "files": [draw(folder, f"dtype{run}", (90, 30 * run, 160))]}
        for name, handle in (("slow", slow), ("fast", fast)):
            times[name].append(engine_turn(replace(handle, reuse=ReuseCache(0)), [], message, params)[1])
    return statistics.median(times["fast"]), statistics.median(times["slow"])


def round_images(folder: Path, n: int) -> dict[str, str]:
    """Four fresh images for round `n` (other colours, so no round finds another's features cached)."""
    colours = {"a": (200, 40, 40), "b": (40, 60, 200), "c": (40, 170, 60), "d": (180, 160, 30)}
    return {k: draw(folder, f"{k}{n}", tuple((c + 23 * n) % 256 for c in rgb)) for k, rgb in colours.items()}


def compare(handle, images, params) -> tuple[list[dict], list[dict], object]:
    """One fresh conversation without and with reuse (its own empty store); (off rows, on rows, on handle)."""
    on_handle = replace(handle, reuse=ReuseCache(handle.reuse.capacity_bytes))
    off, on = run_conversations(replace(handle, reuse=ReuseCache(0)), on_handle, images, params)
    return off, on, on_handle


def print_turns(title: str, rounds: list, exact_dtype: bool) -> None:
    med = statistics.median
    print(f"\n{title}")
    print(f"  {'turn':<19}{'prompt':>7}{'reused':>8}{'images re-used':>16}{'TTFT off':>10}{'TTFT on':>9}"
          f"{'on÷off':>8}  {'replies equal':<20}{'decode tok/s off/on'}")
    for n, row in enumerate(rounds[0][0]):
        offs, ons = [r[0][n] for r in rounds], [r[1][n] for r in rounds]
        equal = sum(a["reply"] == b["reply"] for a, b in zip(offs, ons, strict=True))
        same = f"{equal} of {len(rounds)}" + ("" if equal == len(rounds) or exact_dtype else " (bf16 rounding)")
        ratio = med(b["ttft"] / a["ttft"] for a, b in zip(offs, ons, strict=True))
        print(f"  {row['label']:<19}{row['prompt']:>7,}{ons[0]['reused']:>8,}{ons[0]['images_reused']:>10} of "
              f"{row['images']}{med(a['ttft'] for a in offs):>9.2f}s{med(b['ttft'] for b in ons):>8.2f}s{ratio:>7.2f}×  "
              f"{same:<20}{med(a['tps'] or 0 for a in offs):.2f} / {med(b['tps'] or 0 for b in ons):.2f}")


def launch(settings, handle):
    engine = Engine(handle, settings)
    demo = build_demo(settings, engine)
    kwargs = launch_kwargs(settings, engine)
    kwargs.update(server_port=None, prevent_thread_lock=True, quiet=True)
    demo.launch(**kwargs)
    return demo, Client(demo.local_url, verbose=False)


def api_turn(client, history: list, message: dict, params: GenerationParams) -> tuple[str, float, float | None]:
    """(reply, time to first text, decode tokens/s) as a gradio_client caller of /chat sees them."""
    files = [handle_file(p) for p in message["files"]]
    api_history = [{**m, "content": handle_file(m["content"]["path"])} if isinstance(m["content"], dict) else m
                   for m in history]
    t0 = time.perf_counter()
    job = client.submit({"text": message["text"], "files": files}, api_history, params.max_new_tokens,
                        params.temperature, 1.0, 1.0, 0, api_name="/chat")
    first = last = None
    seen, changes = "", 0
    for text in job:  # each update is the reply so far: one more token per change
        if text and text != seen:
            now = time.perf_counter()
            first, last, seen, changes = first or now, now, text, changes + 1
    reply = job.result()
    return reply, first - t0, (changes - 1) / (last - first) if changes > 1 and last > first else None


def direct_turn(handle, message: dict, params: GenerationParams) -> tuple[float, float]:
    """(ttft, tokens/s) of plain transformers: processor + model.generate + TextIteratorStreamer, no reuse."""
    images = [load_image(p, LIMITS) for p in message["files"]]
    messages = [{"role": "user", "content": [*({"type": "image", "image": im} for im in images),
                                             {"type": "text", "text": message["text"]}]}]
    t0 = time.perf_counter()
    inputs = handle.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                  return_dict=True, return_tensors="pt")
    inputs = {k: (v.to(handle.device, handle.dtype) if v.is_floating_point() else v.to(handle.device))
              for k, v in inputs.items()}
    streamer = TextIteratorStreamer(handle.processor.tokenizer, skip_prompt=True, skip_special_tokens=True)

    def work():
        with torch.inference_mode():
            handle.model.generate(**inputs, max_new_tokens=params.max_new_tokens, do_sample=False, streamer=streamer)

    thread = threading.Thread(target=work)
    thread.start()
    times = [time.perf_counter() for text in streamer if text]
    thread.join()
    return times[0] - t0, (len(times) - 1) / (times[-1] - times[0])


def bandwidth_gbs(device: torch.device) -> float:
    """Memory read bandwidth: the best of five sums over a 2 GiB tensor."""
    x = torch.ones(2**29, dtype=torch.float32, device=device)
    best = float("inf")
    for _ in range(6):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        x.sum().item()
        best = min(best, time.perf_counter() - t0)
    return x.numel() * 4 / best / 1e9


def decode_bytes(model) -> int:
    """Weight bytes read per decoded token: the language model and its output head (not the vision towers)."""
    modules = [model.model.language_model, model.lm_head]
    return sum(p.numel() * p.element_size() for m in modules for p in m.parameters())


def long_context_decode(handle, folder: Path, images: int, new_tokens: int) -> tuple[int, float, float]:
    """(prompt tokens, decode tok/s with transformers' DynamicCache, with the engine's static cache)."""
    paths = [draw(folder, f"long{i}", (30 * i, 120, 200 - 20 * i)) for i in range(images)]
    message = {"text": "Describe every picture in detail.", "files": paths}
    params = GenerationParams(max_new_tokens=new_tokens)
    prompt = conv.build_prompt(handle.processor, [], message, replace(LIMITS, images_per_message=images),
                               handle.context_tokens, new_tokens, load=load_image)
    inputs = conv.encode(handle.processor, prompt.messages)
    moved = {k: (v.to(handle.device, handle.dtype) if v.is_floating_point() else v.to(handle.device))
             for k, v in inputs.items()}
    streamer = TextIteratorStreamer(handle.processor.tokenizer, skip_prompt=True)

    def work():
        with torch.inference_mode():
            handle.model.generate(**moved, max_new_tokens=new_tokens, do_sample=False, streamer=streamer)

    thread = threading.Thread(target=work)
    thread.start()
    times = [time.perf_counter() for text in streamer if text]
    thread.join()
    dynamic = (len(times) - 1) / (times[-1] - times[0])
    _, _, stats = engine_turn(replace(handle, reuse=ReuseCache(0)), [], message, params,
                              replace(LIMITS, images_per_message=images))
    return prompt.prompt_tokens, dynamic, stats.tokens_per_s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", choices=["1.3b", "7b"], default=None, help="default: 1.3b on CPU, 7b on CUDA")
    parser.add_argument("--model", default=None, help="a checkpoint folder (default: the random-weight build)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--new-tokens", type=int, default=32, help="tokens per reply")
    parser.add_argument("--runs", type=int, default=3, help="runs of /chat and of direct generate, and of each dtype")
    parser.add_argument("--rounds", type=int, default=3, help="conversations timed with --dtype auto")
    args = parser.parse_args()
    cuda = args.device.startswith("cuda")
    arch = args.arch or ("7b" if cuda else "1.3b")
    import build_bench_checkpoints as builder

    model_dir = Path(args.model) if args.model else builder.default_out(arch)
    if not (model_dir / "config.json").exists():
        print(f"writing the random-weight {arch} checkpoint to {model_dir} …", flush=True)
        builder.build(arch, model_dir)
    folder = Path(tempfile.mkdtemp(prefix="dsvl-bench-"))
    images = round_images(folder, 0)
    params = GenerationParams(max_new_tokens=args.new_tokens)
    flags = ["--model", str(model_dir), "--device", args.device]

    auto = load_model(parse_settings([*flags, "--dtype", "auto"], environ={}))
    print(f"{model_dir.name}: {auto.describe()} — dtype auto: {auto.dtype_reason}; reuse cap {auto.describe_cache()}")
    print(f"{args.new_tokens} new tokens per reply, greedy; TTFT = request to first streamed text")
    handles = {"auto": auto}
    if not cuda and auto.dtype != torch.float32:
        import psutil

        fp32_bytes = sum(p.numel() for p in auto.model.parameters()) * 4
        if fp32_bytes < 0.8 * psutil.virtual_memory().available:
            handles["float32"] = load_model(parse_settings([*flags, "--dtype", "float32"], environ={}))
        else:
            print(f"float32 skipped: its {fp32_bytes / 1e9:.0f} GB of weights do not fit beside the bf16 model")
    # Warm-up: first calls pay one-off costs (allocations, thread pools, the tokenizer's caches).
    for handle in handles.values():
        engine_turn(replace(handle, reuse=ReuseCache(0)), [], {"text": "Hi.", "files": [images["a"]]},
                    GenerationParams(max_new_tokens=2))

    # [1] Reuse across turns: exactness in float32 (one round, CPU), timing in the default dtype: the median
    # of --rounds fresh conversations (fresh images each), since this machine's speed drifts by a third.
    results = {}
    if "float32" in handles:
        results["float32"] = [compare(handles["float32"], images, params)]
    results["auto"] = [compare(auto, round_images(folder, n + 1), params) for n in range(args.rounds)]
    for name, rounds in results.items():
        handle = handles[name]
        dtype = str(handle.dtype).removeprefix("torch.")
        what = "exactness" if name == "float32" else f"--dtype auto, median of {len(rounds)} conversations"
        print_turns(f"[1] Reuse across turns, {dtype} ({what}):", rounds, exact_dtype=handle.dtype == torch.float32)
        used, cap = max(r[2].reuse.nbytes for r in rounds), handle.reuse.capacity_bytes
        print(f"  cache after a conversation: {used / 2**20:,.0f} MB of a {cap / 2**20:,.0f} MB cap "
              f"({'within' if used <= cap else 'OVER'} the cap)")
    ratio = {n: statistics.median(r[1][n]["ttft"] / r[0][n]["ttft"] for r in results["auto"]) for n in range(5)}
    print(f"  bars (--dtype auto medians): text-only turn 3 {ratio[2]:.3f}× (≤ 0.10×); new-image turn 3 "
          f"{ratio[3]:.3f}× (≤ 0.40×; {ratio[4]:.3f}× when it was encoded on attach)")
    exact_name = "float32" if "float32" in results else "auto"
    off, on, _ = results[exact_name][0]
    images = images if exact_name == "float32" else round_images(folder, 1)  # that round's images, redrawn

    # [2] The same conversation through /chat, history resent each turn, against the engine without reuse.
    handle = handles[exact_name]
    served = replace(handle, reuse=ReuseCache(handle.reuse.capacity_bytes))
    settings = parse_settings([*flags, "--dtype", "auto" if exact_name == "auto" else "float32",
                               "--queue-size", "8"], environ={})
    demo, client = launch(settings, served)
    print(f"\n[2] The conversation through /chat (gradio_client, history resent), {exact_name}, reuse on:")
    replies: list[str] = []
    for (label, before, message), reference, reused in zip(conversation(images)[:4], off[:4], on[:4], strict=True):
        history = [m for i in before for m in exchange(conversation(images)[i][2], replies[i])]  # no attach via API
        reply, ttft, _ = api_turn(client, history, message, params)
        replies.append(reply)
        # In bf16 reuse changes the rounding (a prefill in two pieces), so there the /chat reply is also
        # compared with the engine's own reply with reuse, which it must equal exactly.
        same = "yes" if reply == reference["reply"] else "NO" + ("" if exact_name == "float32" else " (bf16 rounding)")
        with_reuse = "" if exact_name == "float32" else f"; with reuse: {'yes' if reply == reused['reply'] else 'NO'}"
        print(f"  {label:<17} TTFT {ttft:6.2f}s (engine without reuse {reference['ttft']:6.2f}s)  "
              f"reply equal to the engine's without reuse: {same}{with_reuse}")
    demo.close()

    if "float32" in handles:
        t_auto, t_fp32 = dtype_ratio(auto, handles["float32"], folder, args.runs)
        print(f"\n[3] A fresh one-image turn 1 (no reuse), median of {args.runs} alternating: --dtype auto "
              f"({str(auto.dtype).removeprefix('torch.')}) {t_auto:.2f}s ÷ float32 {t_fp32:.2f}s = {t_auto / t_fp32:.2f}× "
              "(≤ 0.40×)")
        del handles["float32"], results["float32"], handle, served

    # [4] /chat against plain transformers on the same inputs; a fresh image per run, so nothing is reused.
    settings = parse_settings([*flags, "--dtype", "auto", "--queue-size", "8"], environ={})
    demo, client = launch(settings, auto)
    api_turn(client, [], {"text": "Hi.", "files": []}, GenerationParams(max_new_tokens=2))  # the server's first call
    rows, runs = {"direct": [], "/chat": []}, max(args.runs, 5)  # short calls, so more of them: single ones vary ±10%
    for run in range(runs):
        message = {"text": "What is in this picture?", "files": [draw(folder, f"fresh{run}", (60 + 50 * run, 90, 150))]}
        calls = {"direct": lambda m=message: direct_turn(auto, m, params),
                 "/chat": lambda m=message: api_turn(client, [], m, params)[1:]}  # direct leaves the app's cache empty
        for name in (("direct", "/chat") if run % 2 == 0 else ("/chat", "direct")):  # alternate against drift
            rows[name].append(calls[name]())
    demo.close()
    med = {k: (statistics.median(r[0] for r in v), statistics.median(r[1] for r in v)) for k, v in rows.items()}
    print(f"\n[4] /chat against a direct model.generate (one new image, median of {runs}, order alternating):")
    for name, (ttft, tps) in med.items():
        print(f"  {name:<8} TTFT {ttft:6.2f}s   decode {tps:6.2f} tokens/s")
    print(f"  ratio /chat ÷ direct: TTFT {med['/chat'][0] / med['direct'][0]:.2f}× (≤ 1.05×), "
          f"tokens/s {med['/chat'][1] / med['direct'][1]:.2f}× (≥ 0.95×)")

    # [5] Decode speed against its bound, and the per-step cache concatenation at long context.
    bandwidth, weights = bandwidth_gbs(auto.device), decode_bytes(auto.model)
    on = results["auto"][0][1]
    print(f"\n[5] Decode ({auto.dtype}): {weights / 1e9:.2f} GB of weights read per token, memory bandwidth "
          f"{bandwidth:.1f} GB/s → bound {bandwidth / (weights / 1e9):.2f} tokens/s")
    print(f"  measured: {on[0]['tps']:.2f} tokens/s at {on[0]['prompt']:,} tokens of context, "
          f"{on[2]['tps']:.2f} at {on[2]['prompt']:,} ({on[0]['tps'] / (bandwidth / (weights / 1e9)):.0%} of the bound)")
    tokens, dynamic, static = long_context_decode(auto, folder, images=5, new_tokens=max(48, args.new_tokens))
    print(f"  at {tokens:,} tokens of context: transformers' DynamicCache {dynamic:.2f} tokens/s, the engine's "
          f"static cache {static:.2f} tokens/s ({static / dynamic:.2f}×)")


if __name__ == "__main__":
    main()
