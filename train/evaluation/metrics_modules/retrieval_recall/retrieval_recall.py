"""Retrieval recall@K as an `evaluate` module, shipped inside proclip_train.

Load it by local path (no Hub access needed):

    import evaluate
    from proclip_train.evaluation.metrics import evaluate_module_path
    recall = evaluate.load(evaluate_module_path("retrieval_recall"))

The computation is proclip_train.evaluation.metrics (one implementation); this file only adapts it to evaluate's
add_batch / compute interface.
"""

import datasets
import evaluate
import torch
from proclip_train.evaluation.metrics import best_positive_ranks, recall_at_k

_DESCRIPTION = """
Recall@K for retrieval: the fraction of queries whose best-scoring correct gallery item is among the
top K. A query may have several correct items (Flickr30k / COCO image->text: an image's five captions);
it is a hit if any of them is in the top K. Ties are pessimistic: a wrong item scoring exactly as high
as the best correct item is ranked ahead of it. NaN scores count as -inf.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions: one row per query: its similarity to every gallery item (all rows the same length G).
    references: one list per query: the indices (in [0, G)) of its correct gallery items, at least one.
    ks: the K values to report, default (1, 5, 10).
Returns:
    {"R@1": float, "R@5": float, "R@10": float}: fractions in [0, 1].
Examples:
    >>> recall = evaluate.load(evaluate_module_path("retrieval_recall"))
    >>> recall.compute(predictions=[[0.9, 0.1], [0.8, 0.2]], references=[[0], [0, 1]], ks=(1,))
    {'R@1': 1.0}
"""


class RetrievalRecall(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    "predictions": datasets.Sequence(datasets.Value("float32")),
                    "references": datasets.Sequence(datasets.Value("int64")),
                }
            ),
        )

    def _compute(self, predictions, references, ks=(1, 5, 10)):
        ranks = best_positive_ranks(torch.tensor(predictions, dtype=torch.float32), references)
        return {f"R@{k}": value for k, value in recall_at_k(ranks, ks).items()}
