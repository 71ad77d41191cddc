"""Reuse work across chat turns: a KV prefix cache and an image-feature cache under one byte cap.

Every turn's prompt repeats the whole conversation, so most of it was already computed by the turn
before: the keys/values of its common prefix and the features of its images. This module keeps both,
process-wide, shared by every session (an entry is found by content, never by session):

- a **prefix entry** is the keys/values of a token sequence (a prompt plus the reply generated after
  it). It matches a new prompt by the longest common prefix of token ids *and* of image content
  hashes — every image is 576 copies of one placeholder id, so ids alone cannot tell two images apart;
- an **image feature** is the aligner output of one image, found by the hash of the processor's pixel
  tensors, so an image is not re-encoded even when no prefix entry holds it any more.

Two traps of a cache with images give silently wrong answers; they are handled here:
`reusable_length` never covers the whole prompt (at least its last token is fed again: its logits pick
the first new token) and never splits an image's placeholder run, and `plan` gives features only for
the images in the uncached suffix (the engine scatters them into exactly those placeholders).

Memory: entries live on the model's device; their bytes never exceed the cap less what the engine
`reserve`s for the replies being written (least-recently-used entries go first), entries idle longer
than `idle_s` are dropped, and `clear()` empties everything (on out of memory). A reply *takes* its
entry out (no two replies share one) and its prefill copies the matching part into the reply's own row of
keys/values (`slots.SlotPool`); a reply that ends puts a longer entry back, and one cancelled or failed before its reply
began gives the entry it took back (`give_back`). No
gradio, no model loading: the model is passed in.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

log = logging.getLogger(__name__)

PIXEL_KEYS = ("pixel_values", "high_res_pixel_values")
KV = tuple[tuple[torch.Tensor, torch.Tensor], ...]  # per decoder layer: (keys, values), [1, heads, tokens, dim]


# ---------------------------------------------------------------- keys: ids and image hashes (pure)


@dataclass(frozen=True)
class ImageSpan:
    """Where one image's placeholder run lies in a token sequence, and what image it is."""

    start: int
    end: int  # exclusive
    key: str  # content hash of the processor's tensors for this image


def image_keys(inputs: Mapping[str, Any]) -> list[str]:
    """One content hash per image, from every pixel tensor the processor made for it (low- and high-res)."""
    tensors = [inputs[k] for k in PIXEL_KEYS if inputs.get(k) is not None]
    if not tensors:
        return []
    keys = []
    for i in range(tensors[0].shape[0]):
        digest = hashlib.sha256()  # hardware-accelerated on current CPUs: ~10 ms for a 1024-pixel view
        for tensor in tensors:
            image = tensor[i].detach().to("cpu").contiguous()
            digest.update(str((tuple(image.shape), image.dtype)).encode())
            digest.update(image.view(torch.uint8).numpy().data)
        keys.append(digest.hexdigest()[:32])
    return keys


def image_spans(ids: torch.Tensor, image_token_id: int, tokens_per_image: int, keys: Sequence[str]) -> tuple[ImageSpan, ...]:
    """The placeholder run of each image in `ids` (1-D), in order; refuses ids that do not hold them exactly."""
    positions = (ids == image_token_id).nonzero().flatten().tolist()
    if len(positions) != tokens_per_image * len(keys):
        raise ValueError(f"{len(positions)} image placeholders for {len(keys)} image(s) of {tokens_per_image} tokens")
    spans = []
    for n, key in enumerate(keys):
        start, last = positions[n * tokens_per_image], positions[(n + 1) * tokens_per_image - 1]
        if last - start + 1 != tokens_per_image:
            raise ValueError("an image's placeholder tokens are not one contiguous run")
        spans.append(ImageSpan(start, last + 1, key))
    return tuple(spans)


PREFIX_BLOCK = 16  # tokens per prefix hash (a conversation's next turn matches its earlier turns' blocks)


