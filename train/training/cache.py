"""Embedding cache: the frozen LLM's pooled caption embeddings (and the stage-1 teacher's), computed once.

The LLM never trains (METHOD.md §2), so `model.get_llm_embeddings(caption)` is a fixed function of the caption:
`proclip embed` computes it once per distinct caption, and training reads it back instead of running the LLM.
The stage-1 teacher (CLIP's text encoder) is frozen too, so its embeddings can be stored beside.

Layout: a folder (by default `proclip_embedding_cache/` next to the data) of safetensors shards, each holding

    keys     uint8 (N, 32)   sha256 of the exact caption string (UTF-8): the row's caption, without storing it
    llm      (N, H)          `model.get_llm_embeddings` of the caption
    teacher  (N, D)          the teacher's `text_embeds` of the caption (optional)

and, in the safetensors metadata, the identity of the models that made them (`llm_identity`, `teacher_identity`,
JSON) and its sha256 (`llm_fingerprint`, `teacher_fingerprint`). The identity of the text tower is everything that
changes its output for a given caption: the text config, the tokenizer (vocabulary, normaliser, the installed
prompt template and instruction, length limit), pooling, bidirectional attention, instruction and suffix lengths,
`max_text_length`, and a sha256 of the LLM's weights. A cache whose identity differs from the model it is used with
is refused with the list of what differs: it would silently train on another model's embeddings.

Shards are written as valid safetensors files, but streamed row block by row block (the embeddings of 30M captions
do not fit in memory), and read back through a memory map, so a lookup touches only the rows it needs. Rows are
checked finite before they are written (`NonFiniteEmbeddingError` names the captions); shards are published whole
under names no other writer can clobber, carry a sha256 of their data, and are checked when opened (`shards.py`).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Sequence
from itertools import repeat
from pathlib import Path

import numpy as np
import torch

from modeling_proclip import iter_text_batches, longest_first

from .data import DataSpec
from .shards import (
    CACHE_FORMAT,
    CACHE_VERSION,
    KEY_SIZE,
    KEYS_TABLE,
    LLM_TABLE,
    TEACHER_TABLE,
    CorruptShardError,
    ShardWriter,
    StaleCacheError,
    open_shard,
    read_safetensors_header,
    remove_stale_temporaries,
)

DEFAULT_CACHE_FOLDER = "proclip_embedding_cache"
# How many offending captions a non-finite error quotes.
_QUOTED_CAPTIONS = 5

# Config fields that do not change what a text tower computes (bookkeeping, generation, special-token ids that the
# Trainer may realign with the tokenizer): left out of the identity so they cannot make a valid cache look stale.
_VOLATILE_CONFIG_KEYS = {
    "_name_or_path", "transformers_version", "architectures", "dtype", "torch_dtype", "use_cache", "return_dict",
    "output_hidden_states", "output_attentions", "pad_token_id", "bos_token_id", "eos_token_id", "id2label",
    "label2id", "problem_type", "chunk_size_feed_forward", "is_encoder_decoder", "tie_word_embeddings",
    "_attn_implementation", "_attn_implementation_autoset", "attn_implementation", "auto_map",
}


class NonFiniteEmbeddingError(ValueError):
    """A tower gave NaN or inf for some captions: such rows are never written to a cache."""


# ---------------------------------------------------------------------------------------------------------------------
# Identity
# ---------------------------------------------------------------------------------------------------------------------


def caption_key(caption: str) -> bytes:
    """The cache key of a caption: sha256 of its exact UTF-8 bytes (whitespace and case included)."""
    return hashlib.sha256(caption.encode("utf-8")).digest()


def weights_sha256(module: torch.nn.Module) -> str:
    """sha256 over every tensor of `module.state_dict()`: name, dtype, shape and raw bytes, in name order.

    Reads all the weights once (about 1-2 GB/s; ~10 s for an 8B model in bf16).
    """
    digest = hashlib.sha256()
    state = module.state_dict()
    for name in sorted(state):
        tensor = state[name].detach()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        data = tensor.to("cpu").contiguous().reshape(-1)
        if data.numel():
            digest.update(data.view(torch.uint8).numpy().data)
    return digest.hexdigest()


def _config_identity(config) -> dict:
    values = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    return {key: values[key] for key in sorted(values) if key not in _VOLATILE_CONFIG_KEYS}


def tokenizer_identity(tokenizer) -> dict:
    """What makes a tokenizer turn a caption into ids: its class, length limit and full definition (hashed).

    For a fast tokenizer the definition is the `tokenizers` JSON (vocabulary, merges, normaliser, pre-tokeniser and
    the post-processor, where ProCLIP installs prompt templates), minus the padding/truncation state that every call
    resets. Padding side is left out: ProCLIP's pooling follows the attention mask, so it does not change embeddings.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        definition = json.loads(backend.to_str())
        definition.pop("padding", None)
        definition.pop("truncation", None)
    else:
        definition = {"vocab": sorted(tokenizer.get_vocab().items()), "special": tokenizer.special_tokens_map}
    blob = json.dumps(definition, sort_keys=True, ensure_ascii=False).encode("utf-8")
    return {
        "class": type(tokenizer).__name__,
        "model_max_length": int(min(tokenizer.model_max_length, 2**31 - 1)),
        "definition_sha256": hashlib.sha256(blob).hexdigest(),
    }


