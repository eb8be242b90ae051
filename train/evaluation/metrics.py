"""Retrieval and zero-shot classification metrics, as plain tensor functions.

Every metric is built on one quantity: the **rank of a query's best positive** in its gallery, 0-based,
i.e. how many wrong gallery items the query ranks ahead of its best-scoring correct item. Recall@K (R@K),
top-K accuracy and caption retrieval accuracy are then "rank < K" averaged over queries. The best positive
is what makes the multi-caption protocol (Flickr30k / COCO: an image→text hit counts if any of the
image's captions is in the top K) and the 1:1 protocol the same computation.

Tie policy (pessimistic): a wrong item whose score *equals* the best positive's score is ranked ahead of
it. Ties never help a query, so a model that gives every item the same score gets R@K = 0 (for K no larger
than the number of wrong items), where `torch.topk`-style code would reward it for the gallery's order.
Ties among positives do not matter (any positive is a hit). A NaN score counts as -inf: a NaN positive is
ranked behind every wrong item.

Embedding-level functions compare L2-normalised embeddings (cosine similarity) and stream: the similarities
of `chunk_size` queries to the whole gallery are one (gallery size × chunk_size) block, written into one buffer
that every chunk reuses, and reduced to ranks at once; neither the (queries × gallery) matrix nor a normalised copy
of the gallery ever exists (its rows' inverse norms scale the block instead). Image-text retrieval scores both
directions from the same blocks, so each similarity is computed once: a caption's rank among the images is
gathered chunk by chunk, keeping its `max(ks) + 1` best-scoring images seen so far.

Recalls and accuracies are fractions in [0, 1].
"""

import math
from collections.abc import Sequence
from importlib import resources

import torch
import torch.nn.functional as F

DEFAULT_CHUNK_SIZE = 512

Positives = Sequence[Sequence[int]] | torch.Tensor


def _padded_positives(positives: Positives, num_queries: int, num_gallery: int, device) -> torch.Tensor:
    """(Q, P) long tensor of each query's correct gallery indices, each row sorted ascending; short rows are padded
    with their first entry, so padding and repeated indices sit next to their twin (see `_distinct_entries`)."""
    if isinstance(positives, torch.Tensor):
        if positives.ndim != 1:
            raise ValueError(f"a positives tensor holds one gallery index per query, shape (Q,); got {tuple(positives.shape)}")
        padded = positives.to(device=device, dtype=torch.long).unsqueeze(1)
    else:
        rows = [list(row) for row in positives]
        empty = [query for query, row in enumerate(rows) if not row]
        if empty:
            raise ValueError(f"every query needs at least one correct gallery item; queries {empty[:10]} have none")
        width = max((len(row) for row in rows), default=1)
        padded = torch.tensor([row + row[:1] * (width - len(row)) for row in rows], dtype=torch.long, device=device)
        padded = padded.reshape(len(rows), width).sort(dim=1).values
    if padded.shape[0] != num_queries:
        raise ValueError(f"positives are given for {padded.shape[0]} queries, but there are {num_queries}")
    if padded.numel() and (padded.min() < 0 or padded.max() >= num_gallery):
        raise ValueError(f"positive gallery indices must lie in [0, {num_gallery})")
    return padded


def _distinct_entries(sorted_positives: torch.Tensor) -> torch.Tensor:
    """(Q, P) bool: True at the first occurrence of each index in its (sorted) row."""
    distinct = torch.ones_like(sorted_positives, dtype=torch.bool)
    distinct[:, 1:] = sorted_positives[:, 1:] != sorted_positives[:, :-1]
    return distinct