def prefix_hashes(ids: torch.Tensor, spans: Sequence[ImageSpan], block: int = PREFIX_BLOCK) -> list[str]:
    """A chain of hashes of `ids` (1-D) block by block — each covers the whole prefix up to its block's end,
    images by their content key (their placeholder ids are all alike). Two prompts share the first k hashes
    exactly when they share those k blocks, which is what lets a router send a conversation's next turn to
    the replica whose reuse cache holds its earlier ones. A last partial block is left out."""
    values = ids.detach().to("cpu", torch.int64)
    hashes, digest = [], hashlib.blake2b(digest_size=12)
    for end in range(block, int(values.shape[0]) + 1, block):
        digest.update(values[end - block:end].numpy().tobytes())
        for span in spans:
            if end - block <= span.start < end:
                digest.update(span.key.encode())
        hashes.append(digest.copy().hexdigest())
    return hashes


def common_prefix(a: torch.Tensor, b: torch.Tensor) -> int:
    """Length of the longest common prefix of two 1-D id tensors."""
    n = min(a.shape[0], b.shape[0])
    differ = (a[:n] != b[:n]).nonzero()
    return int(differ[0]) if differ.numel() else n


def reusable_length(cached_ids: torch.Tensor, cached_spans: Sequence[ImageSpan], ids: torch.Tensor,
                    spans: Sequence[ImageSpan]) -> int:
    """How many leading tokens of `ids` an entry holding `cached_ids` can supply.

    The longest common prefix of the ids, cut back to the start of the first image that is a different
    image or would be split, and at most `len(ids) - 1`: generate needs the last prompt token's logits,
    and a cache covering the whole prompt makes it feed the whole prompt again on top (silently wrong).
    """
    n = common_prefix(cached_ids, ids)
    cached = {span.start: span for span in cached_spans}
    for span in spans:
        if span.start >= n:
            break
        old = cached.get(span.start)
        if old is None or old.key != span.key or old.end != span.end or span.end > n:
            n = span.start
            break
    return max(0, min(n, int(ids.shape[0]) - 1))


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.untyped_storage().nbytes()  # a view still holds its whole storage


def kv_nbytes(kv: KV) -> int:
    return sum(_nbytes(k) + _nbytes(v) for k, v in kv)


# ---------------------------------------------------------------- the store


@dataclass
class _Prefix:
    ids: torch.Tensor  # 1-D, CPU
    spans: tuple[ImageSpan, ...]
    kv: KV
    nbytes: int
    last_used: float


@dataclass
class _Features:
    features: torch.Tensor  # [tokens_per_image, hidden] on the model's device
    nbytes: int
    last_used: float


@dataclass(frozen=True)
class Taken:
    """What `take_prefix` found: keys/values of which the first `length` tokens match (None: nothing), and the
    entry itself when it was taken out of the store (`give_back` puts it back if the request never finishes)."""

    kv: KV | None
    length: int
    entry: _Prefix | None = None

    @property
    def nbytes(self) -> int:
        """Bytes held outside the store while this is taken."""
        return self.entry.nbytes if self.entry is not None else 0


@dataclass
class CacheStats:
    prefix_entries: int = 0
    feature_entries: int = 0
    nbytes: int = 0
    capacity_bytes: int = 0
    evicted: int = 0
    expired: int = 0
    dropped_too_big: int = 0