def text_tower_identity(model, tokenizer) -> dict:
    """Identity of a ProCLIP model's frozen text tower as the cache sees it (see the module docstring)."""
    config = model.config
    return {
        "kind": "proclip-llm",
        "text_config": _config_identity(config.text_config),
        "pooling": config.pooling,
        "bidirectional": config.bidirectional,
        "prompt_template": config.prompt_template,
        "instruction": config.instruction,
        "instruction_length": config.instruction_length,
        "text_suffix_length": config.text_suffix_length,
        "max_text_length": config.max_text_length,
        "tokenizer": tokenizer_identity(tokenizer),
        "weights_sha256": weights_sha256(model.text_model),
    }


def teacher_identity(teacher, tokenizer) -> dict:
    """Identity of a stage-1 teacher (`CLIPTextModelWithProjection`) and its tokenizer."""
    return {
        "kind": type(teacher).__name__,
        "config": _config_identity(teacher.config),
        "tokenizer": tokenizer_identity(tokenizer),
        "weights_sha256": weights_sha256(teacher),
    }


def fingerprint(identity: dict) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode("utf-8")).hexdigest()


def identity_differences(cached: dict, current: dict, prefix: str = "") -> list[str]:
    """Human-readable list of the fields where two identities differ, e.g. `pooling: 'mean' (cache) vs 'cls' (now)`."""
    differences = []
    for key in sorted(set(cached) | set(current)):
        a, b = cached.get(key, "<missing>"), current.get(key, "<missing>")
        if isinstance(a, dict) and isinstance(b, dict):
            differences += identity_differences(a, b, f"{prefix}{key}.")
        elif a != b:
            differences.append(f"{prefix}{key}: {_short(a)} (cache) vs {_short(b)} (now)")
    return differences


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


# ---------------------------------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------------------------------


def shard_paths(folder: str | os.PathLike) -> list[Path]:
    folder = Path(folder)
    return sorted(folder.glob("*.safetensors")) if folder.is_dir() else []