def _column_ranks(scores: torch.Tensor, positives: torch.Tensor, workspace: torch.Tensor | None = None) -> torch.Tensor:
    """Rank of each column's best positive among the column's rows, ties counted against it, NaN as -inf.

    Args:
        scores: (G, C) float; column j holds query j's score for every gallery item.
        positives: (C, P) from `_padded_positives`.
        workspace: a float tensor shaped like `scores` to compare into (may be `scores` itself, which is then
            overwritten); None allocates one.

    Returns:
        (C,) long: wrong items scoring at least the best positive's score = all items at or above it, minus the
        positives at it (those equal to the best, since it is their maximum).
    """
    columns = torch.arange(scores.shape[1], device=scores.device)
    positive_scores = scores[positives, columns[:, None]]
    positive_scores = positive_scores.masked_fill(positive_scores.isnan(), float("-inf"))
    best = positive_scores.amax(dim=1)
    distinct = _distinct_entries(positives)
    if workspace is None:
        workspace = torch.empty_like(scores)
    # A float comparison summed as floats is many times faster than a bool one summed as integers; float32 counts
    # exactly up to 2**24 gallery items, float64 beyond. A NaN score compares False, i.e. it ranks last.
    exact = None if scores.shape[0] < 2**24 else torch.float64
    at_or_above = torch.ge(scores, best, out=workspace).sum(dim=0, dtype=exact).long()
    tied_positives = ((positive_scores >= best[:, None]) & distinct).sum(dim=1)
    ranks = at_or_above - tied_positives
    # Every positive NaN or -inf: each wrong item (NaN ones too, as -inf) ties or beats it.
    return torch.where(best == float("-inf"), scores.shape[0] - distinct.sum(dim=1), ranks)


def best_positive_ranks(scores: torch.Tensor, positives: Positives) -> torch.Tensor:
    """Rank of each query's best-scoring correct item among its gallery, ties counted against the query.

    Args:
        scores: (Q, G) similarity of every query to every gallery item; higher is more similar.
        positives: the correct gallery indices of each query: a list of Q non-empty lists, or a (Q,) long
            tensor when every query has exactly one.

    Returns:
        (Q,) long tensor: the number of wrong gallery items scoring at least as high as the query's best
        correct item (0 = retrieved first).
    """
    if scores.ndim != 2:
        raise ValueError(f"scores must be (Q, G); got shape {tuple(scores.shape)}")
    padded = _padded_positives(positives, scores.shape[0], scores.shape[1], scores.device)
    return _column_ranks(scores.T, padded)


def _unit_rows(embeds: torch.Tensor) -> torch.Tensor:
    return F.normalize(embeds.float(), dim=-1)


def _inverse_norms(embeds: torch.Tensor) -> torch.Tensor:
    """(G,) 1 / max(||row||, eps), the factor `F.normalize` divides each row by."""
    return 1.0 / torch.linalg.vector_norm(embeds.float(), dim=-1).clamp_min(1e-12)


class _CosineBlocks:
    """Cosine similarities of the whole gallery to successive chunks of queries, in one reused buffer.

    Args:
        gallery: (G, D); used as it is (never normalised or copied when float32).
        chunk_size: most queries per block; the buffer holds G × min(chunk_size, num_queries) floats.
        num_queries: how many queries there are in all.
    """

    def __init__(self, gallery: torch.Tensor, chunk_size: int, num_queries: int):
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be positive; got {chunk_size}")
        self.gallery = gallery.float()
        self.inverse_norms = _inverse_norms(self.gallery)[:, None]
        self.buffer = torch.empty(gallery.shape[0] * min(chunk_size, num_queries), device=gallery.device)

    def __call__(self, queries: torch.Tensor) -> torch.Tensor:
        """(C, D) queries -> (G, C) cosines, a view of the buffer (overwritten by the next call)."""
        block = self.buffer[: self.gallery.shape[0] * queries.shape[0]].view(self.gallery.shape[0], queries.shape[0])
        torch.mm(self.gallery, _unit_rows(queries).T, out=block)
        return block.mul_(self.inverse_norms)