class ReuseCache:
    """Prefix entries and image features under one byte cap, LRU across all conversations, thread-safe.

    `capacity_bytes == 0` turns reuse off: nothing is stored and nothing is found.
    """

    def __init__(self, capacity_bytes: int, idle_s: float = 1800.0, clock: Callable[[], float] = time.monotonic):
        self.capacity_bytes = max(0, int(capacity_bytes))
        self.idle_s = float(idle_s)
        self._clock = clock
        self._lock = threading.Lock()
        self._items: OrderedDict[tuple[str, int | str], _Prefix | _Features] = OrderedDict()  # oldest first
        self._next_id = 0
        self._nbytes = 0
        self.reserved = 0  # bytes of the cap held for the keys/values of replies being written (see reserve)
        self._stats = CacheStats(capacity_bytes=self.capacity_bytes)
        self._janitor: threading.Thread | None = None

    @property
    def enabled(self) -> bool:
        return self.capacity_bytes > 0

    @property
    def nbytes(self) -> int:
        with self._lock:
            return self._nbytes

    def stats(self) -> CacheStats:
        with self._lock:
            kinds = [key[0] for key in self._items]
            return CacheStats(kinds.count("kv"), kinds.count("img"), self._nbytes, self.capacity_bytes,
                              self._stats.evicted, self._stats.expired, self._stats.dropped_too_big)

    # -- internals (lock held)

    def _remove(self, key: tuple) -> None:
        item = self._items.pop(key)
        self._nbytes -= item.nbytes

    def _expire(self, now: float) -> None:
        if self.idle_s <= 0:
            return  # no idle expiry
        for key in [k for k, item in self._items.items() if now - item.last_used > self.idle_s]:
            self._remove(key)
            self._stats.expired += 1

    def _evict_to(self, limit: int) -> None:
        while self._items and self._nbytes > limit:
            self._remove(next(iter(self._items)))
            self._stats.evicted += 1

    def _admit(self, key: tuple, item: _Prefix | _Features) -> bool:
        """Insert as most recent, evicting the least recently used until the cap (less what is reserved) holds."""
        limit = self.capacity_bytes - self.reserved
        if item.nbytes > limit:
            self._stats.dropped_too_big += 1
            return False
        self._evict_to(limit - item.nbytes)
        self._items[key] = item
        self._nbytes += item.nbytes
        self._start_janitor()
        return True

    def _start_janitor(self) -> None:
        """A daemon thread that drops idle entries even when no request comes (the memory goes back)."""
        if self._janitor is not None or self.idle_s <= 0:
            return
        ref = weakref.ref(self)
        period = min(60.0, max(0.05, self.idle_s / 4))

        def sweep() -> None:
            while (cache := ref()) is not None:
                with cache._lock:
                    cache._expire(cache._clock())
                del cache
                time.sleep(period)

        self._janitor = threading.Thread(target=sweep, name="dsvl-reuse-janitor", daemon=True)
        self._janitor.start()

    # -- prefix entries

    def take_prefix(self, ids: torch.Tensor, spans: Sequence[ImageSpan]) -> Taken:
        """The entry that covers most of `ids`, taken out of the store while a generate call uses it.

        When the match is under half of the entry (another conversation sharing only the system preamble,
        say), the entry stays for its own conversation. Either way the caller copies the matching part
        into its own row of keys/values, so a stored entry is never written to.
        """
        if not self.enabled:
            return Taken(None, 0)
        with self._lock:
            self._expire(self._clock())
            best_key, best_len = None, 0
            for key, item in self._items.items():
                if key[0] == "kv":
                    length = reusable_length(item.ids, item.spans, ids, spans)
                    if length > best_len:
                        best_key, best_len = key, length
            if best_key is None:
                return Taken(None, 0)
            entry = self._items[best_key]
            if 2 * best_len >= entry.ids.shape[0]:
                self._remove(best_key)
                return Taken(entry.kv, best_len, entry)
            entry.last_used = self._clock()
            self._items.move_to_end(best_key)
            return Taken(entry.kv, best_len)

    def put_prefix(self, ids: torch.Tensor, spans: Sequence[ImageSpan], kv: KV) -> bool:
        """Store the keys/values of `ids` (entries it extends are dropped: it holds all they held)."""
        if not self.enabled or ids.numel() == 0:
            return False
        ids = ids.detach().to("cpu")
        with self._lock:
            now = self._clock()
            self._expire(now)
            for key in [k for k, item in self._items.items() if k[0] == "kv" and item.ids.shape[0] <= ids.shape[0]]:
                item = self._items[key]
                if common_prefix(item.ids, ids) == item.ids.shape[0] and item.spans == tuple(spans[: len(item.spans)]):
                    self._remove(key)
            self._next_id += 1
            return self._admit(("kv", self._next_id), _Prefix(ids, tuple(spans), kv, kv_nbytes(kv), now))

    def give_back(self, taken: Taken) -> bool:
        """Put back an entry `take_prefix` took out, for a request that was cancelled or failed before its reply
        could store a longer one: its conversation's next turn then still finds it."""
        entry = taken.entry
        if entry is None or not self.enabled:
            return False
        with self._lock:
            entry.last_used = self._clock()
            self._next_id += 1
            return self._admit(("kv", self._next_id), entry)

    # -- image features

    def get_features(self, key: str) -> torch.Tensor | None:
        if not self.enabled:
            return None
        with self._lock:
            now = self._clock()
            self._expire(now)
            item = self._items.get(("img", key))
            if item is None:
                return None
            item.last_used = now
            self._items.move_to_end(("img", key))
            return item.features

    def put_features(self, key: str, features: torch.Tensor) -> bool:
        if not self.enabled:
            return False
        with self._lock:
            now = self._clock()
            self._expire(now)
            if ("img", key) in self._items:
                self._remove(("img", key))
            return self._admit(("img", key), _Features(features, _nbytes(features), now))

    def reserve(self, nbytes: int) -> None:
        """Hold `nbytes` of the cap for the keys/values of replies being written: they come first, so entries
        go, least recently used first, until the rest fits in what is left (0 gives the whole cap back)."""
        with self._lock:
            self.reserved = max(0, int(nbytes))
            self._evict_to(self.capacity_bytes - self.reserved)

    def clear(self) -> None:
        """Drop everything (after out of memory, so the memory can be given back)."""
        with self._lock:
            self._items.clear()
            self._nbytes = 0