class EmbeddingCache:
    """The shards of one cache folder, indexed by caption key.

    Open it with `EmbeddingCache(folder)`, then `validate(...)` it against the model (and teacher) it will be used
    with: `ProCLIPTrainer` does both. `lookup(captions)` returns the cached rows and which captions were found.

    Args:
        folder: a folder of shards written by `build_embedding_cache` / `proclip embed`.

    Raises:
        FileNotFoundError: the folder holds no shard.
        CorruptShardError: a shard is damaged (truncated, wrong dtype, checksum mismatch, NaN / inf; see `shards.py`).
        StaleCacheError: shards of the folder were made by different models (or teachers), or by another format.
    """

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        paths = shard_paths(self.folder)
        if not paths:
            raise FileNotFoundError(f"No embedding cache shard (*.safetensors) in {self.folder}.")
        self.shards = [open_shard(path) for path in paths]
        self.llm_identity = self._common_identity(LLM_TABLE)
        teacher_shards = [s for s in self.shards if TEACHER_TABLE in s.header]
        self.teacher_identity = self._common_identity(TEACHER_TABLE) if teacher_shards else None
        # The teacher table can be used only when every shard has it: a caption found in a shard without teacher
        # rows would need the teacher anyway.
        self.has_teacher = len(teacher_shards) == len(self.shards)
        self._build_index()

    def _common_identity(self, table: str) -> dict:
        identities = {}
        for shard in self.shards:
            if table in shard.header:
                identities.setdefault(shard.metadata[f"{table}_fingerprint"], (shard, shard.metadata[f"{table}_identity"]))
        if len(identities) > 1:
            (first, a), (second, b) = list(identities.values())[:2]
            raise StaleCacheError(
                f"The embedding cache {self.folder} mixes shards of different {table} models "
                f"({first.path.name} vs {second.path.name}: "
                + "; ".join(identity_differences(json.loads(a), json.loads(b))[:5])
                + "). Delete the stale shards or use another --cache-dir."
            )
        return json.loads(next(iter(identities.values()))[1])

    def _build_index(self) -> None:
        """Sort every shard's keys by their first 8 bytes, so a lookup is one `searchsorted`."""
        prefixes, shard_ids, rows = [], [], []
        for i, shard in enumerate(self.shards):
            keys = shard.array("keys")
            prefixes.append(np.ascontiguousarray(keys[:, :8]).view(">u8").reshape(-1).astype(np.uint64))
            shard_ids.append(np.full(shard.num_rows, i, dtype=np.int32))
            rows.append(np.arange(shard.num_rows, dtype=np.int64))
        prefixes, shard_ids, rows = np.concatenate(prefixes), np.concatenate(shard_ids), np.concatenate(rows)
        order = np.argsort(prefixes, kind="stable")
        self._prefixes, self._shard_ids, self._rows = prefixes[order], shard_ids[order], rows[order]

    def __len__(self) -> int:
        return int(self._prefixes.shape[0])

    def dim(self, table: str = LLM_TABLE) -> int:
        return self.shards[0].header[table]["shape"][1]

    def validate(self, llm_identity: dict, teacher_identity: dict | None = None) -> None:
        """Refuse (`StaleCacheError`) a cache made with another text tower, or with another teacher when one is given.

        A cache without teacher rows is fine with any teacher (the teacher then runs on the fly).
        """
        problems = []
        if fingerprint(self.llm_identity) != fingerprint(llm_identity):
            problems.append(("text tower", identity_differences(self.llm_identity, llm_identity)))
        if teacher_identity is not None and self.teacher_identity is not None:
            if fingerprint(self.teacher_identity) != fingerprint(teacher_identity):
                problems.append(("stage-1 teacher", identity_differences(self.teacher_identity, teacher_identity)))
        if problems:
            lines = [f"The embedding cache in {self.folder} was made with another model, so it is refused:"]
            for what, differences in problems:
                lines.append(f"  {what} differs in " + ("; ".join(differences[:8]) or "its fingerprint"))
            lines.append(
                "Re-run `proclip embed` with this model into a new --cache-dir (or delete the old cache), or train "
                "without it (--no_embedding_cache)."
            )
            raise StaleCacheError("\n".join(lines))

    def locate(self, captions: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """(shard index, row) of each caption; -1 for captions not in the cache."""
        shard_of = np.full(len(captions), -1, dtype=np.int64)
        row_of = np.full(len(captions), -1, dtype=np.int64)
        if not captions:
            return shard_of, row_of
        keys = [caption_key(c) for c in captions]
        wanted = np.frombuffer(b"".join(k[:8] for k in keys), dtype=">u8").astype(np.uint64)
        positions = np.searchsorted(self._prefixes, wanted, side="left")
        for i, (key, prefix, position) in enumerate(zip(keys, wanted, positions)):
            # Equal 8-byte prefixes of different captions are possible in principle: compare the whole key.
            while position < len(self._prefixes) and self._prefixes[position] == prefix:
                shard, row = int(self._shard_ids[position]), int(self._rows[position])
                if self.shards[shard].array("keys")[row].tobytes() == key:
                    shard_of[i], row_of[i] = shard, row
                    break
                position += 1
        return shard_of, row_of

    def lookup(self, captions: Sequence[str], table: str = LLM_TABLE) -> tuple[torch.Tensor, torch.Tensor]:
        """Cached rows of `table` for `captions`.

        Returns:
            `(embeddings, found)`: `(len(captions), dim)` float32 (zeros where not found) and a bool mask `(len,)`.
        """
        shard_of, row_of = self.locate(captions)
        out = torch.zeros(len(captions), self.dim(table), dtype=torch.float32)
        for s in np.unique(shard_of[shard_of >= 0]):
            where = np.nonzero(shard_of == s)[0]
            out[torch.from_numpy(where)] = self.shards[int(s)].rows(table, row_of[where]).float()
        return out, torch.from_numpy(shard_of >= 0)

    def __repr__(self) -> str:
        return f"EmbeddingCache({str(self.folder)!r}, rows={len(self)}, teacher={self.has_teacher})"


def default_cache_dir(data: str | os.PathLike) -> Path | None:
    """`proclip_embedding_cache/` in the folder holding the data; `None` for a Hub dataset."""
    root = DataSpec.parse(data).root
    return Path(root) / DEFAULT_CACHE_FOLDER if root is not None else None


# ---------------------------------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def build_embedding_cache(
    model,
    tokenizer,
    captions: Iterable[str],
    cache_dir: str | os.PathLike,
    teacher=None,
    teacher_tokenizer=None,
    batch_size: int = 64,
    dtype: torch.dtype = torch.float32,
    bf16: bool = False,
    rank: int = 0,
    world_size: int = 1,
    progress: bool = True,
) -> Path | None:
    """Embed every distinct caption not yet in `cache_dir` and write them as one new shard.

    Args:
        model: a `ProCLIPModel` (only its text tower runs), on the device to embed on.
        tokenizer: its tokenizer (`ProCLIPProcessor.tokenizer`); captions are cut at `config.max_text_length`.
        captions: the captions (repeats are embedded once).
        cache_dir: the cache folder; an existing cache there must have been made by the same model (and teacher).
        teacher, teacher_tokenizer: the stage-1 teacher (`CLIPTextModelWithProjection`), to store its embeddings too.
        batch_size: captions per forward pass (the embedding service's `longest_first`: similar lengths together).
        dtype: storage dtype (`float32`, `float16`, `bfloat16`).
        bf16: run the towers under bfloat16 autocast.
        rank, world_size: this process's share of the captions when several processes embed (one shard each).

    Returns:
        The new shard's path, or `None` when every caption was already cached. Processes embedding the same captions
        at once all return the one shard the first of them published (the others verified it and dropped theirs).

    Raises:
        NonFiniteEmbeddingError: a tower gave NaN or inf for some captions (named); nothing is written.
        CorruptShardError, StaleCacheError: the existing cache is damaged, or was made by another model.
        OSError: `ENOSPC` when the disk cannot hold the shard (found before embedding; nothing is left behind).
    """
    cache_dir = Path(cache_dir)
    model.eval()
    llm_identity = text_tower_identity(model, tokenizer)
    t_identity = teacher_identity(teacher, teacher_tokenizer) if teacher is not None else None
    if teacher is not None:
        teacher.eval()

    unique: dict[bytes, str] = {}
    for caption in captions:
        unique.setdefault(caption_key(caption), caption)
    if cache_dir.is_dir():
        remove_stale_temporaries(cache_dir)
    if shard_paths(cache_dir):
        existing = EmbeddingCache(cache_dir)
        existing.validate(llm_identity, t_identity)
        if teacher is not None and not existing.has_teacher:
            raise StaleCacheError(
                f"The cache in {cache_dir} has no teacher embeddings; embed into a new --cache-dir to add them."
            )
        cached, _ = existing.locate(list(unique.values()))
        unique = {key: caption for (key, caption), shard in zip(unique.items(), cached) if shard < 0}
    # Every process takes every world_size-th caption of the same key-sorted list: disjoint shares, whatever order
    # the captions came in. Its shard holds them longest first, in the batches they are embedded in.
    share = [caption for _, caption in sorted(unique.items())][rank::world_size]
    if not share:
        return None
    todo = [(caption_key(share[index]), share[index]) for index in longest_first(share)]

    tensors = {
        KEYS_TABLE: ((len(todo), KEY_SIZE), torch.uint8),
        LLM_TABLE: ((len(todo), model.config.text_hidden_size), dtype),
    }
    if teacher is not None:
        tensors[TEACHER_TABLE] = ((len(todo), teacher.config.projection_dim), dtype)
    metadata = {
        "format": CACHE_FORMAT,
        "version": CACHE_VERSION,
        "llm_fingerprint": fingerprint(llm_identity),
        "llm_identity": json.dumps(llm_identity, sort_keys=True),
        "autocast": "bf16" if bf16 else "none",
    }
    if teacher is not None:
        metadata["teacher_fingerprint"] = fingerprint(t_identity)
        metadata["teacher_identity"] = json.dumps(t_identity, sort_keys=True)
    content = hashlib.sha256(b"".join(key for key, _ in todo)).hexdigest()[:16]
    cache_dir.mkdir(parents=True, exist_ok=True)
    writer = ShardWriter(cache_dir / f"shard-{content}-{rank:05d}-of-{world_size:05d}.safetensors", tensors, metadata)
    try:
        keys = np.frombuffer(b"".join(key for key, _ in todo), dtype=np.uint8).reshape(-1, KEY_SIZE)
        writer.write_rows(KEYS_TABLE, 0, torch.from_numpy(keys.copy()))
        device = next(model.parameters()).device
        batches = iter_text_batches(share, tokenizer, model.get_llm_embeddings, batch_size, device, bf16, progress)
        teacher_batches = repeat(None)
        if teacher is not None:
            teacher_batches = iter_text_batches(share, teacher_tokenizer, teacher_text_embeds(teacher), batch_size,
                                                device, bf16)
        start = 0
        for batch, teacher_batch in zip(batches, teacher_batches):  # the same captions, batch for batch
            texts = [share[index] for index in batch.indices]
            writer.write_rows(LLM_TABLE, start, finite_rows(batch.embeds, dtype, texts, "the text tower"))
            if teacher_batch is not None:
                writer.write_rows(TEACHER_TABLE, start, finite_rows(teacher_batch.embeds, dtype, texts, "the teacher"))
            start += len(texts)
        return writer.publish()
    except BaseException:
        writer.abort()
        raise


