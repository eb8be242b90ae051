"""Zero-shot (or any) classification accuracy as an `evaluate` module, shipped inside proclip_train.

Load it by local path (no Hub access needed):

    import evaluate
    from proclip_train.evaluation.metrics import evaluate_module_path
    accuracy = evaluate.load(evaluate_module_path("zeroshot_accuracy"))

The computation is proclip_train.evaluation.metrics (one implementation); this file only adapts it to evaluate's
add_batch / compute interface.
"""

import datasets
import evaluate
import torch
from proclip_train.evaluation.metrics import (
    best_positive_ranks,
    classification_accuracy_from_ranks,
)

_DESCRIPTION = """
Top-K accuracy from per-class scores (e.g. 100 x cosine of an image with each class vector), plus
top-1 accuracy per class and its mean over classes. Ties are pessimistic: a wrong class scoring exactly
as high as the true class is ranked ahead of it. NaN scores count as -inf.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions: one row per example: its score for each of the C classes.
    references: the true class index of each example, in [0, C).
    ks: the K values to report, default (1, 5).
Returns:
    {"top1_accuracy": float, "top5_accuracy": float, "mean_per_class_top1_accuracy": float,
     "per_class_top1_accuracy": [C values, None for classes without examples]}
Examples:
    >>> accuracy = evaluate.load(evaluate_module_path("zeroshot_accuracy"))
    >>> accuracy.compute(predictions=[[0.9, 0.1], [0.6, 0.4]], references=[0, 1], ks=(1,))["top1_accuracy"]
    0.5
"""


class ZeroshotAccuracy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    "predictions": datasets.Sequence(datasets.Value("float32")),
                    "references": datasets.Value("int64"),
                }
            ),
        )

    def _compute(self, predictions, references, ks=(1, 5)):
        scores = torch.tensor(predictions, dtype=torch.float32)
        labels = torch.tensor(references, dtype=torch.long)
        ranks = best_positive_ranks(scores, labels)
        return classification_accuracy_from_ranks(ranks, labels, scores.shape[1], ks)
