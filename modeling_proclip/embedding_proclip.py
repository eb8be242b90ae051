"""The one embedding loop of ProCLIP: texts or images in, `(N, D)` float32 embeddings out, in the order given.

Shipped as is inside every exported checkpoint folder (Hub remote code, beside `modeling_proclip.py`, whose
`encode_text` / `encode_image` call it): it imports only `images_proclip`, the standard library, torch and
transformers. Every caller embeds through it, as sentence-transformers' evaluators all call `model.encode`: the
model's `encode_text` / `encode_image`, evaluation, any text tower as an embedder, the embedding cache, the Space and
the demo's scores. What differs between them is only the callable that embeds one batch.

- `iter_embedded_batches(items, embed_batch, ...)`: the loop. Batches taken in a given order, in inference mode
  (bfloat16 autocast on request), one progress bar, each input read by an optional `read` (an image opener) whose
  failures are skipped and counted instead of ending the run when asked.
- `collect(batches)` / `embed_in_batches(...)`: the loop's batches put back in input order (`Embedded`:
  embeddings, kept indices, why the others were skipped).
- `iter_text_batches` / `embed_texts(texts, tokenizer, embed_tokens, ...)`: the text path. Texts are tokenised in
  one call (truncated at the tokenizer's `model_max_length`), taken longest first (`longest_first`) so similar
  lengths share a batch, padded per batch by `tokenizer.pad` (either padding side: the towers follow the attention
  mask), and given to `embed_tokens(input_ids, attention_mask) -> (B, D)`: a ProCLIP model's `get_text_features`, its
  pooled LLM states (`get_llm_embeddings`), a bare text tower, a CLIP text encoder.
- `embed_images(sources, image_processor, embed_pixels, ...)`: the image path. Sources are opened a batch at a time
  (`images_proclip.open_image`, or the caller's `read`), turned into `pixel_values` by the image processor and given
  to `embed_pixels(pixel_values) -> (B, D)`.
"""

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from transformers.utils.logging import tqdm

from .images_proclip import UnreadableImage, open_image


@dataclass
class EmbeddedBatch:
    """One batch from `iter_embedded_batches`.

    Attributes:
        indices: the input indices embedded, in the order of `embeds`' rows.
        embeds (`torch.Tensor` of shape `(len(indices), D)`, float32), or `None` when no input of the batch was read.
        unreadable: input index -> why it was skipped (`read` failed).
    """

    indices: list[int]
    embeds: torch.Tensor | None
    unreadable: dict[int, str] = field(default_factory=dict)


@dataclass
class Embedded:
    """Embeddings in input order.

    Attributes:
        embeds (`torch.Tensor` of shape `(len(kept), D)`, float32): one row per kept input, in input order.
        kept: the indices of the inputs embedded (all of them unless unreadable ones were skipped), ascending.
        unreadable: input index -> why it was skipped.
    """

    embeds: torch.Tensor
    kept: list[int]
    unreadable: dict[int, str]


def longest_first(texts: Sequence[str]) -> list[int]:
    """Indices of `texts`, longest first by characters (sentence-transformers' order; ties keep their order).

    Texts of similar length share a batch, so little padding is computed, and the largest batch comes first, so an
    out-of-memory error shows at once. Characters rather than tokens: the order fixes which captions share a batch,
    and a batch's padding shifts bfloat16 results, so one rule for every caller keeps cached and recomputed
    embeddings equal.
    """
    return sorted(range(len(texts)), key=lambda index: -len(texts[index]))


def _check(count: int, batch_size: int, unit: str) -> None:
    if count == 0:
        raise ValueError(f"Nothing to embed: the list of {unit}s is empty.")
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive; got {batch_size}")


