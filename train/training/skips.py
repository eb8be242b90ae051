"""Samples dropped instead of crashing a run: why (the reasons, keys of each batch's `"skipped"` entry), and how many
over a run (`SkipCounter`, summed over ranks).
"""

import threading
from collections import Counter
from collections.abc import Mapping

import torch

# Why a sample was dropped. Keys of `batch["skipped"]` and of `SkipCounter`.
CORRUPT_IMAGE = "corrupt_image"  # missing file, undecodable bytes, or a failed conversion to RGB
EMPTY_CAPTION = "empty_caption"  # no caption column value, or only an empty / whitespace-only string
TOO_FEW_CAPTIONS = "too_few_captions"  # stage 0: a row without two different captions gives no positive pair
SKIP_REASONS = (CORRUPT_IMAGE, EMPTY_CAPTION)
SKIPPED_KEY = "skipped"


class SkipCounter:
    """Totals of dropped samples per reason, fed from the `"skipped"` entry of each batch the collators make.

    The training loop owns one counter and adds each batch's popped `batch["skipped"]` with `counter.update(...)` (in
    the main process, after the DataLoader); at the end, `counter.all_reduce()` sums the ranks and `summary()` says
    it in words. Updates take a lock, so threads may share a counter.
    """

    def __init__(self, counts: Mapping[str, int] | None = None):
        self._lock = threading.Lock()
        self._counts: Counter = Counter({reason: 0 for reason in SKIP_REASONS})
        if counts:
            self.update(counts)

    def update(self, counts: Mapping[str, int]) -> None:
        with self._lock:
            for reason, n in counts.items():
                self._counts[reason] += int(n)

    def as_dict(self) -> dict[str, int]:
        with self._lock:
            return dict(self._counts)

    def all_reduce(self) -> dict[str, int]:
        """Totals summed over all `torch.distributed` ranks (this process's totals when not distributed)."""
        counts = self.as_dict()
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return counts
        gathered = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(gathered, counts)  # objects, not tensors: ranks may know other reasons
        total = Counter()
        for rank_counts in gathered:
            total.update(rank_counts)
        return dict(sorted(total.items()))

    def summary(self, counts: Mapping[str, int] | None = None) -> str:
        """E.g. `"skipped 2 samples: 1 corrupt_image, 1 empty_caption"`."""
        counts = self.as_dict() if counts is None else dict(counts)
        total = sum(counts.values())
        if not total:
            return "skipped no samples"
        parts = ", ".join(f"{n} {reason}" for reason, n in sorted(counts.items()) if n)
        return f"skipped {total} sample{'s' if total != 1 else ''}: {parts}"

    def __repr__(self) -> str:
        return f"SkipCounter({self.as_dict()})"


__all__ = [
    "CORRUPT_IMAGE",
    "EMPTY_CAPTION",
    "SKIP_REASONS",
    "SKIPPED_KEY",
    "TOO_FEW_CAPTIONS",
    "SkipCounter",
]