# ---------------------------------------------------------------- planning a generate call


def encode_images(model: Any, pixels: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Image features ([n, tokens, hidden]) of a batch of processor pixel tensors, as generate computes them."""
    encoder = model.base_model.get_image_features
    return encoder(**{k: v for k, v in pixels.items() if k in PIXEL_KEYS}, return_dict=True).pooler_output


@dataclass
class Plan:
    """What a reply's prefill starts from: the reused prefix (`reused_tokens` of the prompt, whose keys/values the
    `Taken` entry holds) and the features of the images after it (cached or encoded now)."""

    ids: torch.Tensor  # 1-D, CPU
    spans: tuple[ImageSpan, ...]
    reused_tokens: int
    images: int
    images_encoded: int
    features: torch.Tensor | None  # [images after the prefix, tokens per image, hidden]; None when there are none

    @property
    def images_reused(self) -> int:
        return self.images - self.images_encoded


def plan(model: Any, store: ReuseCache, inputs: Mapping[str, Any], spans: Sequence[ImageSpan], taken: Taken) -> Plan:
    """Start a prefill from what `store` holds: the reusable prefix `taken` (see `take_prefix`), and features
    (cached, or encoded now and cached) for the images after that prefix only. With the store off, nothing is
    found and every image is encoded.

    `inputs` are on the model's device; `spans` carry `image_keys` of the processor's own (CPU) output.
    """
    ids = inputs["input_ids"][0].detach().to("cpu")
    suffix = [i for i, span in enumerate(spans) if span.start >= taken.length]
    features = {i: store.get_features(spans[i].key) for i in suffix}
    missing = [i for i in suffix if features[i] is None]
    if missing:
        index = torch.tensor(missing)
        pixels = {k: inputs[k][index] for k in PIXEL_KEYS if inputs.get(k) is not None}
        encoded = encode_images(model, pixels)
        for n, i in enumerate(missing):
            features[i] = encoded[n] if len(missing) == 1 else encoded[n].clone()  # own storage: evictable alone
            store.put_features(spans[i].key, features[i])
    stacked = torch.stack([features[i] for i in suffix]) if suffix else None
    return Plan(ids, tuple(spans), taken.length, len(spans), len(missing), stacked)
