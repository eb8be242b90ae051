"""Captions: the usable captions of a row and of a dataset (what the collators draw from and the cache embeds), and
texts in batches for embedding, longest first (the cache, evaluation and every text tower batch this way).
"""

from collections.abc import Mapping, Sequence


def caption_candidates(row: Mapping, columns: Sequence[str]) -> list[str]:
    """The usable captions of a row: non-blank strings from the given columns (list-valued columns expanded)."""
    candidates = []
    for column in columns:
        value = row.get(column)
        for caption in value if isinstance(value, (list, tuple)) else [value]:
            if isinstance(caption, str) and caption.strip():
                candidates.append(caption)
    return candidates


def iter_row_captions(dataset, columns: Sequence[str], batch_size: int = 1000):
    """Each row's `caption_candidates` across `columns`, reading the dataset in batches."""
    columns = list(columns)
    for rows in dataset.select_columns(columns).iter(batch_size=batch_size):
        for i in range(len(rows[columns[0]])):
            yield caption_candidates({c: rows[c][i] for c in columns}, columns)


def iter_captions(dataset, caption_columns, noise_caption_column=None, batch_size: int = 1000):
    """Every caption a collator could draw: non-blank strings of the caption columns (and the noise column)."""
    columns = list(caption_columns) + ([noise_caption_column] if noise_caption_column else [])
    for captions in iter_row_captions(dataset, columns, batch_size):
        yield from captions


def longest_first_batches(texts: Sequence[str], batch_size: int) -> list[list[int]]:
    """Indices of `texts` in batches of `batch_size`, longest text first (by characters; ties keep their order).

    Texts of similar length share a batch, so little padding is computed, and the largest batch comes first, so an
    out-of-memory error shows at once. Whoever embeds with these batches puts each result back at its index.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive; got {batch_size}")
    order = sorted(range(len(texts)), key=lambda index: -len(texts[index]))
    return [order[start : start + batch_size] for start in range(0, len(order), batch_size)]


__all__ = ["caption_candidates", "iter_captions", "iter_row_captions", "longest_first_batches"]
