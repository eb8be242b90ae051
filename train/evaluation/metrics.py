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

Embedding-level functions compare L2-normalised embeddings (cosine similarity) and compute the
similarities `chunk_size` queries at a time, so at most `chunk_size × gallery size` scores exist at once.

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
    """(Q, P) long tensor of each query's correct gallery indices, short rows padded with their first entry."""
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
        padded = padded.reshape(len(rows), width)
    if padded.shape[0] != num_queries:
        raise ValueError(f"positives are given for {padded.shape[0]} queries, but there are {num_queries}")
    if padded.numel() and (padded.min() < 0 or padded.max() >= num_gallery):
        raise ValueError(f"positive gallery indices must lie in [0, {num_gallery})")
    return padded


def _ranks_of_padded_positives(scores: torch.Tensor, padded: torch.Tensor) -> torch.Tensor:
    scores = torch.where(scores.isnan(), float("-inf"), scores)
    best_positive = scores.gather(1, padded).amax(dim=1, keepdim=True)
    is_positive = torch.zeros_like(scores, dtype=torch.bool).scatter_(1, padded, True)
    return ((scores >= best_positive) & ~is_positive).sum(dim=1)


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
    return _ranks_of_padded_positives(scores, padded)


def retrieval_ranks(
    query_embeds: torch.Tensor,
    gallery_embeds: torch.Tensor,
    positives: Positives,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> torch.Tensor:
    """[`best_positive_ranks`] of cosine similarities, computed `chunk_size` queries at a time.

    Args:
        query_embeds: (Q, D) query embeddings, normalised here.
        gallery_embeds: (G, D) gallery embeddings, normalised here.
        positives: as in [`best_positive_ranks`].
        chunk_size: queries scored at once; memory holds `chunk_size × G` scores.

    Returns:
        (Q,) long tensor of 0-based ranks, on the embeddings' device.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be positive; got {chunk_size}")
    queries = F.normalize(query_embeds.float(), dim=-1)
    gallery = F.normalize(gallery_embeds.float(), dim=-1)
    padded = _padded_positives(positives, queries.shape[0], gallery.shape[0], queries.device)
    ranks = [
        _ranks_of_padded_positives(queries[start : start + chunk_size] @ gallery.T, padded[start : start + chunk_size])
        for start in range(0, queries.shape[0], chunk_size)
    ]
    return torch.cat(ranks) if ranks else torch.zeros(0, dtype=torch.long, device=queries.device)


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
    image (`text_image_ids = arange(N)`) this is the 1:1 long-text protocol.

    Args:
        image_embeds: (N, D).
        text_embeds: (M, D).
        text_image_ids: (M,) long, the image each caption describes; every image needs at least one caption.

    Returns:
        `{"image_to_text_R@K": ..., "text_to_image_R@K": ...}` for each K.
    """
    text_image_ids = torch.as_tensor(text_image_ids, dtype=torch.long)
    captions = caption_indices_per_image(text_image_ids, image_embeds.shape[0])
    image_to_text = recall_at_k(retrieval_ranks(image_embeds, text_embeds, captions, chunk_size), ks)
    text_to_image = recall_at_k(retrieval_ranks(text_embeds, image_embeds, text_image_ids, chunk_size), ks)
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
