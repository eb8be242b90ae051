"""Collators: raw dataset rows -> the batches each stage trains on.

    InheritanceCollator   stage 1: one caption per row, tokenised for the LLM (and the CLIP teacher)
    ContrastiveCollator   stage 2: decoded, augmented images and one caption per image
    CaptionPairCollator   stage 0: two different captions of one image, the positive pair
    MNTPCollator          stage 0's masked next-token phase: one caption per row, masked
    CachedEmbeddingCollator  wraps any of them to add the embedding cache's rows instead of token ids

Bad samples (an image that does not decode, a missing or blank caption, a row without two captions) are dropped from
the batch and their number per reason travels with the batch under `"skipped"`; the trainer adds those to a
`SkipCounter` and reports the totals at the end. The collators read raw dataset columns, so a `Trainer` using them
must be given `remove_unused_columns=False`.

Why skip counts ride in the batch: with `DataLoader(num_workers>0)` the collator runs in worker processes, each
holding its own copy of the collator, so a counter kept inside the collator would count in the copies and the main
process would read zeros. Shared memory (`multiprocessing.Value`) would fix that for one start method but also count
batches that were prefetched and never trained on, and still needs a reduction across ranks. A count carried by the
batch it belongs to is exact for any number of workers, any start method, persistent workers or not, and counts only
what was trained on; across data-parallel ranks one `SkipCounter.all_reduce()` sums the totals.

Every batch also carries where its rows came from (`sources`: one short string per kept row, the webdataset key or
image path and the caption, which the trainer names when a batch gives a non-finite loss) and the collator's random
state right after it drew the batch (`random_state`, a `CollatorRandomState`), which the trainer keeps for the last
batches it trained on and writes into checkpoints, so a resumed run draws the same crops and captions
(`resume_random_state`). Both ride in the batch for the reason the skip counts do.

Batches hold non-tensor entries (`captions`, `skipped`, `sources`), which `accelerate`'s `dispatch_batches=True` (its
default for an `IterableDataset`: rank 0 reads and broadcasts) cannot concatenate. Train streaming data with
`accelerator_config={"dispatch_batches": False}`, each rank reading its own part (`datasets.distributed.
split_dataset_by_node`). After drops, batch sizes differ between steps and ranks, and a batch can even be empty.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Callable

import torch

from .cache import LLM_TABLE, TEACHER_TABLE, EmbeddingCache
from .captions import caption_candidates
from .images import decode_image
from .skips import (
    CORRUPT_IMAGE,
    EMPTY_CAPTION,
    SKIP_REASONS,
    SKIPPED_KEY,
    TOO_FEW_CAPTIONS,
)

logger = logging.getLogger(__name__)

SOURCES_KEY = "sources"
CACHE_STATS_KEY = "cache_stats"  # hit and miss counts of the embedding cache for this batch
RANDOM_STATE_KEY = "random_state"


@dataclass(frozen=True)
class CollatorRandomState:
    """A collator generator's state right after it drew one batch, and which generator it was.

    Attributes:
        worker: the DataLoader worker's id, `None` in the main process.
        worker_seed: the seed the DataLoader gave that worker (`get_worker_info().seed`: its epoch's base seed plus
            its id), `None` in the main process.
        state: `torch.Generator.get_state()`, a uint8 tensor.

    Not a mapping, a tuple or a tensor, so the Trainer's and accelerate's device placement leave it as it is.
    """

    worker: int | None
    worker_seed: int | None
    state: torch.Tensor


def row_source(row: Mapping, image_column: str | None = None) -> str:
    """Where a row comes from, for messages: its webdataset `__key__` (or `__url__`), else its image file's path, else
    an empty string."""
    key = row.get("__key__") or row.get("__url__")
    if key:
        return str(key)
    value = row.get(image_column) if image_column else None
    path = value.get("path") if isinstance(value, Mapping) else value if isinstance(value, str) else None
    return str(path or "")


def described(source: str, caption: str, limit: int = 80) -> str:
    """`source: 'caption'` (the caption cut to `limit` characters), or the caption alone without a source."""
    shown = caption if len(caption) <= limit else caption[: limit - 3] + "..."
    return f"{source}: {shown!r}" if source else repr(shown)


class CaptionCollator:
    """Shared parts: the per-process random generator, tokenisation, and counting what was dropped.

    Randomness: one `torch.Generator` per process. In the main process (`num_workers=0`) it is seeded with `seed` and
    continues across epochs. In a DataLoader worker it is seeded from `seed` and the worker's seed, which the
    DataLoader draws anew for each epoch's workers from the main process's RNG: workers differ from each other,
    epochs differ, and a run seeded with `transformers.set_seed` repeats. The data-parallel rank is mixed in too, so
    ranks seeded alike still draw differently. Each batch carries the generator's state after its draws
    (`random_state`); `resume_random_state` makes the next generators start from saved states instead of seeds.
    """

    max_logged_skips = 5  # per process; the totals are in the batch counts

    def __init__(self, tokenizer, max_length: int | None, seed: int):
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.seed = int(seed)
        self._generator: torch.Generator | None = None
        self._generator_owner: tuple | None = None
        self._resume_from: dict[int | None, torch.Tensor | int] = {}
        self._logged_skips = 0

    def __getstate__(self):  # generators are per process: never ship one to a worker
        state = dict(self.__dict__)
        state["_generator"], state["_generator_owner"] = None, None
        return state

    def resume_random_state(self, starts: Mapping[int | None, torch.Tensor | int]) -> None:
        """Where the next generators start, by worker id (`None`: the main process): a saved `get_state()` tensor, or
        an int worker seed (start as a fresh worker given that seed by the DataLoader). Others are seeded as usual.

        Workers take their entry when they start (their copy of the collator holds it); the trainer gives new
        starts, usually none, at every epoch's start, which drops the entries the previous epoch's workers used.
        """
        self._resume_from = dict(starts)
        if None in self._resume_from:  # the main process's generator: replaced now
            self._generator = None

    @property
    def generator(self) -> torch.Generator:
        info = torch.utils.data.get_worker_info()
        owner = (os.getpid(),) if info is None else (os.getpid(), info.id, info.seed)
        if self._generator is None or owner != self._generator_owner:
            start = self._resume_from.pop(None if info is None else info.id, None)
            if isinstance(start, torch.Tensor):
                self._generator = torch.Generator()
                self._generator.set_state(start)
            else:
                self._generator = torch.Generator().manual_seed(self._seed_for(info, start))
            self._generator_owner = owner
        return self._generator

    def _seed_for(self, info, worker_seed: int | None = None) -> int:
        """The seed of this process's generator; `worker_seed` replaces the DataLoader's seed of a worker."""
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        rank = torch.distributed.get_rank() if distributed else 0
        if info is None:
            return (self.seed + 7_919 * rank) % 2**63
        worker_seed = info.seed if worker_seed is None else worker_seed
        return (self.seed * 1_000_003 + worker_seed + 7_919 * rank) % 2**63

    def random_state(self) -> CollatorRandomState:
        """This process's generator state now (call it after a batch's draws)."""
        info = torch.utils.data.get_worker_info()
        return CollatorRandomState(
            None if info is None else info.id, None if info is None else info.seed, self.generator.get_state()
        )

    def _finish(self, batch: dict[str, Any], skipped: Counter, sources: list[str]) -> dict[str, Any]:
        """Add the per-batch bookkeeping every collator returns: skip counts, row sources, the random state."""
        batch[SKIPPED_KEY] = dict(skipped)
        batch[SOURCES_KEY] = sources
        batch[RANDOM_STATE_KEY] = self.random_state()
        return batch

    def _check_columns(self, rows: list[Mapping], columns: Sequence[str]) -> None:
        """A column absent from the rows is a setup error, not bad data: say so instead of dropping every row."""
        if not rows:
            return
        missing = [column for column in columns if column not in rows[0]]
        if missing:
            raise ValueError(
                f"{type(self).__name__} reads column(s) {', '.join(map(repr, missing))}, but the rows have only "
                f"{', '.join(map(repr, rows[0]))}. Check the column names, and keep raw columns through a Trainer "
                "with `remove_unused_columns=False`."
            )

    def _choose(self, candidates: list[str], u: float) -> str:
        return candidates[min(int(u * len(candidates)), len(candidates) - 1)]

    def _tokenize(self, tokenizer, captions: list[str], max_length: int | None, prefix: str) -> dict:
        if not captions:
            empty = torch.zeros((0, 0), dtype=torch.long)
            return {f"{prefix}input_ids": empty, f"{prefix}attention_mask": empty.clone()}
        encoded = tokenizer(captions, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        return {f"{prefix}input_ids": encoded["input_ids"], f"{prefix}attention_mask": encoded["attention_mask"]}

    def _skip(self, skipped: Counter, reason: str, row: Mapping, detail: str) -> None:
        skipped[reason] += 1
        if self._logged_skips < self.max_logged_skips:
            self._logged_skips += 1
            key = row_source(row)
            logger.warning(
                "Skipping a sample (%s%s): %s%s",
                reason,
                f", {key}" if key else "",
                detail,
                "" if self._logged_skips < self.max_logged_skips else " (further skips are only counted)",
            )


class InheritanceCollator(CaptionCollator):
    """Stage 1 (representation inheritance) collator: rows -> tokenised captions; images are never read.

    Each row gives one caption, drawn at random among its non-blank captions in `caption_columns` (a list-valued
    column counts each of its strings). Rows without one are dropped and counted as `"empty_caption"`; with a
    `noise_caption_column`, a row without a non-blank noise caption is dropped too.

    Args:
        tokenizer: the LLM tokenizer (`ProCLIPProcessor.tokenizer`, which wraps prompts itself), or `None` to return
            captions only (when the trainer reads pooled embeddings from a cache).
        caption_columns: the caption column(s).
        noise_caption_column: optional second caption view per row (e.g. raw alt-text beside a recaption).
        max_length: truncation length, the model config's `max_text_length`; `None` = the tokenizer's own limit.
        teacher_tokenizer: optional CLIP tokenizer; adds the teacher's ids (truncated to its 77-token limit).
        seed: seed of the caption choice (see `CaptionCollator`).

    Returns (a dict, B = rows kept):
        `captions` list[str] (B) -- the raw chosen captions, for a cache lookup or a teacher;
        `input_ids`, `attention_mask` LongTensor (B, L) -- if a tokenizer is given;
        `teacher_input_ids`, `teacher_attention_mask` (B, L_t) -- if a teacher tokenizer is given;
        `noise_captions`, `noise_input_ids`, `noise_attention_mask` (and `noise_teacher_*`) -- with a noise column;
        `skipped` dict[str, int] -- rows dropped from this batch per reason (pop it with `SkipCounter`);
        `sources` list[str] (B) -- each row's `__key__` and caption; `random_state` -- a `CollatorRandomState`.
        B may be 0 when every row was dropped; tensors then have shape (0, 0).
    """

    def __init__(
        self,
        tokenizer=None,
        caption_columns: str | Sequence[str] = ("caption",),
        noise_caption_column: str | None = None,
        max_length: int | None = None,
        teacher_tokenizer=None,
        seed: int = 0,
    ):
        super().__init__(tokenizer, max_length, seed)
        self.caption_columns = (caption_columns,) if isinstance(caption_columns, str) else tuple(caption_columns)
        self.noise_caption_column = noise_caption_column
        self.teacher_tokenizer = teacher_tokenizer

    def __call__(self, rows: list[Mapping]) -> dict[str, Any]:
        noise_columns = () if self.noise_caption_column is None else (self.noise_caption_column,)
        self._check_columns(rows, self.caption_columns + noise_columns)
        draws = torch.rand(len(rows), 2, generator=self.generator).tolist()  # fixed draws per row: reproducible
        skipped: Counter = Counter({reason: 0 for reason in SKIP_REASONS})
        captions, noise_captions, sources = [], [], []
        for row, (u, u_noise) in zip(rows, draws):
            candidates = caption_candidates(row, self.caption_columns)
            if not candidates:
                self._skip(skipped, EMPTY_CAPTION, row, f"no caption in {', '.join(self.caption_columns)}")
                continue
            if self.noise_caption_column is not None:
                noise = caption_candidates(row, (self.noise_caption_column,))
                if not noise:
                    self._skip(skipped, EMPTY_CAPTION, row, f"no caption in {self.noise_caption_column}")
                    continue
                noise_captions.append(self._choose(noise, u_noise))
            captions.append(self._choose(candidates, u))
            sources.append(described(row_source(row), captions[-1]))

        batch: dict[str, Any] = {"captions": captions}
        views = [("", captions)] + ([("noise_", noise_captions)] if self.noise_caption_column is not None else [])
        for prefix, texts in views:
            if prefix:
                batch[f"{prefix}captions"] = texts
            if self.tokenizer is not None:
                batch.update(self._tokenize(self.tokenizer, texts, self.max_length, prefix))
            if self.teacher_tokenizer is not None:
                batch.update(self._tokenize(self.teacher_tokenizer, texts, None, f"{prefix}teacher_"))
        return self._finish(batch, skipped, sources)


class ContrastiveCollator(CaptionCollator):
    """Stage 2 (contrastive tuning) collator: rows -> `pixel_values` and one tokenised caption per image.

    Each image is paired with one caption drawn at random among the row's non-blank captions in `caption_columns`
    (e.g. a short and a long recaption; a list-valued column counts each of its strings), anew every time the row is
    seen. Rows are dropped and counted when no caption is usable (`"empty_caption"`, checked first, so the image is
    not decoded) or the image fails to load, decode or convert (`"corrupt_image"`).

    Args:
        tokenizer: the LLM tokenizer, or `None` to return captions only (cached embeddings).
        transform: a `CLIPImageTransform` (train or eval), or any callable `(PIL image, generator) -> (3, H, W)`.
        image_column: the image column (`{"bytes", "path"}`, a path, bytes or a PIL image).
        caption_columns: the caption column(s).
        max_length: truncation length, the model config's `max_text_length`.
        seed: seed of the caption choice and of the random crops (see `CaptionCollator`).

    Returns (a dict, B = rows kept):
        `pixel_values` FloatTensor (B, 3, H, W);
        `captions` list[str] (B) -- the raw chosen captions;
        `input_ids`, `attention_mask` LongTensor (B, L) -- if a tokenizer is given;
        `skipped` dict[str, int] -- rows dropped from this batch per reason (pop it with `SkipCounter`);
        `sources` list[str] (B) -- each row's `__key__` or image path and caption; `random_state` -- a
        `CollatorRandomState`.
        B may be 0 when every row was dropped.
    """

    def __init__(
        self,
        tokenizer,
        transform: Callable[..., torch.Tensor],
        image_column: str = "image",
        caption_columns: str | Sequence[str] = ("caption",),
        max_length: int | None = None,
        seed: int = 0,
    ):
        super().__init__(tokenizer, max_length, seed)
        self.transform = transform
        self.image_column = image_column
        self.caption_columns = (caption_columns,) if isinstance(caption_columns, str) else tuple(caption_columns)

    def __call__(self, rows: list[Mapping]) -> dict[str, Any]:
        self._check_columns(rows, (self.image_column,) + self.caption_columns)
        generator = self.generator
        draws = torch.rand(len(rows), generator=generator).tolist()
        skipped: Counter = Counter({reason: 0 for reason in SKIP_REASONS})
        pixels, captions, sources = [], [], []
        for row, u in zip(rows, draws):
            candidates = caption_candidates(row, self.caption_columns)
            if not candidates:
                self._skip(skipped, EMPTY_CAPTION, row, f"no caption in {', '.join(self.caption_columns)}")
                continue
            value = row.get(self.image_column)
            try:
                image = decode_image(value)
            except Exception as error:  # any decoder failure means this one file is unusable; never the whole run
                where = value.get("path") if isinstance(value, Mapping) else value if isinstance(value, str) else None
                self._skip(skipped, CORRUPT_IMAGE, row, f"{where or 'image'}: {type(error).__name__}: {error}")
                continue
            pixels.append(self.transform(image, generator=generator))
            captions.append(self._choose(candidates, u))
            sources.append(described(row_source(row, self.image_column), captions[-1]))

        if pixels:
            pixel_values = torch.stack(pixels)
        else:
            height, width = getattr(self.transform, "output_hw", (0, 0))
            pixel_values = torch.zeros((0, 3, height, width))
        batch: dict[str, Any] = {"pixel_values": pixel_values, "captions": captions}
        if self.tokenizer is not None:
            batch.update(self._tokenize(self.tokenizer, captions, self.max_length, ""))
        return self._finish(batch, skipped, sources)


class CaptionPairCollator(CaptionCollator):
    """Stage 0: rows -> two different captions of the same image, tokenised: the positive pairs.

    The two are drawn at random without replacement among the row's distinct non-blank captions in `caption_columns`
    (a list-valued column counts each of its strings; with two single-caption columns the pair is those two), and
    keep their column order. A row with fewer than two is dropped and counted under `too_few_captions`.

    Returns (a dict, B = rows kept):
        `captions`, `pair_captions` list[str] (B);
        `input_ids`, `attention_mask`, `pair_input_ids`, `pair_attention_mask` LongTensor (B, L) / (B, L');
        `skipped` dict[str, int]; `sources` list[str] (B); `random_state`.
    """

    def __init__(self, tokenizer, caption_columns: str | Sequence[str], max_length: int | None = None, seed: int = 0):
        super().__init__(tokenizer, max_length, seed)
        self.caption_columns = (caption_columns,) if isinstance(caption_columns, str) else tuple(caption_columns)

    def __call__(self, rows: list[Mapping]) -> dict[str, Any]:
        self._check_columns(rows, self.caption_columns)
        skipped: Counter = Counter({TOO_FEW_CAPTIONS: 0})
        first, second, sources = [], [], []
        for row in rows:
            candidates = list(dict.fromkeys(caption_candidates(row, self.caption_columns)))
            if len(candidates) < 2:
                self._skip(skipped, TOO_FEW_CAPTIONS, row, f"fewer than two captions in {', '.join(self.caption_columns)}")
                continue
            # Column order kept (the loss is symmetric): with a short and a long column, the short captions pad to
            # short lengths instead of every view padding to the long ones.
            a, b = sorted(torch.randperm(len(candidates), generator=self.generator)[:2].tolist())
            first.append(candidates[a])
            second.append(candidates[b])
            sources.append(described(row_source(row), first[-1]))
        batch: dict[str, Any] = {"captions": first, "pair_captions": second}
        batch.update(self._tokenize(self.tokenizer, first, self.max_length, ""))
        batch.update(self._tokenize(self.tokenizer, second, self.max_length, "pair_"))
        return self._finish(batch, skipped, sources)


def mask_for_mntp(
    input_ids: torch.Tensor, attention_mask: torch.Tensor, mask_token_id: int, probability: float,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Masked next-token prediction inputs: replace a random `probability` of the tokens by `mask_token_id`.

    Each real token but a row's first may be masked (the first has no previous position to be predicted from); every
    row with two or more tokens gets at least one masked token. All chosen tokens become the mask token (no 80/10/10
    split).

    Returns:
        `(masked_input_ids, labels)`, both (B, L): labels hold the original id at masked positions and -100 elsewhere,
        the layout the causal LM loss expects (position i - 1 predicts label i).
    """
    real = attention_mask.bool()
    maskable = real & (real.cumsum(-1) > 1)
    draws = torch.rand(input_ids.shape, generator=generator)
    chosen = maskable & (draws < probability)
    rows = torch.arange(input_ids.shape[0])
    first_choice = torch.where(maskable, draws, 2.0).argmin(-1)  # the row's lowest draw: forced in
    chosen[rows, first_choice] |= maskable.any(-1)
    labels = torch.where(chosen, input_ids, -100)
    return torch.where(chosen, mask_token_id, input_ids), labels


class MNTPCollator:
    """MNTP batches: one caption per row (drawn as in stage 1, `InheritanceCollator`), masked by `mask_for_mntp`.

    Returns: `captions`, `input_ids` (masked), `attention_mask`, `labels`, `skipped`, `sources`, `random_state`
    (after the masks were drawn).
    """

    def __init__(self, tokenizer, caption_columns, mask_token_id: int, probability: float = 0.2,
                 max_length: int | None = None, seed: int = 0):
        self.captions = InheritanceCollator(tokenizer, caption_columns, max_length=max_length, seed=seed)
        self.mask_token_id = mask_token_id
        self.probability = probability

    def __call__(self, rows: list[Mapping]) -> dict[str, Any]:
        batch = self.captions(rows)
        batch["input_ids"], batch["labels"] = mask_for_mntp(
            batch["input_ids"], batch["attention_mask"], self.mask_token_id, self.probability, self.captions.generator
        )
        batch[RANDOM_STATE_KEY] = self.captions.random_state()
        return batch

    def resume_random_state(self, starts) -> None:
        self.captions.resume_random_state(starts)


def mntp_mask_token_id(tokenizer) -> int:
    """The tokenizer's mask token, else "_" (LLM2Vec's choice for decoder LLMs, which have no mask token)."""
    if tokenizer.mask_token_id is not None:
        return tokenizer.mask_token_id
    return tokenizer.convert_tokens_to_ids(tokenizer.tokenize("_"))[-1]


class CachedEmbeddingCollator:
    """Adds cached embeddings to the batches of a stage collator built without tokenizers.

    For each caption view in the batch (`captions`, and `noise_captions` in stage 1) it adds
    `llm_embeds` (B, H) and `llm_embeds_found` (B,) from the LLM table, and with `use_teacher`
    `teacher_embeds` (B, D) and `teacher_embeds_found` from the teacher table (prefixed `noise_` for the second view).
    When some caption of the batch is missing, the whole view is also tokenised as the plain collator would
    (`input_ids`, `attention_mask`, or `teacher_input_ids`, ...), so the trainer can compute the missing rows.
    Hit and miss counts travel with the batch under `cache_stats`.

    Runs in DataLoader workers: the cache's memory maps are re-opened in each worker.
    """

    def __init__(
        self,
        collator,
        cache: EmbeddingCache,
        tokenizer,
        max_length: int | None = None,
        teacher_tokenizer=None,
        use_teacher: bool = False,
    ):
        if use_teacher and not cache.has_teacher:
            raise ValueError(f"{cache} has no teacher embeddings in every shard.")
        self.collator = collator
        self.cache = cache
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.teacher_tokenizer = teacher_tokenizer
        self.use_teacher = use_teacher

    def __call__(self, rows):
        batch = self.collator(rows)
        stats: Counter = Counter()
        for view in ("", "noise_"):
            captions = batch.get(f"{view}captions")
            if captions is None:
                continue
            self._add(batch, captions, LLM_TABLE, f"{view}llm_embeds", self.tokenizer, self.max_length, view, stats)
            if self.use_teacher:
                self._add(
                    batch, captions, TEACHER_TABLE, f"{view}teacher_embeds", self.teacher_tokenizer, None,
                    f"{view}teacher_", stats,
                )
        batch[CACHE_STATS_KEY] = dict(stats)
        return batch

    def resume_random_state(self, starts) -> None:
        self.collator.resume_random_state(starts)

    def _add(self, batch, captions, table, key, tokenizer, max_length, token_prefix, stats) -> None:
        embeds, found = self.cache.lookup(captions, table)
        batch[key], batch[f"{key}_found"] = embeds, found
        hits = int(found.sum())
        stats[f"{table}_hits"] += hits
        stats[f"{table}_misses"] += len(captions) - hits
        if hits < len(captions):
            encoded = tokenizer(captions, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
            batch[f"{token_prefix}input_ids"] = encoded["input_ids"]
            batch[f"{token_prefix}attention_mask"] = encoded["attention_mask"]


__all__ = [
    "RANDOM_STATE_KEY",
    "SOURCES_KEY",
    "CachedEmbeddingCollator",
    "CaptionCollator",
    "CaptionPairCollator",
    "CollatorRandomState",
    "ContrastiveCollator",
    "InheritanceCollator",
    "MNTPCollator",
    "mask_for_mntp",
    "mntp_mask_token_id",
]
