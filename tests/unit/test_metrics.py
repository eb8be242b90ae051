"""Metrics against values computed by hand on hand-made similarity matrices and embeddings."""

import math

import evaluate
import pytest
import torch
from proclip_train.evaluation.metrics import (
    best_positive_ranks,
    caption_indices_per_image,
    caption_retrieval_accuracy,
    class_embeddings,
    evaluate_module_path,
    image_text_retrieval_recall,
    per_class_accuracy,
    recall_at_k,
    retrieval_ranks,
    zeroshot_accuracy,
)


def test_ranks_count_wrong_items_ahead_of_the_best_positive():
    scores = torch.tensor(
        [
            [0.9, 0.1, 0.5, 0.2],  # positive 0 is first
            [0.9, 0.1, 0.5, 0.2],  # positive 2 behind 0 -> rank 1
            [0.9, 0.1, 0.5, 0.2],  # positives {1, 3}: best is 3 (0.2), behind 0 and 2 -> rank 2
            [0.1, 0.2, 0.3, 0.4],  # positive 0 is last -> rank 3
        ]
    )
    ranks = best_positive_ranks(scores, [[0], [2], [1, 3], [0]])
    assert ranks.tolist() == [0, 1, 2, 3]
    assert recall_at_k(ranks, ks=(1, 2, 3, 4)) == {1: 0.25, 2: 0.5, 3: 0.75, 4: 1.0}


def test_ties_count_against_the_query():
    scores = torch.tensor(
        [
            [0.5, 0.5, 0.1],  # positive 0 ties with wrong item 1 -> rank 1
            [0.5, 0.5, 0.1],  # the same from the other side -> rank 1
            [0.5, 0.5, 0.1],  # both tied items are positives -> rank 0
            [0.3, 0.3, 0.3],  # constant scores: every wrong item is ahead -> rank 2
        ]
    )
    ranks = best_positive_ranks(scores, [[0], [1], [0, 1], [2]])
    assert ranks.tolist() == [1, 1, 0, 2]
    assert recall_at_k(ranks, ks=(1,)) == {1: 0.25}


def test_nan_scores_rank_last():
    scores = torch.tensor([[float("nan"), 0.1, -5.0], [0.2, float("nan"), 0.1]])
    assert best_positive_ranks(scores, [[0], [2]]).tolist() == [2, 1]


def test_tensor_positives_mean_one_per_query():
    scores = torch.tensor([[0.1, 0.9], [0.1, 0.9]])
    assert best_positive_ranks(scores, torch.tensor([1, 0])).tolist() == [0, 1]


@pytest.mark.parametrize(
    "positives, message",
    [([[0], []], "at least one"), ([[0], [2]], r"\[0, 2\)"), ([[0]], "for 1 queries")],
)
def test_bad_positives_are_refused(positives, message):
    with pytest.raises(ValueError, match=message):
        best_positive_ranks(torch.zeros(2, 2), positives)


def test_retrieval_ranks_of_embeddings_equal_ranks_of_their_similarities():
    # Against the identity gallery, a query's cosine similarities are its normalised coordinates.
    queries = torch.tensor([[3.0, 4.0, 0.0], [1.0, 1.0, 1.0], [0.0, 0.0, 2.0]])
    ranks = retrieval_ranks(queries, torch.eye(3), [[0], [2], [1]])
    assert ranks.tolist() == [1, 2, 2]  # 0.6 < 0.8; three-way tie; 0 tied with item 0 and behind item 2


# Three one-hot images and six unit captions, two per image: the similarity of image j and caption c is c[j].
IMAGES = torch.eye(3)
CAPTIONS = torch.tensor(
    [
        [0.8, 0.6, 0.0],  # image 0
        [0.0, 0.6, 0.8],  # image 0
        [0.6, 0.8, 0.0],  # image 1
        [0.0, 0.0, 1.0],  # image 1
        [0.0, 0.8, 0.6],  # image 2
        [1.0, 0.0, 0.0],  # image 2
    ]
)
CAPTION_IMAGE_IDS = torch.tensor([0, 0, 1, 1, 2, 2])


def test_image_text_recall_with_several_captions_per_image():
    #           captions: c0   c1   c2   c3   c4   c5
    # image 0:            .8   0    .6   0    0    1     best own caption c0 (.8), behind c5 -> rank 1
    # image 1:            .6   .6   .8   0    .8   0     best own c2 (.8), tied with c4 -> rank 1
    # image 2:            0    .8   0    1    .6   0     best own c4 (.6), behind c1, c3 -> rank 2
    # text->image ranks (caption's column): c0 0, c1 2, c2 0, c3 2 (tie with image 0 at 0), c4 1, c5 2
    recall = image_text_retrieval_recall(IMAGES, CAPTIONS, CAPTION_IMAGE_IDS, ks=(1, 2, 3))
    assert recall == pytest.approx(
        {
            "image_to_text_R@1": 0.0,
            "image_to_text_R@2": 2 / 3,
            "image_to_text_R@3": 1.0,
            "text_to_image_R@1": 2 / 6,
            "text_to_image_R@2": 3 / 6,
            "text_to_image_R@3": 1.0,
        }
    )


