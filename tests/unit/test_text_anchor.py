"""Stage 2's text anchor (`--text_anchor_weight` mu): captions outside the image-text data, text only, pull the
adapter towards the outputs of the adapter stage 2 started from, and nothing else.

What is checked:
- the anchor term's gradient reaches the adapter and no other parameter (not the image tower, its projection or the
  logit scale), and is zero while the adapter still equals its start;
- trained at a high learning rate, the adapter's outputs on the anchor captions stay closer to its starting outputs
  with mu > 0 than with mu = 0 (measured distance), while the image tower moves either way;
- the anchor captions come from the embedding cache when it has them (counted hits), and the frozen starting adapter
  travels in Trainer checkpoints;
- misuse is refused: mu > 0 without anchor captions, or outside stage 2.
"""

import json

import pytest
import torch
import torch.nn.functional as F
from proclip_train.training.arguments import ProCLIPTrainingArguments
from proclip_train.training.cache import EmbeddingCache, build_embedding_cache
from proclip_train.training.stages import TEXT_ANCHOR_PREFIX, ContrastiveStage
from proclip_train.training.trainer import ProCLIPTrainer
from training_data import COLOURS, SHAPES, image_dataset, training_args

from modeling_proclip import ProCLIPModel

pytestmark = pytest.mark.usefixtures("one_thread")

ANCHOR_CAPTIONS = [f"a {size} {colour} {shape}" for size in ("small", "large") for colour in COLOURS for shape in SHAPES]


@pytest.fixture
def anchor_file(tmp_path):
    path = tmp_path / "anchor.jsonl"
    path.write_text("".join(json.dumps({"text": caption}) + "\n" for caption in ANCHOR_CAPTIONS))
    return path


def anchor_args(tmp_path, anchor_file, **overrides):
    values = dict(stage=2, distill_weight=0.0, text_anchor_weight=1.0, text_anchor_data=str(anchor_file),
                  text_anchor_caption_column="text", text_anchor_batch_size=16)
    return training_args(tmp_path, **{**values, **overrides})


def anchor_outputs(model, processor) -> torch.Tensor:
    """(N, D) normalised joint-space embeddings of every anchor caption through the model's current adapter."""
    batch = processor.tokenizer(ANCHOR_CAPTIONS, padding=True, return_tensors="pt")
    with torch.no_grad():
        return F.normalize(model.get_text_features(**batch).pooler_output, dim=-1)


def test_the_anchor_gradient_reaches_only_the_adapter(tmp_path, processor, tiny_proclip_dir, anchor_file):
    model = ProCLIPModel.from_pretrained(tiny_proclip_dir)
    trainer = ProCLIPTrainer(model, anchor_args(tmp_path, anchor_file), train_dataset=image_dataset(8),
                             processing_class=processor)
    stage = trainer.stage
    batch = trainer.data_collator([image_dataset(4)[i] for i in range(4)])
    assert len(batch[TEXT_ANCHOR_PREFIX + "captions"]) == 16
    assert set(batch[TEXT_ANCHOR_PREFIX + "captions"]) <= set(ANCHOR_CAPTIONS)

    at_start = stage.loss.text_anchor(*stage.text_anchor_embeddings(model, batch))
    assert at_start.item() == pytest.approx(0.0, abs=1e-10)  # the adapter is its own starting point

    with torch.no_grad():
        for parameter in model.text_adapter.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    model.zero_grad()
    stage.loss.text_anchor(*stage.text_anchor_embeddings(model, batch)).backward()
    moved = {name for name, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert moved and all(name.startswith("text_adapter.") for name in moved), moved
    assert {name for name, _ in model.text_adapter.named_parameters()} <= {n.removeprefix("text_adapter.") for n in moved}
    assert all(not p.requires_grad for p in stage.anchor_adapter.parameters())


def test_the_anchor_keeps_the_adapter_near_its_starting_outputs(tmp_path, processor, tiny_proclip_dir, anchor_file):
    data = image_dataset(32)

    def run(weight):
        model = ProCLIPModel.from_pretrained(tiny_proclip_dir)
        start, vision = anchor_outputs(model, processor), model.vision_model.state_dict()
        vision = {k: v.clone() for k, v in vision.items()}
        trainer = ProCLIPTrainer(model, anchor_args(tmp_path / str(weight), anchor_file, text_anchor_weight=weight,
                                                    max_steps=30, learning_rate=1e-2),
                                 train_dataset=data, processing_class=processor)
        trainer.train()
        drift = (1 - (anchor_outputs(model, processor) * start).sum(-1)).mean().item()
        image_moved = sum((v - vision[k]).pow(2).sum().item() for k, v in model.vision_model.state_dict().items())
        return drift, image_moved, trainer

    free, free_image, free_trainer = run(0.0)
    anchored, anchored_image, anchored_trainer = run(10.0)
    assert free > 0.05, free
    assert anchored < 0.3 * free, (anchored, free)
    assert free_image > 0 and anchored_image > 0  # the image tower trains either way
    assert "text_anchor" in anchored_trainer.last_components and "text_anchor" not in free_trainer.last_components


def test_anchor_captions_are_read_from_the_cache_and_the_start_is_checkpointed(
    tmp_path, processor, tiny_proclip_dir, anchor_file
):
    model = ProCLIPModel.from_pretrained(tiny_proclip_dir)
    data = image_dataset(8)
    cache_dir = tmp_path / "cache"
    build_embedding_cache(model, processor.tokenizer, [*ANCHOR_CAPTIONS, *data["caption"]], cache_dir, progress=False)
    trainer = ProCLIPTrainer(model, anchor_args(tmp_path, anchor_file, max_steps=2), train_dataset=data,
                             processing_class=processor, embedding_cache=EmbeddingCache(cache_dir))
    trainer.train()
    counts = trainer.report["embedding_cache"]
    assert counts[TEXT_ANCHOR_PREFIX + "llm_hits"] == 2 * 16 and counts[TEXT_ANCHOR_PREFIX + "llm_misses"] == 0

    state = trainer.stage.state_dict()
    assert state and all(key.startswith("anchor.") for key in state)  # lambda = 0: no EMA, only the anchor
    other = ContrastiveStage(anchor_args(tmp_path, anchor_file))
    other.setup(ProCLIPModel.from_pretrained(tiny_proclip_dir), torch.device("cpu"))
    other.load_state_dict(state)
    assert all(torch.equal(v, other.state_dict()[k]) for k, v in state.items())


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(stage=2, text_anchor_weight=1.0), "needs --text_anchor_data"),
        (dict(stage=1, text_anchor_weight=1.0, text_anchor_data="x.jsonl"), "stage-2 option"),
        (dict(stage=2, text_anchor_weight=-1.0), "must be >= 0"),
    ],
)
def test_misused_text_anchor_options_are_refused(overrides, message):
    with pytest.raises(ValueError, match=message):
        ProCLIPTrainingArguments(output_dir="unused", **overrides)
