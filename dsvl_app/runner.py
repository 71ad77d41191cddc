"""The model runner: the only code of the engine room coupled to transformers' model.

It embeds a prompt (image features scattered into their placeholders), reads it into the request's own
row of the pool (prefill), runs one decode forward over some rows of the shared pool (`slots.SlotPool`) with each
row at its own position, picks every row's next token together (`sampling.sample_rows`), and reads
those tokens back with **one** device→host transfer per step. It also owns the layer hooks through which
the scheduler hears of every layer (its heartbeat, its chance to yield or to stop a cancelled prefill),
step timing that is right on an asynchronous device, and giving memory back.

Attention: a decode forward passes a 4D mask, which transformers uses as given; its form follows
`config._attn_implementation` — booleans for sdpa (True = attend), an additive float mask for eager
(0 / the dtype's minimum, as transformers builds it). flash_attention_2 cannot take a per-row 4D mask:
the runner refuses it at start.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from . import reuse
from .budget import Budget
from .request import Request
from .sampling import on_device, sample_rows
from .slots import ALIGN, SlotPool

log = logging.getLogger(__name__)

ATTENTION = ("sdpa", "eager")  # the implementations whose per-row decode mask the runner builds


class UnsupportedAttention(ValueError):
    """The model's attention implementation cannot decode rows at their own positions."""


def check_attention(model: Any) -> str:
    """The model's attention implementation, or UnsupportedAttention with what to do instead."""
    impl = str(getattr(model.config, "_attn_implementation", None) or "eager")
    if impl not in ATTENTION:
        raise UnsupportedAttention(
            f"The engine decodes every reply at its own position with a per-row 4D attention mask, which "
            f"{impl!r} cannot take; start with --attn sdpa (the default) or --attn eager.")
    return impl


def model_inputs(model: Any, inputs: Any) -> dict[str, Any]:
    """Processor outputs on the model's device, floating tensors in its dtype."""
    moved = {}
    for key, value in inputs.items():
        if isinstance(value, torch.Tensor):
            value = value.to(model.device)
            if value.is_floating_point():
                value = value.to(model.dtype)
        moved[key] = value
    return moved


def release_memory(device: torch.device) -> None:
    """Free what a failed step held, so the next one can run."""
    gc.collect()
    if device.type == "cuda" and torch.cuda.is_available():
        torch.cuda.empty_cache()


def _malloc_trim() -> Callable[[], None] | None:
    name = ctypes.util.find_library("c")
    try:
        trim = ctypes.CDLL(name or "libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to do
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return lambda: trim(0)


_TRIM = _malloc_trim()


def return_freed_memory() -> None:
    """Give the operating system back the heap memory freed since the last call (a no-op where the C library is
    not glibc); ~20 ms, without the GIL."""
    if _TRIM is not None:
        _TRIM()


class HeapTrimmer:
    """Returns freed heap memory to the system from a thread of its own, at most every `period_s`, after a request
    ended (`poke`).

    Image requests allocate and free hundreds of MB (pixel tensors, image-encoder activations, prompt embeddings)
    from several threads; glibc keeps freed chunks in its per-thread arenas, so a server answering image questions
    stayed near its peak and wandered upward although nothing was alive (bench/soak_memory.py). Trimming off the
    engine's thread keeps that cost away from the replies. The thread ends after `idle_exit_s` without a poke."""

    def __init__(self, period_s: float = 0.5, idle_exit_s: float = 10.0):
        self.period_s, self.idle_exit_s = period_s, idle_exit_s
        self.trims = 0
        self._due = threading.Event()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def poke(self) -> None:
        self._due.set()
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="dsvl-heap-trim", daemon=True)
                self._thread.start()

    def _run(self) -> None:
        while True:
            if not self._due.wait(self.idle_exit_s):
                with self._lock:
                    if not self._due.is_set():
                        self._thread = None
                        return
            self._due.clear()
            return_freed_memory()
            self.trims += 1
            time.sleep(self.period_s)


def embed_prompt(model: Any, ids: torch.Tensor, features: torch.Tensor | None) -> torch.Tensor:
    """Token embeddings of `ids` ([1, n]) with image features scattered into their placeholders, as the
    model's own forward does it — once, so that the prompt can then be fed in chunks (the model's forward
    refuses a chunk that splits an image)."""
    embeds = model.get_input_embeddings()(ids)
    if features is not None:
        mask = (ids == model.config.image_token_id).unsqueeze(-1)
        embeds = embeds.masked_scatter(mask, features.reshape(-1, embeds.shape[-1]).to(embeds.device, embeds.dtype))
    return embeds


def layer_owners(model: Any) -> dict[int, Any]:
    """The schedulers running forwards on `model`, by thread. One pre-hook per decoder and vision layer is
    installed once per model and calls `_on_layer` of the scheduler of the thread running the forward (none:
    no-op), so engines that come and go never add or remove hooks while another thread may be in a forward."""
    owners = getattr(model, "_dsvl_layer_owners", None)
    if owners is None:
        owners = {}

        def before_layer(module: Any, args: Any) -> None:
            scheduler = owners.get(threading.get_ident())
            if scheduler is not None:
                scheduler._on_layer()

        for name, module in model.named_modules():
            if isinstance(module, torch.nn.ModuleList) and name.endswith("layers"):
                for layer in module:
                    layer.register_forward_pre_hook(before_layer)
        model._dsvl_layer_owners = owners
    return owners