def retrieval_ranks(
    query_embeds: torch.Tensor,
    gallery_embeds: torch.Tensor,
    positives: Positives,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> torch.Tensor:
    """[`best_positive_ranks`] of cosine similarities, computed `chunk_size` queries at a time.

    Args:
        query_embeds: (Q, D) query embeddings, normalised here.
        gallery_embeds: (G, D) gallery embeddings, compared as normalised.
        positives: as in [`best_positive_ranks`].
        chunk_size: queries scored at once; memory holds `chunk_size × G` scores.

    Returns:
        (Q,) long tensor of 0-based ranks, on the embeddings' device.
    """
    blocks = _CosineBlocks(gallery_embeds, chunk_size, query_embeds.shape[0])
    padded = _padded_positives(positives, query_embeds.shape[0], gallery_embeds.shape[0], query_embeds.device)
    ranks = []
    for start in range(0, query_embeds.shape[0], chunk_size):
        block = blocks(query_embeds[start : start + chunk_size])
        ranks.append(_column_ranks(block, padded[start : start + chunk_size], workspace=block))
    return torch.cat(ranks) if ranks else torch.zeros(0, dtype=torch.long, device=query_embeds.device)


class _RunningTopK:
    """For each gallery-side row, the `k` highest scores seen so far across column blocks, and their columns.

    Enough to rank a row's single positive exactly while fewer than `k - 1` wrong items beat it: whatever is not kept
    has `k` kept scores at or above it. A block's score only enters when it beats the row's lowest kept score
    (equal ones change nothing that is counted), so after the first few blocks few rows are touched.
    """

    ROWS_AT_ONCE = 8192  # rows gathered out of a block at a time: bounds the copy to 8192 × block width

    def __init__(self, num_rows: int, k: int, device):
        self.k = k
        self.scores = torch.full((num_rows, k), float("-inf"), device=device)
        self.columns = torch.full((num_rows, k), -1, dtype=torch.long, device=device)

    def update(self, block: torch.Tensor, first_column: int) -> None:
        """Take in a (rows, C) block whose columns are `first_column`, `first_column + 1`, ... (NaN-free)."""
        changed = (block.amax(dim=1) > self.scores[:, -1]).nonzero().squeeze(1)
        for rows in changed.split(self.ROWS_AT_ONCE):
            new = block[rows].topk(min(self.k, block.shape[1]), dim=1)
            scores = torch.cat([self.scores[rows], new.values], dim=1)
            columns = torch.cat([self.columns[rows], new.indices + first_column], dim=1)
            kept = scores.topk(self.k, dim=1)
            self.scores[rows] = kept.values
            self.columns[rows] = columns.gather(1, kept.indices)

    def ranks(self, positive_scores: torch.Tensor, positives: torch.Tensor, num_columns: int) -> torch.Tensor:
        """(rows,) rank of each row's positive column (score `positive_scores`, NaN = -inf), capped at `k - 1`."""
        positive_scores = positive_scores.masked_fill(positive_scores.isnan(), float("-inf"))
        wrong = (self.columns >= 0) & (self.columns != positives[:, None])
        ranks = ((self.scores >= positive_scores[:, None]) & wrong).sum(dim=1)
        ranks = torch.where(positive_scores == float("-inf"), num_columns - 1, ranks)
        return ranks.clamp(max=self.k - 1)


def _image_text_ranks(
    image_embeds: torch.Tensor, text_embeds: torch.Tensor, text_image_ids: torch.Tensor, max_rank: int, chunk_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Image→text ranks (N,) and text→image ranks (M,) capped at `max_rank`, from one pass over (M, chunk) blocks
    of the similarity matrix: each image-caption similarity is computed once and serves both directions."""
    num_images = image_embeds.shape[0]
    captions = _padded_positives(
        caption_indices_per_image(text_image_ids, num_images), num_images, text_embeds.shape[0], image_embeds.device
    )
    own_image = text_image_ids.to(image_embeds.device)
    own_image_scores = torch.empty(text_embeds.shape[0], device=image_embeds.device)
    blocks = _CosineBlocks(text_embeds, chunk_size, num_images)
    best_images = _RunningTopK(text_embeds.shape[0], min(max_rank + 1, num_images), image_embeds.device)
    # A sum is finite unless an entry is NaN or infinite (or it overflows, which only costs the NaN check below).
    finite = bool(torch.isfinite(image_embeds.float().sum() + text_embeds.float().sum()))
    image_ranks = []
    for start in range(0, num_images, chunk_size):
        block = blocks(image_embeds[start : start + chunk_size])
        if not finite:  # only non-finite embeddings give NaN scores; the running top-k needs them as -inf
            block.masked_fill_(block.isnan(), float("-inf"))
        own = ((own_image >= start) & (own_image < start + block.shape[1])).nonzero().squeeze(1)
        own_image_scores[own] = block[own, own_image[own] - start]
        best_images.update(block, start)
        image_ranks.append(_column_ranks(block, captions[start : start + chunk_size], workspace=block))
    text_ranks = best_images.ranks(own_image_scores, own_image, num_images)
    return torch.cat(image_ranks), text_ranks


def recall_at_k(ranks: torch.Tensor, ks: Sequence[int] = (1, 5, 10)) -> dict[int, float]:
    """Fraction of queries whose best positive is within the top K, for each K.

    Args:
        ranks: (Q,) 0-based ranks from [`best_positive_ranks`] or [`retrieval_ranks`].
    """
    if ranks.numel() == 0:
        raise ValueError("no query to score")
    return {k: (ranks < k).sum().item() / ranks.numel() for k in ks}


def caption_indices_per_image(caption_image_ids: torch.Tensor, num_images: int) -> list[list[int]]:
    """For each image, the indices of its captions, in their original order.

    Args:
        caption_image_ids: (M,) long, the image each caption belongs to, in [0, num_images).
    """
    image_ids = torch.as_tensor(caption_image_ids, dtype=torch.long).cpu()
    order = torch.argsort(image_ids, stable=True)
    counts = torch.bincount(image_ids, minlength=num_images)
    if counts.numel() > num_images:
        raise ValueError(f"caption image ids must lie in [0, {num_images})")
    return [chunk.tolist() for chunk in torch.split(order, counts.tolist())]


def image_text_retrieval_recall(
    image_embeds: torch.Tensor,
    text_embeds: torch.Tensor,
    text_image_ids: torch.Tensor,
    ks: Sequence[int] = (1, 5, 10),
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> dict[str, float]:
    """Image→text and text→image R@K, with any number of captions per image.

    Image→text: each image queries all captions; a hit if any of its own captions is in the top K.
    Text→image: each caption queries all images; a hit if its image is in the top K. With one caption per
    image (`text_image_ids = arange(N)`) this is the 1:1 long-text protocol. Both directions come from one pass
    over the similarities, `chunk_size` images at a time (memory: M × chunk_size scores).

    Args:
        image_embeds: (N, D).
        text_embeds: (M, D).
        text_image_ids: (M,) long, the image each caption describes; every image needs at least one caption.

    Returns:
        `{"image_to_text_R@K": ..., "text_to_image_R@K": ...}` for each K.
    """
    text_image_ids = torch.as_tensor(text_image_ids, dtype=torch.long)
    if text_image_ids.shape != (text_embeds.shape[0],):
        raise ValueError(f"text_image_ids must give one image per caption, shape ({text_embeds.shape[0]},)")
    if text_image_ids.numel() and (text_image_ids.min() < 0 or text_image_ids.max() >= image_embeds.shape[0]):
        raise ValueError(f"caption image ids must lie in [0, {image_embeds.shape[0]})")
    image_ranks, text_ranks = _image_text_ranks(image_embeds, text_embeds, text_image_ids, max(ks), chunk_size)
    image_to_text = recall_at_k(image_ranks, ks)
    text_to_image = recall_at_k(text_ranks, ks)
    return {f"image_to_text_R@{k}": value for k, value in image_to_text.items()} | {
        f"text_to_image_R@{k}": value for k, value in text_to_image.items()
    }


def caption_retrieval_accuracy(
    caption_embeds: torch.Tensor, caption_image_ids: torch.Tensor, chunk_size: int = DEFAULT_CHUNK_SIZE
) -> float:
    """Caption retrieval accuracy (CRA, LLM2CLIP): how often an image's first caption retrieves its second.

    Only images with at least two captions take part. Each one's first caption (in the order given) queries
    among all those images' second captions; the score is top-1 accuracy, ties counted against the query.

    Args:
        caption_embeds: (M, D).
        caption_image_ids: (M,) long, the image each caption belongs to.
    """
    caption_image_ids = torch.as_tensor(caption_image_ids, dtype=torch.long)
    num_images = int(caption_image_ids.max()) + 1 if caption_image_ids.numel() else 0
    pairs = [captions[:2] for captions in caption_indices_per_image(caption_image_ids, num_images) if len(captions) >= 2]
    if not pairs:
        raise ValueError("caption retrieval accuracy needs at least one image with two captions")
    first, second = (torch.tensor(column, device=caption_embeds.device) for column in zip(*pairs))
    positives = torch.arange(len(pairs), device=caption_embeds.device)
    ranks = retrieval_ranks(caption_embeds[first], caption_embeds[second], positives, chunk_size)
    return recall_at_k(ranks, ks=(1,))[1]


def class_embeddings(text_embeds_per_template: torch.Tensor) -> torch.Tensor:
    """Zero-shot class vectors: normalise each template's embedding, average over templates, normalise.

    Args:
        text_embeds_per_template: (C, T, D), class c filled into template t.

    Returns:
        (C, D) unit vectors.
    """
    return F.normalize(F.normalize(text_embeds_per_template.float(), dim=-1).mean(dim=1), dim=-1)


def per_class_accuracy(ranks: torch.Tensor, labels: torch.Tensor, num_classes: int, k: int = 1) -> torch.Tensor:
    """Top-K accuracy within each true class.

    Args:
        ranks: (N,) 0-based rank of each example's true class.
        labels: (N,) long true classes in [0, num_classes).

    Returns:
        (C,) float64; NaN for classes without examples.
    """
    labels = torch.as_tensor(labels, dtype=torch.long, device=ranks.device)
    hits = (ranks < k).double()
    examples = torch.bincount(labels, minlength=num_classes).double()
    correct = torch.bincount(labels, weights=hits, minlength=num_classes)
    return torch.where(examples > 0, correct / examples.clamp(min=1), float("nan"))


def classification_accuracy_from_ranks(
    ranks: torch.Tensor, labels: torch.Tensor, num_classes: int, ks: Sequence[int] = (1, 5)
) -> dict[str, float | list[float | None]]:
    """Top-K accuracies, and top-1 accuracy per class and averaged over classes (balanced accuracy).

    Args:
        ranks: (N,) 0-based rank of each example's true class.
        labels: (N,) long true classes.

    Returns:
        `{"top{K}_accuracy": ..., "mean_per_class_top1_accuracy": ..., "per_class_top1_accuracy": [C values,
        None for classes without examples]}`.
    """
    per_class = per_class_accuracy(ranks, labels, num_classes, k=1)
    result: dict[str, float | list[float | None]] = {
        f"top{k}_accuracy": value for k, value in recall_at_k(ranks, ks).items()
    }
    result["mean_per_class_top1_accuracy"] = per_class.nanmean().item()
    result["per_class_top1_accuracy"] = [None if math.isnan(value) else value for value in per_class.tolist()]
    return result


def zeroshot_accuracy(
    image_embeds: torch.Tensor,
    class_embeds: torch.Tensor,
    labels: torch.Tensor,
    ks: Sequence[int] = (1, 5),
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> dict[str, float | list[float | None]]:
    """Zero-shot classification accuracy: each image is scored against every class vector by cosine.

    (CLIP's logits are 100 × cosine; the factor does not change any rank.)

    Args:
        image_embeds: (N, D).
        class_embeds: (C, D), e.g. from [`class_embeddings`].
        labels: (N,) long true classes.

    Returns:
        As [`classification_accuracy_from_ranks`].
    """
    labels = torch.as_tensor(labels, dtype=torch.long, device=image_embeds.device)
    ranks = retrieval_ranks(image_embeds, class_embeds, labels, chunk_size)
    return classification_accuracy_from_ranks(ranks, labels, class_embeds.shape[0], ks)


def evaluate_module_path(name: str) -> str:
    """Local folder of a metric shipped as an `evaluate` module, for `evaluate.load(path)` (works offline).

    Args:
        name: `"retrieval_recall"` or `"zeroshot_accuracy"`.
    """
    path = resources.files(__package__) / "metrics_modules" / name
    if not (path / f"{name}.py").is_file():
        raise ValueError(f"no evaluate module named {name!r} ships with proclip_train")
    return str(path)