def iter_embedded_batches(
    items: Sequence,
    embed_batch: Callable[[list], torch.Tensor],
    batch_size: int = 32,
    order: Sequence[int] | None = None,
    read: Callable | None = None,
    skip_unreadable: bool = False,
    device: torch.device | str = "cpu",
    bf16: bool = False,
    progress: bool = False,
    unit: str = "item",
) -> Iterator[EmbeddedBatch]:
    """`embed_batch` over `items` in batches of `batch_size` taken in `order` (default: as given), in inference mode.

    Args:
        items: the inputs (any sequence).
        embed_batch: a list of (read) inputs -> `(B, D)` embeddings.
        read: applied to each input first (e.g. an image opener); with `skip_unreadable`, an input it fails on
            (`OSError` or `ValueError`, which `UnreadableImage` is) is left out and reported, else the error ends the
            loop.
        device: where `embed_batch` computes (the bfloat16 autocast's device type).
        bf16: run `embed_batch` under bfloat16 autocast.
        progress: show one tqdm bar over the inputs, named `unit`.
    Yields:
        `EmbeddedBatch` per batch, its embeddings float32.
    """
    _check(len(items), batch_size, unit)
    order = range(len(items)) if order is None else order
    device_type = torch.device(device).type
    # Inference mode is entered per batch, never held across a `yield`: two of these generators run in lockstep (the
    # embedding cache's text tower and teacher), and a mode held by each would be restored out of order.
    with tqdm(total=len(items), unit=unit, disable=not progress) as bar:
        for start in range(0, len(order), batch_size):
            indices, inputs, unreadable = [], [], {}
            for index in order[start : start + batch_size]:
                try:
                    inputs.append(items[index] if read is None else read(items[index]))
                except (OSError, ValueError) as error:
                    if not skip_unreadable:
                        raise
                    unreadable[index] = f"{type(error).__name__}: {error}"
                    continue
                indices.append(index)
            embeds = None
            if inputs:
                with torch.inference_mode(), torch.autocast(device_type, dtype=torch.bfloat16, enabled=bf16):
                    embeds = embed_batch(inputs).float()
            bar.update(len(indices) + len(unreadable))
            yield EmbeddedBatch(indices, embeds, unreadable)


def collect(batches: Iterable[EmbeddedBatch], count: int) -> Embedded:
    """The embedded batches of `count` inputs put back in input order.

    Raises:
        UnreadableImage: every input was unreadable (skipped), so there is nothing to return.
    """
    chunks, kept, unreadable = [], [], {}
    for batch in batches:
        if batch.embeds is not None:
            chunks.append(batch.embeds)
            kept.extend(batch.indices)
        unreadable.update(batch.unreadable)
    if not chunks:
        raise UnreadableImage(f"none of the {count} inputs could be read, e.g. {next(iter(unreadable.values()))}")
    embeds = torch.cat(chunks)
    if any(a > b for a, b in zip(kept, kept[1:])):  # batches came out of input order
        order = sorted(range(len(kept)), key=kept.__getitem__)
        embeds, kept = embeds[torch.tensor(order, device=embeds.device)], [kept[i] for i in order]
    return Embedded(embeds, kept, unreadable)


def embed_in_batches(items: Sequence, embed_batch: Callable[[list], torch.Tensor], **kwargs) -> Embedded:
    """`iter_embedded_batches(items, embed_batch, **kwargs)` collected in input order."""
    return collect(iter_embedded_batches(items, embed_batch, **kwargs), len(items))


def iter_text_batches(
    texts: Sequence[str],
    tokenizer,
    embed_tokens: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    batch_size: int = 32,
    device: torch.device | str = "cpu",
    bf16: bool = False,
    progress: bool = False,
) -> Iterator[EmbeddedBatch]:
    """Embed texts with any text tower, a batch at a time: tokenised in one call (truncated at the tokenizer's
    `model_max_length`), taken `longest_first`, padded per batch by `tokenizer.pad` (its `padding_side`).

    Args:
        texts: the texts.
        tokenizer: the tower's tokenizer.
        embed_tokens: `(input_ids, attention_mask)`, each `(B, L)` on `device` -> `(B, D)` embeddings.
        batch_size, device, bf16, progress: as in `iter_embedded_batches`.
    Yields:
        `EmbeddedBatch`es, longest texts first (the embedding cache writes them as they come).
    """
    _check(len(texts), batch_size, "text")
    token_ids = tokenizer(list(texts), truncation=True)["input_ids"]  # one call, in Rust

    def embed(batch: list[list[int]]) -> torch.Tensor:
        padded = tokenizer.pad({"input_ids": batch}, return_tensors="pt")
        return embed_tokens(padded["input_ids"].to(device), padded["attention_mask"].to(device))

    return iter_embedded_batches(
        token_ids, embed, batch_size=batch_size, order=longest_first(texts), device=device, bf16=bf16,
        progress=progress, unit="text",
    )


