"""The embedding service (`modeling_proclip/embedding_proclip.py`): order, batching, unreadable inputs, padding
sides, and the generators the embedding cache runs in lockstep."""

import io

import pytest
import torch
from PIL import Image

from modeling_proclip import (
    UnreadableImage,
    embed_images,
    embed_in_batches,
    embed_texts,
    image_embedder,
    iter_text_batches,
    longest_first,
    text_embedder,
)

CAPTIONS = ["a dog", "two blue squares on the left of a small green triangle", "", "a red circle", "x" * 300]


def test_longest_first_orders_by_characters_and_keeps_ties_in_order():
    assert longest_first(["bb", "a", "dddd", "cc", "eee"]) == [2, 4, 0, 3, 1]
    assert longest_first([]) == []


def test_batches_come_back_in_input_order_with_unreadable_inputs_counted():
    seen = []

    def embed_batch(values):
        seen.append(len(values))
        return torch.tensor(values, dtype=torch.float64)[:, None].repeat(1, 2)

    def read(value):
        if value < 0:
            raise UnreadableImage(f"{value} is negative")
        return value

    items = [3, -1, 5, 0, -7, 2, 9]
    result = embed_in_batches(items, embed_batch, batch_size=2, order=[6, 5, 4, 3, 2, 1, 0], read=read,
                              skip_unreadable=True)
    assert result.kept == [0, 2, 3, 5, 6] and set(result.unreadable) == {1, 4}
    assert "-7 is negative" in result.unreadable[4]
    assert result.embeds.dtype == torch.float32 and result.embeds[:, 0].tolist() == [3, 5, 0, 2, 9]
    assert seen == [2, 1, 1, 1]  # batches of two, the unreadable left out of theirs
    with pytest.raises(UnreadableImage, match="-1 is negative"):
        embed_in_batches(items, embed_batch, read=read)
    with pytest.raises(UnreadableImage, match="none of the 2 inputs"):
        embed_in_batches([-1, -2], embed_batch, read=read, skip_unreadable=True)
    with pytest.raises(ValueError, match="list of items is empty"):
        embed_in_batches([], embed_batch)
    with pytest.raises(ValueError, match="batch_size must be positive"):
        embed_in_batches(items, embed_batch, batch_size=0)


def test_texts_embed_alike_in_any_batch_size_and_padding_side(model, processor):
    tokenizer = processor.tokenizer
    with torch.inference_mode():
        one_by_one = torch.cat([model.get_text_features(**processor(text=[text])).pooler_output for text in CAPTIONS])
    for side in ("right", "left"):
        tokenizer.padding_side = side
        for batch_size in (1, 2, 32):
            got = embed_texts(CAPTIONS, tokenizer, text_embedder(model), batch_size=batch_size)
            torch.testing.assert_close(got, one_by_one, atol=1e-5, rtol=1e-5)
    tokenizer.padding_side = model.config.padding_side or "right"
    # The LLM's pooled states (what the cache stores) go through the same loop with another callable.
    pooled = embed_texts(CAPTIONS, tokenizer, model.get_llm_embeddings, batch_size=2)
    torch.testing.assert_close(model.text_adapter(pooled), one_by_one, atol=1e-5, rtol=1e-5)


def test_generators_in_lockstep_leave_grad_mode_alone(model, processor):
    """The embedding cache zips the text tower's and the teacher's batches; neither may leave inference mode on."""
    embed = text_embedder(model)
    pairs = zip(iter_text_batches(CAPTIONS, processor.tokenizer, embed, batch_size=2),
                iter_text_batches(CAPTIONS, processor.tokenizer, embed, batch_size=2))
    for first, second in pairs:
        assert first.indices == second.indices
        assert not torch.is_inference_mode_enabled()
    assert not torch.is_inference_mode_enabled() and torch.is_grad_enabled()


def test_images_open_a_batch_at_a_time_and_unreadable_ones_are_skipped(model, processor, tmp_path):
    red, blue = Image.new("RGB", (20, 16), (200, 30, 30)), Image.new("RGBA", (16, 20), (30, 30, 200, 90))
    path = tmp_path / "blue.png"
    blue.save(path)
    buffer = io.BytesIO()
    red.save(buffer, format="PNG")
    sources = [buffer.getvalue(), b"not an image", str(path), str(tmp_path / "missing.png")]
    result = embed_images(sources, processor.image_processor, image_embedder(model), batch_size=2, skip_unreadable=True)
    with torch.inference_mode():
        expected = model.get_image_features(processor(images=[red, blue])["pixel_values"]).pooler_output
    assert result.kept == [0, 2] and set(result.unreadable) == {1, 3}
    torch.testing.assert_close(result.embeds, expected, atol=1e-5, rtol=1e-5)