class StepTimer:
    """How long the device spent on a step. On CUDA the host runs ahead of the device, and a decode step run
    inside a prefill finds that prefill's kernels queued before its own: CUDA events time the step's own work
    on the stream. Read `seconds` only after the step's tokens were read (the device has passed its end)."""

    def __init__(self, device: torch.device):
        self._events = device.type == "cuda"
        if self._events:
            self._start, self._end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            self._start.record()
        else:
            self._t0 = time.perf_counter()

    def stop(self) -> None:
        if self._events:
            self._end.record()
        else:
            self._t1 = time.perf_counter()

    @property
    def seconds(self) -> float:
        if self._events:
            return self._start.elapsed_time(self._end) / 1000
        return self._t1 - self._t0


class Runner:
    """The model's side of the scheduler (see the module docstring). Used by the scheduler's thread only."""

    def __init__(self, handle: Any):
        self.model = model = handle.model
        self.device = handle.device
        self.store: reuse.ReuseCache = handle.reuse
        self.attention = check_attention(model)
        kv_dtype = model.get_input_embeddings().weight.dtype
        layers = model.base_model.language_model.layers
        self.pool = SlotPool(model.config, handle.device, kv_dtype, [next(layer.parameters()).device for layer in layers])
        text = model.config.get_text_config()
        tokens_per_image = int(getattr(handle.processor, "num_image_tokens", 0) or 0)
        # Features of one image: the encoder's output, and its copy gathered for the prompt.
        self.feature_bytes_per_image = 2 * tokens_per_image * int(text.hidden_size) * kv_dtype.itemsize
        self.mask_dtype = model.dtype
        layer_owners(model)  # installs the layer hooks (once per model), before any thread runs forwards

    @property
    def align(self) -> int:
        return ALIGN

    # -- prefill

    def start_prefill(self, request: Request, budget: Budget, owner: Any) -> None:
        """Take the request's reuse prefix (its bytes move from the reuse cache to `owner`'s reservation), encode the
        images after it, set up its pool row (`request.row`: the prefix is copied in at its first forward), and embed
        the rest of the prompt."""
        inputs = model_inputs(self.model, request.inputs)
        request.taken = taken = self.store.take_prefix(request.ids[0], request.spans)
        budget.hold({owner: taken.nbytes})  # held from here: a cancel during the encode gives it back
        t0 = time.perf_counter()
        plan = reuse.plan(self.model, self.store, inputs, request.spans, taken)
        request.plan = plan
        budget.note()  # features the encode stored
        log.debug("admitted: %d prompt tokens, %d reused, %d image(s) encoded, %.3f s", request.prompt_tokens,
                  plan.reused_tokens, plan.images_encoded, time.perf_counter() - t0)
        request.inputs = None  # the pixels are encoded: ~15 MB an image, not kept while the reply runs
        request.cursor = plan.reused_tokens
        self.pool.begin_row(request.row, taken.kv, taken.length)
        request.embeds = embed_prompt(self.model, inputs["input_ids"][:, plan.reused_tokens:], plan.features)

    def prefill(self, request: Request, n: int) -> torch.Tensor:
        """Feed the request's next `n` prompt positions into its pool row; the last position's logits ([1, vocab]).
        It attends over its own capacity (prompt + max_new_tokens), as its own static cache would."""
        start = request.cursor
        offset = start - request.plan.reused_tokens
        embeds = request.embeds[:, offset: offset + n]  # type: ignore[index]
        positions = torch.arange(start, start + n, device=embeds.device).unsqueeze(0)
        cache = self.pool.prefill_view(request.row, start, request.capacity)
        out = self.model(inputs_embeds=embeds, position_ids=positions, past_key_values=cache, use_cache=True,
                         logits_to_keep=1)
        return out.logits[:, -1]

    # -- decode

    def decode(self, rows: Sequence[Request], start: int, view_len: int) -> torch.Tensor:
        """One token for each of `rows` (pool rows `[start, start + len(rows))`), attending over the first
        `view_len` positions; their logits ([n, vocab])."""
        device = self.pool.device
        positions = on_device([r.pos for r in rows], torch.long, device)
        ids = on_device([[r.last_token] for r in rows], torch.long, device)
        allowed = (torch.arange(view_len, device=device)[None, :] <= positions[:, None])[:, None, None, :]
        if self.attention == "eager":  # eager attention adds its mask to the scores
            mask = torch.zeros(allowed.shape, dtype=self.mask_dtype, device=device)
            mask = mask.masked_fill(~allowed, torch.finfo(self.mask_dtype).min)
        else:
            mask = allowed
        cache = self.pool.view(start, start + len(rows), positions, view_len)
        out = self.model(input_ids=ids, position_ids=positions[:, None], attention_mask=mask, past_key_values=cache,
                         use_cache=True, logits_to_keep=1)
        return out.logits[:, -1]

    # -- tokens

    @staticmethod
    def sample(rows: Sequence[Request], logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Each row's next token ([n], on the device) and the float32 logits it was chosen from."""
        return sample_rows([r.sampler for r in rows], [r.history_view() for r in rows], logits)

    @staticmethod
    def read(tokens: Sequence[torch.Tensor]) -> list[int]:
        """The chosen tokens as ints: the step's one device→host transfer."""
        if not tokens:
            return []
        return torch.stack(list(tokens)).tolist()

    def timer(self) -> StepTimer:
        return StepTimer(self.device)

    # -- memory

    def release_memory(self) -> None:
        release_memory(self.device)
