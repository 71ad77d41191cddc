"""The engine's keys/values memory: one budget, the only source of truth about it.

`--cache-mb` bytes hold the keys/values of the replies being written — the pool of rows (a newcomer's
prompt is read straight into a row of its own), a newcomer's image features and the reuse prefix it took,
a finished reply's copy on its way to the reuse cache — and, in the rest, the reuse cache's entries. Every such allocation is *reserved here
first*, under a name (`hold`): the reuse cache gives way at once (least recently used entries first), so
that what is reserved plus what is cached never exceeds the budget, and what cannot be reserved is not
allocated — a newcomer that does not fit waits in line. The one exception: a request alone is always
served, even one larger than the whole budget (nothing else runs then, and the reuse cache is emptied).

`peak` is the largest accounted total (reserved + cached) seen; tests hold it to the budget. Used by the
scheduler's thread only. No torch, no model.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from typing import Any


class Budget:
    """Reservations by owner against `total` bytes, with the reuse cache `store` giving way (see the module)."""

    def __init__(self, total: int, store: Any):
        self.total = int(total)
        self.store = store  # reuse.ReuseCache (anything with reserve(nbytes), nbytes and capacity_bytes)
        self._held: dict[Hashable, int] = {}
        self.peak = 0

    @property
    def reserved(self) -> int:
        return sum(self._held.values())

    def held(self, owner: Hashable) -> int:
        return self._held.get(owner, 0)

    def room(self, replacing: tuple[Hashable, ...] = ()) -> int:
        """Bytes that could still be reserved (the reuse cache would give way), counting what `replacing`
        owners hold as free."""
        return self.total - self.reserved + sum(self.held(owner) for owner in replacing)

    def fits(self, nbytes: int, replacing: tuple[Hashable, ...] = ()) -> bool:
        return nbytes <= self.room(replacing)

    def hold(self, changes: Mapping[Hashable, int]) -> None:
        """Set what each owner holds (0 releases it), all at once, then let the reuse cache give way. Call it
        *before* allocating what grows, *after* freeing what shrinks."""
        for owner, nbytes in changes.items():
            if nbytes > 0:
                self._held[owner] = int(nbytes)
            else:
                self._held.pop(owner, None)
        # A reuse cache capped above the budget (set apart by hand) still keeps within it.
        self.store.reserve(self.reserved + max(0, self.store.capacity_bytes - self.total))
        self.note()

    def release(self, *owners: Hashable) -> None:
        self.hold(dict.fromkeys(owners, 0))

    def try_hold(self, owner: Hashable, nbytes: int) -> bool:
        """Reserve `nbytes` for `owner` when they fit beside everything reserved; False (nothing held) if not."""
        if not self.fits(nbytes, (owner,)):
            return False
        self.hold({owner: nbytes})
        return True

    def note(self) -> None:
        """Record the accounted total (after the reuse cache stored something)."""
        self.peak = max(self.peak, self.accounted)

    @property
    def accounted(self) -> int:
        return self.reserved + self.store.nbytes

    def reset(self) -> None:
        """Nothing held any more (after a failure freed everything)."""
        self._held.clear()
        self.store.reserve(0)