def test_one_to_one_recall():
    images = torch.eye(3)
    texts = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, 0.0, 1.0]])
    # image->text: image 0 -> text 0 first; image 1 scores 0 everywhere -> rank 2; image 2: text 2 tied with 1
    # text->image: text 0 -> image 0 first; text 1 -> image 1 behind image 2; text 2 -> image 2 first
    recall = image_text_retrieval_recall(images, texts, torch.arange(3), ks=(1,))
    assert recall == pytest.approx({"image_to_text_R@1": 1 / 3, "text_to_image_R@1": 2 / 3})


def _reference_ranks(scores, positives):
    """Sort each row (descending) and find the first positive; a plain loop with no shared code."""
    ranks = []
    for row, own in zip(scores.tolist(), positives):
        order = sorted(range(len(row)), key=lambda item: -row[item])
        first_positive = next(position for position, item in enumerate(order) if item in own)
        ranks.append(first_positive)
    return ranks


def test_chunked_and_unchunked_retrieval_agree_and_match_a_sorting_reference():
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(37, 8, generator=generator)
    owners = torch.arange(37).repeat_interleave(3)[torch.randperm(111, generator=generator)]
    captions = images[owners] + 1.5 * torch.randn(111, 8, generator=generator)
    own_captions = caption_indices_per_image(owners, 37)

    unchunked = retrieval_ranks(images, captions, own_captions, chunk_size=10_000)
    for chunk_size in (1, 5, 36):
        assert torch.equal(retrieval_ranks(images, captions, own_captions, chunk_size=chunk_size), unchunked)
    cosine = torch.nn.functional.normalize(images, dim=-1) @ torch.nn.functional.normalize(captions, dim=-1).T
    assert unchunked.tolist() == _reference_ranks(cosine, own_captions)
    assert 0 < (unchunked == 0).sum() < 37  # neither trivial nor hopeless

    text_ranks = retrieval_ranks(captions, images, owners, chunk_size=7)
    assert text_ranks.tolist() == _reference_ranks(cosine.T, [[owner] for owner in owners.tolist()])
    recall = image_text_retrieval_recall(images, captions, owners, ks=(1, 5), chunk_size=4)
    assert recall["image_to_text_R@5"] == pytest.approx((unchunked < 5).float().mean().item())
    assert recall["text_to_image_R@1"] == pytest.approx((text_ranks < 1).float().mean().item())


def _exact_unit_vectors(n: int, dim: int, generator) -> torch.Tensor:
    """Rows with four entries of +-1 and zeros elsewhere: norm exactly 2, so every cosine is computed exactly and
    equal cosines are equal floats (many exact ties)."""
    rows = torch.zeros(n, dim)
    for row in rows:
        row[torch.randperm(dim, generator=generator)[:4]] = torch.randint(0, 2, (4,), generator=generator) * 2.0 - 1
    return rows


def _pessimistic_reference_ranks(scores: list[list[float]], positives: list[list[int]]) -> list[int]:
    """Wrong items scoring at least the best positive (NaN as -inf), by plain loops."""
    clean = [[float("-inf") if math.isnan(x) else x for x in row] for row in scores]
    ranks = []
    for row, own in zip(clean, positives):
        best = max(row[item] for item in own)
        ranks.append(sum(1 for item, x in enumerate(row) if item not in own and x >= best))
    return ranks


@pytest.mark.parametrize("chunk_size", [1, 3, 16, 1000])
def test_one_pass_image_text_recall_is_exact_under_ties_nan_and_any_chunking(chunk_size):
    generator = torch.Generator().manual_seed(2)
    images = _exact_unit_vectors(29, 6, generator)
    owners = torch.arange(29).repeat_interleave(torch.randint(1, 4, (29,), generator=generator))
    owners = owners[torch.randperm(len(owners), generator=generator)]  # captions not grouped by image
    captions = _exact_unit_vectors(len(owners), 6, generator)
    images[3] = float("nan")  # an image that cannot be embedded ranks last everywhere
    captions[5] = float("nan")
    cosine = (images @ captions.T / 4).tolist()  # exact: entries in {0, +-1/4, ..., +-1}
    own = caption_indices_per_image(owners, 29)
    image_ranks = torch.tensor(_pessimistic_reference_ranks(cosine, own))
    text_ranks = torch.tensor(_pessimistic_reference_ranks([list(c) for c in zip(*cosine)], [[o] for o in owners.tolist()]))
    ks = (1, 2, 5, 10)
    recall = image_text_retrieval_recall(images, captions, owners, ks=ks, chunk_size=chunk_size)
    expected = {f"image_to_text_R@{k}": (image_ranks < k).float().mean().item() for k in ks}
    expected |= {f"text_to_image_R@{k}": (text_ranks < k).float().mean().item() for k in ks}
    assert recall == pytest.approx(expected)
    assert 0 < expected["text_to_image_R@1"] < expected["text_to_image_R@10"] < 1  # ties and misses both occur
    assert retrieval_ranks(images, captions, own, chunk_size=chunk_size).tolist() == image_ranks.tolist()


