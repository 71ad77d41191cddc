"""What holding replies to a JSON schema costs a decode step: 4 rows, real architecture (random weights).

    python bench/bench_grammar.py                        # 1.3B architecture, this CPU
    python bench/bench_grammar.py --device cuda --arch 7b

Measured in one run, on the random-weight checkpoint of scripts/build_bench_checkpoints.py:
1. a decode step of 4 free replies decoded together (the engine's own step time: decode time ÷ tokens);
2. the grammar's work for that step — each of the 4 rows' masks filled by xgrammar and applied to the step's
   logits (`grammar.mask_rows`) — timed from the state a real reply is in (inside a JSON string, and between
   properties), as a share of the step;
3. a real run of 4 replies held to the schema, the grammar's work timed where it happens (masks, and each row's
   accepted token), per step, as a share of the free step of 1.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

import torch  # noqa: E402

from dsvl_app import conversation as conv  # noqa: E402
from dsvl_app import grammar  # noqa: E402
from dsvl_app.engine import Engine, GenerationParams  # noqa: E402
from dsvl_app.grammar import json_schema, mask_rows  # noqa: E402
from dsvl_app.model import load_model  # noqa: E402
from dsvl_app.settings import parse_settings  # noqa: E402

SCHEMA = {"type": "object", "properties": {
    "title": {"type": "string"}, "total": {"type": "number"},
    "items": {"type": "array", "items": {"type": "object", "properties": {
        "name": {"type": "string"}, "price": {"type": "number"}}, "required": ["name", "price"]}}},
    "required": ["title", "total", "items"]}
STATES = ['{"title": "Receipt from the corner sho', '{"title": "A", "total": 12.5, "items": [{"name": "milk", ']


def run(engine: Engine, rows: int, tokens: int, params: GenerationParams) -> tuple[float, float]:
    """(seconds per decode step, aggregate tokens/s) for `rows` text prompts decoded together."""
    turns = [[conv.Turn("user", (f"Read receipt number {i} into JSON, every item with its price.",))]
             for i in range(rows)]
    began = time.perf_counter()
    replies = [engine.submit(t, params) for t in turns]
    for reply in replies:
        "".join(reply)
    elapsed = time.perf_counter() - began
    steps = [r.stats.decode_s / max(1, r.stats.new_tokens - 1) for r in replies]
    return statistics.median(steps), sum(r.stats.new_tokens for r in replies) / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", choices=["1.3b", "7b"], default=None, help="default: 1.3b on CPU, 7b on CUDA")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--rows", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=48)
    args = parser.parse_args()
    cuda = args.device.startswith("cuda")
    arch = args.arch or ("7b" if cuda else "1.3b")
    import build_bench_checkpoints as builder

    model_dir = builder.default_out(arch)
    if not (model_dir / "config.json").exists():
        print(f"writing the random-weight {arch} checkpoint to {model_dir} …", flush=True)
        builder.build(arch, model_dir)
    settings = parse_settings(["--model", str(model_dir), "--device", args.device, "--token-timeout", "3600"],
                              environ={})
    handle = load_model(settings)
    engine = Engine(handle, settings, batch=args.rows)
    cpu = "" if cuda else f", {torch.get_num_threads()} threads"
    print(f"{model_dir.name}: {handle.describe()} — {handle.dtype_reason}{cpu}; vocabulary {engine.vocab_size}")
    answer = json_schema(SCHEMA, "receipt")
    free = GenerationParams(max_new_tokens=args.tokens)
    held = GenerationParams(max_new_tokens=args.tokens, answer=answer)
    run(engine, args.rows, 4, free)  # warm-up (one-off allocations, thread pools)
    began = time.perf_counter()
    engine.grammars().compile(answer)
    print(f"schema compiled in {(time.perf_counter() - began) * 1000:.0f} ms (then cached)")

    step_s, free_tps = run(engine, args.rows, args.tokens, free)
    print(f"\n1. decode step, {args.rows} free rows together: {step_s * 1000:.1f} ms")

    print(f"2. the grammar's work per step for {args.rows} rows (fill {args.rows} masks + apply), from a reply's states:")
    logits = torch.randn(args.rows, engine.vocab_size, device=handle.device)
    for state in STATES:
        matchers = []
        for _ in range(args.rows):
            matcher = engine.grammars().matcher(answer)
            assert matcher.accept_string(state), state
            matchers.append(matcher)
        times = []
        for _ in range(50):
            scores = logits.clone()
            if cuda:
                torch.cuda.synchronize()
            began = time.perf_counter()
            mask_rows(matchers, scores)
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - began)
        cost = statistics.median(times)
        print(f"   after {state!r}: {cost * 1000:.2f} ms = {cost / step_s:.1%} of the step")

    # 3. A real held run, its grammar work timed where it happens: the masks (grammar.mask_rows, once a step) and
    # each row's accept_token (through a timing proxy around each request's matcher).
    spent = {"mask": 0.0, "accept": 0.0, "steps": 0}
    real_mask, real_matcher = grammar.mask_rows, engine.grammars().matcher

    def timed_mask(matchers, logits):
        began = time.perf_counter()
        real_mask([getattr(m, "inner", m) for m in matchers], logits)
        spent["mask"] += time.perf_counter() - began
        spent["steps"] += 1

    class Timed:
        def __init__(self, inner):
            self.inner = inner

        def accept_token(self, token):
            began = time.perf_counter()
            ok = self.inner.accept_token(token)
            spent["accept"] += time.perf_counter() - began
            return ok

        def is_terminated(self):
            return self.inner.is_terminated()

    grammar.mask_rows = timed_mask
    engine.grammars().matcher = lambda answer: Timed(real_matcher(answer))
    held_step, held_tps = run(engine, args.rows, args.tokens, held)
    per_step = (spent["mask"] + spent["accept"]) / max(1, spent["steps"])
    print(f"\n3. {args.rows} replies held to the schema, decoded together: {spent['steps']} steps; the grammar's work "
          f"{per_step * 1000:.2f} ms a step (masks {spent['mask'] * 1000 / max(1, spent['steps']):.2f} ms, "
          f"accepting tokens {spent['accept'] * 1000 / max(1, spent['steps']):.2f} ms) = {per_step / step_s:.1%} of "
          f"a free step ({step_s * 1000:.1f} ms)  (bar ≤ 10 %)")
    print(f"   end to end, for reference: free {free_tps:.2f} tokens/s, held {held_tps:.2f} tokens/s (held replies end "
          "when their JSON is complete, so their prompts' reading weighs on fewer tokens: not a like-for-like ratio)")


if __name__ == "__main__":
    main()