def embed_texts(texts: Sequence[str], tokenizer, embed_tokens, **kwargs) -> torch.Tensor:
    """`iter_text_batches(texts, tokenizer, embed_tokens, **kwargs)` collected: `(len(texts), D)` float32
    embeddings in the order of `texts`."""
    return collect(iter_text_batches(texts, tokenizer, embed_tokens, **kwargs), len(texts)).embeds


def embed_images(
    sources: Sequence,
    image_processor,
    embed_pixels: Callable[[torch.Tensor], torch.Tensor],
    batch_size: int = 32,
    read: Callable = open_image,
    skip_unreadable: bool = False,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
    bf16: bool = False,
    progress: bool = False,
) -> Embedded:
    """Embed images a batch at a time, in the order given.

    Args:
        sources: what `read` opens (by default anything `open_image` reads, with its default policy).
        image_processor: turns a list of PIL images into `pixel_values` (`(B, 3, H, W)`).
        embed_pixels: `pixel_values` on `device` in `dtype` -> `(B, D)` embeddings.
        read: opens one source (`functools.partial(open_image, policy=...)`, a dataset's decoder).
        skip_unreadable: leave out and report the sources `read` fails on, instead of raising.
    Returns:
        `Embedded`: `(K, D)` float32 embeddings of the K readable sources, their indices, why the others failed.
    """

    def embed(images: list) -> torch.Tensor:
        pixel_values = image_processor(images=images, return_tensors="pt")["pixel_values"]
        return embed_pixels(pixel_values.to(device=device, dtype=dtype))

    return embed_in_batches(
        sources, embed, batch_size=batch_size, read=read, skip_unreadable=skip_unreadable, device=device, bf16=bf16,
        progress=progress, unit="image",
    )


def text_embedder(model) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """`(input_ids, attention_mask) -> (B, D)`: a ProCLIP model's (or a stand-in's) unnormalised joint-space text
    embeddings, `get_text_features(...).pooler_output`, as `embed_texts` calls a tower."""

    def embed(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return model.get_text_features(input_ids=input_ids, attention_mask=attention_mask).pooler_output

    return embed


def image_embedder(model) -> Callable[[torch.Tensor], torch.Tensor]:
    """`pixel_values -> (B, D)`: a ProCLIP or CLIP model's unnormalised image embeddings,
    `get_image_features(...).pooler_output`, as `embed_images` calls a tower."""

    def embed(pixel_values: torch.Tensor) -> torch.Tensor:
        return model.get_image_features(pixel_values=pixel_values).pooler_output

    return embed


def finish_embeddings(embeds: torch.Tensor, normalize: bool, truncate_dim: int | None, to_numpy: bool, single: bool):
    """`(N, D)` embeddings as `encode_text` / `encode_image` return them: truncated, normalised, one row unwrapped."""
    if truncate_dim is not None:
        embeds = embeds[:, :truncate_dim]
    if normalize:
        embeds = F.normalize(embeds, dim=-1)
    if single:
        embeds = embeds[0]
    return embeds.cpu().numpy() if to_numpy else embeds


__all__ = [
    "Embedded",
    "EmbeddedBatch",
    "embed_images",
    "collect",
    "embed_in_batches",
    "embed_texts",
    "finish_embeddings",
    "image_embedder",
    "iter_embedded_batches",
    "iter_text_batches",
    "longest_first",
    "text_embedder",
]