def teacher_text_embeds(teacher):
    """`(input_ids, attention_mask) -> (B, D)`: the stage-1 teacher's (`CLIPTextModelWithProjection`) text embeddings,
    as the embedding service calls a text tower."""

    def embed(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return teacher(input_ids=input_ids, attention_mask=attention_mask).text_embeds

    return embed


def finite_rows(values: torch.Tensor, dtype: torch.dtype, captions: Sequence[str], tower: str) -> torch.Tensor:
    """`values` (B, dim) in the storage `dtype`, checked on their device after the cast (float16 overflows past
    65504).

    Raises:
        NonFiniteEmbeddingError: some rows hold NaN or inf; the message quotes their captions.
    """
    stored = values.detach().float().to(dtype)
    finite = torch.isfinite(stored).all(dim=1).cpu()
    if bool(finite.all()):
        return stored
    bad = [captions[i] for i in torch.nonzero(~finite).flatten().tolist()]
    quoted = ", ".join(repr(c if len(c) <= 80 else c[:77] + "...") for c in bad[:_QUOTED_CAPTIONS])
    more = f" and {len(bad) - _QUOTED_CAPTIONS} more" if len(bad) > _QUOTED_CAPTIONS else ""
    raise NonFiniteEmbeddingError(
        f"{tower} gave NaN or inf (stored as {str(dtype).removeprefix('torch.')}) for {len(bad)} of {len(captions)} "
        f"captions of a batch: {quoted}{more}. Nothing was written to the cache. Check the model's weights for "
        "NaN; float16 storage overflows past 65504 (use --dtype float32 or bfloat16); under --bf16 try without it."
    )


__all__ = [
    "CorruptShardError",
    "EmbeddingCache",
    "NonFiniteEmbeddingError",
    "StaleCacheError",
    "build_embedding_cache",
    "caption_key",
    "default_cache_dir",
    "fingerprint",
    "finite_rows",
    "read_safetensors_header",
    "teacher_identity",
    "text_tower_identity",
    "tokenizer_identity",
    "weights_sha256",
]
