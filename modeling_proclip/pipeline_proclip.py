"""ProCLIP's zero-shot image classification pipeline: transformers' own, with its inputs checked first.

Shipped as is inside every exported checkpoint folder (Hub remote code); saved folders name the class in
`config.json`'s `custom_pipelines` (`saving_proclip.CUSTOM_PIPELINES`), so `pipeline("zero-shot-image-classification",
model=folder_or_repo, trust_remote_code=True)` builds it. It imports only the standard library and transformers.
"""

from transformers import AutoProcessor, ZeroShotImageClassificationPipeline
from transformers.utils import logging

logger = logging.get_logger(__name__)


class ProCLIPZeroShotImageClassificationPipeline(ZeroShotImageClassificationPipeline):
    """transformers' zero-shot image classification pipeline, with its inputs checked first.

    Saved folders name it in `config.custom_pipelines`, so `pipeline("zero-shot-image-classification",
    model=folder_or_repo, trust_remote_code=True)` builds it. It refuses what the stock pipeline mis-handles: no
    candidate labels (an `IndexError` inside the tokenizer) and a hypothesis template without exactly one `{}` (every
    label would read the same text); a string of labels is split on commas, as the Hub's inference API does.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.tokenizer is None or self.image_processor is None:  # transformers 4.51 loads neither for remote code
            processor = AutoProcessor.from_pretrained(self.model.name_or_path, trust_remote_code=True)
            self.tokenizer = self.tokenizer or processor.tokenizer
            self.image_processor = self.image_processor or processor.image_processor

    def preprocess(self, image, candidate_labels=None, hypothesis_template="This is a photo of {}.", *args, **kwargs):
        labels = zero_shot_labels(candidate_labels, hypothesis_template)
        return super().preprocess(image, labels, hypothesis_template, *args, **kwargs)


def zero_shot_labels(candidate_labels, hypothesis_template: str) -> list[str]:
    """The candidate labels as a list (a string is split on commas), refused with a message when they or the template
    cannot classify."""
    if isinstance(candidate_labels, str):
        candidate_labels = [label.strip() for label in candidate_labels.split(",") if label.strip()]
    if not candidate_labels:
        raise ValueError("No candidate labels: pass at least one, e.g. candidate_labels=['a cat', 'a dog'].")
    if not all(isinstance(label, str) for label in candidate_labels):
        raise ValueError(f"Candidate labels must be strings; got {candidate_labels!r}.")
    if not isinstance(hypothesis_template, str) or hypothesis_template.count("{}") != 1:
        raise ValueError(
            f"hypothesis_template {hypothesis_template!r} must hold exactly one '{{}}', where each label goes, "
            "e.g. 'This is a photo of {}.'"
        )
    if len(candidate_labels) == 1:
        logger.warning(
            f"One candidate label ({candidate_labels[0]!r}): its score is 1.0 for any image (a softmax over one label); "
            "pass two or more labels to compare them."
        )
    return list(candidate_labels)


__all__ = ["ProCLIPZeroShotImageClassificationPipeline", "zero_shot_labels"]
