"""Captions: the usable captions of a row and of a dataset (what the collators draw from and the cache embeds).
Texts are embedded in batches by the embedding service (`modeling_proclip.embed_texts`).
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


__all__ = ["caption_candidates", "iter_captions", "iter_row_captions"]
