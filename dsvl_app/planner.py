"""What the scheduler does next, decided from plain numbers: no torch, no model, tested on its own.

- **Who is read next**: the first request in line, when a decode row is free and what it needs — its image
  features, and the pool grown to hold its row (its prompt is read straight into it) — fits in the budget
  beside everything reserved (`admission`). Alone, a request is always admitted.
- **How the pool grows** for a newcomer's row (`pool_target`): as it is when the row fits, else with rows taken ahead —
  for the requests already waiting, and, with memory nobody uses (earlier turns are never evicted for a guess), all
  `--batch` rows on a CPU (memory not yet written costs nothing there) or double on a GPU — so that most joins copy
  nothing.
- **Which prefill piece** (`prefill_piece`): the whole rest of the prompt when nobody else is decoding
  (exactly the computation of a reply alone), else `chunk` positions.
- **Which rows a decode forward takes** (`decode_groups`): all of them, or one at a time, as
  `DecodePolicy` decides; and **how far they look back** (`view_length`): the positions in use, rounded up
  to `VIEW_BUCKET` — not every row's whole capacity (at most the longest row's).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

DECODE_MODES = ("auto", "together", "rows")
# Decode forwards attend over the positions in use rounded up to this: on a CPU, a masked tail up to a multiple of
# the vector width changes no bit of the result (measured: fp32 and bf16, sdpa and eager — a reply alone is still
# bit for bit generate's, which attends over its whole cache), and a few distinct lengths suit a GPU's kernels.
VIEW_BUCKET = 64


def round_up(n: int, step: int) -> int:
    return -(-n // step) * step if n else 0


@dataclass(frozen=True)
class PoolGeometry:
    """The decode pool as it is: rows × length positions allocated, at `bytes_per_token` per position."""

    rows: int
    length: int
    bytes_per_token: int
    align: int  # lengths are allocated in multiples of this
    layers: int = 1

    @property
    def nbytes(self) -> int:
        return self.rows * self.length * self.bytes_per_token

    @property
    def resize_transient(self) -> int:
        """Extra bytes while the pool is resized: it is copied layer by layer, keys then values, so one old
        tensor lives beside the new pool at a time."""
        return self.nbytes // (2 * self.layers)

    def bytes_for(self, rows: int, length: int) -> int:
        return rows * round_up(length, self.align) * self.bytes_per_token


@dataclass(frozen=True)
class Need:
    """Bytes a newcomer needs reserved before any of it is allocated."""

    features: int  # its images' features (encoded, and gathered for the prompt)
    pool_growth: int  # what the pool grows by for its row (prompt + max_new_tokens), with the copy's transient

    @property
    def total(self) -> int:
        return self.features + self.pool_growth


def need(pool: PoolGeometry, running_capacities: Sequence[int], capacity: int, feature_bytes: int) -> Need:
    """What a request of `capacity` positions needs to be read into a row of its own beside the rows running now."""
    length = max([*running_capacities, capacity])
    grown = max(pool.nbytes, pool.bytes_for(len(running_capacities) + 1, length))
    growth = grown - pool.nbytes + (pool.resize_transient if grown > pool.nbytes else 0)
    return Need(feature_bytes, growth)


def admission(running: int, prefilling: bool, batch: int, needed: Need, room: int) -> bool:
    """Whether the first request in line starts now: nobody else is being read, a row is free, and what it needs
    fits in `room` (the budget less everything reserved) — or nothing runs at all (alone it always starts)."""
    if prefilling or running >= batch:
        return False
    return running == 0 or needed.total <= room


def pool_target(pool: PoolGeometry, rows: int, length: int, batch: int, room: int, spare: int | None = None,
                all_rows_at_once: bool = False, coming: int = 0) -> tuple[int, int]:
    """The pool's shape for `rows` rows of `length` positions: as it is when they fit, else grown.

    Growing copies every row kept, so rows are taken ahead: first for the `coming` requests already waiting in line
    (up to `batch`; the reuse cache gives way for them, within `room`: the budget's bytes beyond the pool); then,
    only with bytes nobody uses (`spare`: nothing is evicted for a guess), all `batch` rows at once with
    `all_rows_at_once` (on a CPU memory not yet written costs nothing) or double the rows; else exactly `rows`
    (admission checked that they fit)."""
    if rows <= pool.rows and length <= pool.length:
        return pool.rows, pool.length
    length = max(length, pool.length)
    spare = room if spare is None else min(spare, room)
    wanted = [(min(batch, rows + coming), room)]
    if all_rows_at_once:
        wanted.append((batch, spare))
    wanted.append((max(rows, min(batch, 2 * pool.rows)), spare))
    for grown, limit in sorted(wanted, reverse=True):
        if grown > rows and pool.bytes_for(grown, length) - pool.nbytes <= limit:
            return grown, length
    return rows, length


def prefill_piece(cursor: int, prompt_tokens: int, others_decoding: bool, chunk: int) -> int:
    """How many prompt positions the next prefill forward reads."""
    remaining = prompt_tokens - cursor
    return remaining if not others_decoding else min(remaining, chunk)


def view_length(positions: Sequence[int], capacities: Sequence[int], pool_length: int,
                bucket: int = VIEW_BUCKET) -> int:
    """Positions a decode forward over rows at `positions` attends over (each row writes at its position): the
    positions in use rounded up to `bucket`, never past the longest row's capacity (prompt + max_new_tokens) — so
    that a row alone attends over what it would in a cache of its own capacity, as generate's does (a longer
    masked tail than that changes the last bits of its attention)."""
    return min(pool_length, max(capacities), round_up(max(positions) + 1, bucket))


def decode_groups(rows: int, together: bool) -> list[tuple[int, int]]:
    """The pool rows each decode forward takes: all at once, or one by one."""
    return [(0, rows)] if together else [(i, i + 1) for i in range(rows)]


def newest(joined: Sequence[int]) -> int:
    """Index of the row that joined last (out of memory in a shared step ends it)."""
    return max(range(len(joined)), key=joined.__getitem__)


class DecodePolicy:
    """Decode n rows in one forward ("together") or one forward per row ("rows")?

    On a GPU a step for 8 rows costs about one row's (the weights are read once): "auto" means "together"
    there, and never probes. On some CPUs a small batched matrix product costs more than the rows one by one
    (measured 0.75-1.5× the aggregate speed of one row on a 2-core AVX2 machine). There "auto" measures both
    as it runs, keeps whichever is cheaper per token at each batch size, and probes the other again every
    `probe_every` steps (context grows). Either way every reply gets a token per step: the fairness is the same.
    """

    def __init__(self, mode: str = "auto", probe_every: int = 40, alpha: float = 0.3, device: str = "cpu"):
        if mode not in DECODE_MODES:
            raise ValueError(f"decode mode must be one of {', '.join(DECODE_MODES)}, got {mode!r}")
        self.mode, self.probe_every, self.alpha = mode, probe_every, alpha
        self.measuring = mode == "auto" and device != "cuda"
        self.single: float | None = None  # seconds of a one-row forward
        self.together: dict[int, float] = {}  # seconds of an n-row forward
        self._steps: dict[int, int] = {}

    def use_together(self, n: int) -> bool:
        if n == 1 or not self.measuring:
            return n == 1 or self.mode != "rows"
        batched = self.together.get(n)
        if batched is None:
            return True  # measure it
        if self.single is None:
            return False  # measure one row alone
        better = batched <= n * self.single
        self._steps[n] = self._steps.get(n, 0) + 1
        return not better if self._steps[n] % self.probe_every == 0 else better

    def record(self, n: int, together: bool, seconds: float) -> None:
        """A step of n rows took `seconds` (all its forwards and its sampling)."""
        def ema(old: float | None, new: float) -> float:
            return new if old is None else (1 - self.alpha) * old + self.alpha * new

        if n == 1 or not together:
            self.single = ema(self.single, seconds / n)
        else:
            self.together[n] = ema(self.together.get(n), seconds)

    def describe(self) -> str:
        if self.mode == "auto" and not self.measuring:
            return "auto (one forward for all rows on a GPU)"
        return {"auto": "auto (one forward for all rows, or one per row where that measures faster)",
                "together": "one forward for all rows", "rows": "one forward per row"}[self.mode]