def test_caption_indices_per_image_keep_the_given_order():
    assert caption_indices_per_image(torch.tensor([1, 0, 0, 1, 3]), 4) == [[1, 2], [0, 3], [], [4]]


def test_caption_retrieval_accuracy():
    # Image ids in the order given: image 0 -> captions [1, 2]; image 1 -> [0, 3, 6]; image 2 -> [4] (left
    # out: one caption); image 3 -> [5, 7]. Queries c1, c0, c5 search among c2, c3, c7.
    ids = torch.tensor([1, 0, 0, 1, 2, 3, 1, 3])
    embeds = torch.tensor(
        [
            [1.0, 0.5, 0.0],  # c0: image 1's first caption, nearest to c2 (image 0's second) -> miss
            [1.0, 0.0, 0.0],  # c1: image 0's first -> c2, hit
            [1.0, 0.0, 0.0],  # c2
            [0.0, 1.0, 0.0],  # c3
            [1.0, 0.5, 0.0],  # c4: single caption, not used
            [0.0, 0.0, 1.0],  # c5: image 3's first -> c7, hit
            [1.0, 0.5, 0.0],  # c6: image 1's third caption; were it taken as the second, c0 would hit
            [0.0, 0.0, 1.0],  # c7
        ]
    )
    assert caption_retrieval_accuracy(embeds, ids) == pytest.approx(2 / 3)
    assert caption_retrieval_accuracy(embeds, ids, chunk_size=1) == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="two captions"):
        caption_retrieval_accuracy(embeds[:2], torch.tensor([0, 1]))


def test_class_embeddings_normalise_average_normalise():
    per_template = torch.tensor([[[2.0, 0.0], [0.0, 5.0]], [[0.0, -3.0], [0.0, -1.0]]])
    expected = torch.tensor([[math.sqrt(0.5), math.sqrt(0.5)], [0.0, -1.0]])
    assert torch.allclose(class_embeddings(per_template), expected)


def test_zeroshot_top_k_and_per_class_accuracy():
    classes = torch.eye(4)  # class 3 has no image
    images = torch.tensor(
        [
            [1.0, 0.2, 0.1, 0.0],  # label 0: first -> top-1 hit
            [0.1, 1.0, 0.0, 0.0],  # label 0: second -> top-2 hit
            [0.0, 1.0, 0.5, 0.0],  # label 1: first -> hit
            [0.5, 0.5, 0.0, 0.0],  # label 1: tied with class 0 -> rank 1 (pessimistic)
            [0.9, 0.0, 0.1, 0.5],  # label 2: behind classes 0 and 3 -> rank 2
        ]
    )
    labels = torch.tensor([0, 0, 1, 1, 2])
    result = zeroshot_accuracy(images, classes, labels, ks=(1, 2, 3))
    assert result["top1_accuracy"] == pytest.approx(2 / 5)
    assert result["top2_accuracy"] == pytest.approx(4 / 5)
    assert result["top3_accuracy"] == pytest.approx(1.0)
    assert result["per_class_top1_accuracy"] == [0.5, 0.5, 0.0, None]
    assert result["mean_per_class_top1_accuracy"] == pytest.approx(1 / 3)
    ranks = torch.tensor([0, 1, 0, 1, 2])
    assert per_class_accuracy(ranks, labels, 4, k=2).tolist()[:3] == [1.0, 1.0, 0.0]


def test_evaluate_modules_load_offline_and_agree_with_the_functions(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_EVALUATE_OFFLINE", "1")
    generator = torch.Generator().manual_seed(1)
    scores = torch.randn(12, 9, generator=generator)
    positives = [[query % 9, (query * 4) % 9] for query in range(12)]

    recall = evaluate.load(evaluate_module_path("retrieval_recall"), cache_dir=str(tmp_path))
    for start in range(0, 12, 5):  # streamed, as in a user's loop
        recall.add_batch(predictions=scores[start : start + 5].tolist(), references=positives[start : start + 5])
    expected = recall_at_k(best_positive_ranks(scores, positives), ks=(1, 3))
    assert recall.compute(ks=(1, 3)) == pytest.approx({"R@1": expected[1], "R@3": expected[3]})

    labels = torch.tensor([query % 9 for query in range(12)])
    accuracy = evaluate.load(evaluate_module_path("zeroshot_accuracy"), cache_dir=str(tmp_path))
    result = accuracy.compute(predictions=scores.tolist(), references=labels.tolist(), ks=(1, 5))
    expected = zeroshot_accuracy(scores, torch.eye(9), labels, ks=(1, 5))  # identity classes: scores are cosines
    assert result["top1_accuracy"] == pytest.approx(expected["top1_accuracy"])
    assert result["top5_accuracy"] == pytest.approx(expected["top5_accuracy"])
    assert result["per_class_top1_accuracy"] == pytest.approx(expected["per_class_top1_accuracy"])


def test_unknown_evaluate_module_is_refused():
    with pytest.raises(ValueError, match="no evaluate module"):
        evaluate_module_path("bleu")
