"""Train a small CLIP on the synthetic world: the demo's stand-in for ``openai/clip-vit-base-patch32``.

The teacher is a plain transformers ``CLIPModel`` (ViT image tower, text transformer with a 32-token
context standing in for CLIP's 77) trained contrastively on the English short captions of the whole world
(``teacher-train``), with a CLIP byte-level BPE tokenizer trained on those captions only. It is saved as a
normal Hugging Face CLIP folder (``CLIPModel``, ``CLIPProcessor``, ``CLIPTextModelWithProjection``,
``CLIPVisionModelWithProjection`` all load it), so everything downstream treats it like a real checkpoint.

:func:`train_teacher` is cached: a finished folder of the same (world, teacher config) hash is reused. Its loss is
stage 2's symmetric InfoNCE (`training.losses.ContrastiveLoss`); `scores.clip_zeroshot_top1` scores a teacher folder.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm.auto import tqdm
from transformers import (
    CLIPConfig,
    CLIPImageProcessorPil,
    CLIPModel,
    CLIPProcessor,
)
from transformers.utils.constants import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

from ..training.bpe import train_tokenizer
from ..training.losses import ContrastiveLoss
from .world import COMPLETE_MARKER as WORLD_COMPLETE_MARKER
from .precision import native_bf16
from .world import read_metadata, world_is_complete
from .worlds import load_world_config

# Bump when training changes in a way that should invalidate cached teachers.
TEACHER_FORMAT_VERSION = 3  # 2: deterministic BPE merges (`training.bpe.learn_bpe_merges`); 3: the loss is `ContrastiveLoss`

COMPLETE_MARKER = ".teacher-complete"
INFO_FILE = "teacher_info.json"

@dataclass
class TeacherConfig:
    """Architecture and training recipe of the synthetic-world teacher CLIP.

    Args:
        patch_size / vision_* : ViT image tower (the image size comes from the world).
        text_* : text transformer; ``max_text_length`` is its context (CLIP's 77 scaled down to 32).
        projection_dim: size of the joint embedding space (D).
        vocab_size: target size of the BPE vocabulary trained on the English short captions.
        steps / batch_size / lr / warmup_steps / weight_decay / betas / eps / grad_clip: AdamW with linear
            warmup then cosine decay to ``min_lr_ratio * lr``; no weight decay on biases, norms, embeddings
            and the logit scale.
        logit_scale_init: initial ``log`` temperature (CLIP: ``ln(1/0.07)``), clamped to ``[0, ln 100]``.
        bf16: run forward and backward under bfloat16 autocast on CPU (measured 2-3x faster per step than
            fp32 at these sizes on a CPU with native bfloat16; the loss, the weights and the optimiser stay in fp32).
            True in the default recipe, the released teacher's; `quick()` follows `precision.native_bf16`.
        shift: random translation of training images by up to this many pixels (0: off).
        seed: initialisation and batch order.
    """

    patch_size: int = 16
    vision_hidden_size: int = 128
    vision_layers: int = 4
    vision_heads: int = 4
    vision_intermediate_size: int = 512
    text_hidden_size: int = 128
    text_layers: int = 2
    text_heads: int = 4
    text_intermediate_size: int = 512
    projection_dim: int = 64
    max_text_length: int = 32
    vocab_size: int = 1024
    steps: int = 3000
    batch_size: int = 256
    lr: float = 2e-3
    min_lr_ratio: float = 0.0
    warmup_steps: int = 100
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-6
    grad_clip: float = 1.0
    logit_scale_init: float = math.log(1 / 0.07)
    bf16: bool = True
    shift: int = 4
    seed: int = 0

    def __post_init__(self):
        self.betas = tuple(self.betas)

    @classmethod
    def quick(cls, **overrides) -> "TeacherConfig":
        """A teacher for ``WorldConfig.quick()`` that trains in well under a minute on 2 CPU cores."""
        values = dict(vision_hidden_size=64, vision_layers=2, vision_heads=2, vision_intermediate_size=256,
                      text_hidden_size=64, text_layers=2, text_heads=2, text_intermediate_size=256,
                      patch_size=8, projection_dim=32, vocab_size=512, steps=400, batch_size=128, warmup_steps=30,
                      shift=2, bf16=native_bf16())
        values.update(overrides)
        return cls(**values)

    @classmethod
    def fashion(cls, quick: bool = False, **overrides) -> "TeacherConfig":
        """The teacher of the Fashion-MNIST world: 7 x 7 patches of its 28 x 28 photos (16 tokens, as the synthetic
        world's 64 px / 16), a vocabulary for its few hundred caption words, float32 (bfloat16 autocast is emulated,
        ten times slower, on CPUs without native bfloat16, such as the AMD EPYC this recipe was sized on); `quick`:
        `quick()`'s small towers."""
        values = dict(patch_size=7, vocab_size=512, steps=1200, batch_size=128, shift=2, bf16=False)
        if quick:
            values.update(steps=150)
            return cls.quick(**{**values, **overrides})
        values.update(overrides)
        return cls(**values)

    def to_dict(self) -> dict:
        return json.loads(json.dumps(dataclasses.asdict(self)))


def teacher_hash(world_dir: str | Path, config: TeacherConfig) -> str:
    """Identity of a teacher: the world it is trained on and its config."""
    world_hash = (Path(world_dir) / WORLD_COMPLETE_MARKER).read_text().strip()
    payload = json.dumps({"format": TEACHER_FORMAT_VERSION, "world": world_hash, **config.to_dict()},
                         sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def teacher_is_complete(out_dir: str | Path, expected_hash: str | None = None) -> bool:
    marker = Path(out_dir) / COMPLETE_MARKER
    if not marker.is_file():
        return False
    return expected_hash is None or marker.read_text().strip() == expected_hash


# ------------------------------------------------------------------------------------------- building


def image_processor_for(image_size: int):
    """OpenAI-style CLIP preprocessing at the world's image size (resize + centre crop + OpenAI mean/std)."""
    return CLIPImageProcessorPil(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size},
        image_mean=list(OPENAI_CLIP_MEAN), image_std=list(OPENAI_CLIP_STD), resample=Image.Resampling.BICUBIC,
    )


def build_clip_config(config: TeacherConfig, image_size: int, tokenizer):
    text = dict(vocab_size=len(tokenizer), hidden_size=config.text_hidden_size,
                num_hidden_layers=config.text_layers, num_attention_heads=config.text_heads,
                intermediate_size=config.text_intermediate_size, max_position_embeddings=config.max_text_length,
                projection_dim=config.projection_dim, bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    vision = dict(image_size=image_size, patch_size=config.patch_size, hidden_size=config.vision_hidden_size,
                  num_hidden_layers=config.vision_layers, num_attention_heads=config.vision_heads,
                  intermediate_size=config.vision_intermediate_size, projection_dim=config.projection_dim)
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=config.projection_dim,
                      logit_scale_init_value=config.logit_scale_init)


def _pixel_tensor(paths: list[str]) -> torch.Tensor:
    """uint8 (N, 3, H, W) images."""
    return torch.from_numpy(np.stack([np.asarray(Image.open(p).convert("RGB")) for p in paths])).permute(0, 3, 1, 2)


def normalise_pixels(images_uint8: torch.Tensor) -> torch.Tensor:
    """What the saved ``CLIPImageProcessor`` does to an image already at the model's size."""
    mean = torch.tensor(OPENAI_CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(OPENAI_CLIP_STD).view(1, 3, 1, 1)
    return (images_uint8.float() / 255.0 - mean) / std


def _random_shift(images: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """Translate each image by up to ``max_shift`` pixels, filling with its own border (edge padding)."""
    n, _, h, w = images.shape
    padded = F.pad(images, (max_shift,) * 4, mode="replicate")
    offsets = torch.randint(0, 2 * max_shift + 1, (n, 2), generator=generator)
    return torch.stack([padded[i, :, dy:dy + h, dx:dx + w] for i, (dy, dx) in enumerate(offsets.tolist())])


def _param_groups(model, weight_decay: float):
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.ndim < 2 or "embedding" in name or "logit_scale" in name:
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


# ------------------------------------------------------------------------------------------- training


def fit_teacher(world_dir: str | Path, config: TeacherConfig, progress: bool = True):
    """Train a teacher CLIP in memory; returns ``(model, tokenizer, log)``. :func:`train_teacher` wraps this
    with caching and saving."""
    world = load_world_config(world_dir)
    rows = read_metadata(world_dir, "teacher-train")
    captions = [row["caption_short"] for row in rows]
    images = _pixel_tensor([row["image_path"] for row in rows])
    tokenizer = train_tokenizer(captions, config.vocab_size, config.max_text_length)
    tokens = tokenizer(captions, padding="max_length", truncation=True, max_length=config.max_text_length,
                       return_tensors="pt")

    torch.manual_seed(config.seed)
    model = CLIPModel(build_clip_config(config, world.image_size, tokenizer))
    # On CPU, eager attention under bf16 autocast trains several times faster than SDPA, whose CPU backward
    # dominates the step at these sizes. Nothing of this is saved: the folder loads with the default.
    model.set_attn_implementation("eager")
    model.train()
    optimizer = torch.optim.AdamW(_param_groups(model, config.weight_decay), lr=config.lr, betas=config.betas,
                                  eps=config.eps)

    def lr_factor(step):
        if step < config.warmup_steps:
            return (step + 1) / config.warmup_steps
        t = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
        return config.min_lr_ratio + (1 - config.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    contrastive_loss = ContrastiveLoss(rank=0, world_size=1)  # one process: the teacher trains on one machine
    generator = torch.Generator().manual_seed(config.seed)
    order, cursor = torch.randperm(len(rows), generator=generator), 0
    losses = []
    bar = tqdm(range(config.steps), desc="teacher CLIP", disable=not progress)
    for step in bar:
        if cursor + config.batch_size > len(order):
            order, cursor = torch.randperm(len(rows), generator=generator), 0
        idx = order[cursor:cursor + config.batch_size]
        cursor += config.batch_size
        batch_images = images[idx]
        if config.shift:
            batch_images = _random_shift(batch_images, config.shift, generator)
        # Trim the batch to its longest caption: the model's context stays max_text_length.
        attention_mask = tokens["attention_mask"][idx]
        length = int(attention_mask.sum(1).max())
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=config.bf16):
            image_embeds = model.get_image_features(pixel_values=normalise_pixels(batch_images)).pooler_output
            text_embeds = model.get_text_features(input_ids=tokens["input_ids"][idx, :length],
                                                  attention_mask=attention_mask[:, :length]).pooler_output
        loss = contrastive_loss(image_embeds, text_embeds, model.logit_scale)["loss"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        optimizer.step()
        scheduler.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        losses.append(loss.item())
        if step % 10 == 0 or step == config.steps - 1:
            bar.set_postfix(loss=f"{np.mean(losses[-10:]):.3f}", scale=f"{model.logit_scale.exp().item():.1f}")
    bar.close()
    model.eval()
    log = {
        "parameters": sum(p.numel() for p in model.parameters()),
        "train_images": len(rows),
        "final_loss": round(float(np.mean(losses[-20:])), 4),
        "loss_every_100_steps": [round(float(np.mean(losses[i:i + 100])), 4) for i in range(0, len(losses), 100)],
    }
    return model, tokenizer, log


def train_teacher(world_dir: str | Path, out_dir: str | Path, config: TeacherConfig | None = None,
                  progress: bool = True, num_threads: int | None = 1) -> Path:
    """Train the teacher CLIP on ``world_dir``'s ``teacher-train`` split and save it to ``out_dir`` as a
    Hugging Face CLIP folder (model, ``CLIPProcessor``, ``teacher_info.json``). Returns ``out_dir``.

    Cached: if ``out_dir`` holds a finished teacher of the same world and config, it is returned untouched.
    The folder is built next to ``out_dir`` and moved into place when complete, so an interrupted run never
    leaves a half-written teacher behind. ``num_threads`` sets torch's CPU threads for the run (restored
    afterwards; ``None`` keeps torch's setting). The default is 1: these matrices are small, and on 2 cores
    shared with other jobs two threads were measured 4-7x slower than one (they spin waiting for each other).
    """
    config = config or TeacherConfig()
    world_dir, out = Path(world_dir), Path(out_dir)
    if not world_is_complete(world_dir):
        raise FileNotFoundError(f"{world_dir} is not a complete synthetic world; run write_world first")
    expected = teacher_hash(world_dir, config)
    if teacher_is_complete(out, expected):
        return out
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} exists and is not a finished teacher of this world and config "
                              f"(hash {expected}); choose another folder or delete it")

    started, cpu_started = time.perf_counter(), time.process_time()
    previous_threads = torch.get_num_threads()
    if num_threads:
        torch.set_num_threads(num_threads)
    try:
        model, tokenizer, log = fit_teacher(world_dir, config, progress)
    finally:
        torch.set_num_threads(previous_threads)
    log["train_seconds"] = round(time.perf_counter() - started, 1)
    log["train_cpu_seconds"] = round(time.process_time() - cpu_started, 1)
    log["threads"] = num_threads or previous_threads

    partial = out.with_name(out.name + ".partial")
    if partial.exists():
        shutil.rmtree(partial)
    model.save_pretrained(partial)
    image_size = load_world_config(world_dir).image_size
    CLIPProcessor(image_processor=image_processor_for(image_size), tokenizer=tokenizer).save_pretrained(partial)
    info = {"teacher_hash": expected, "world_hash": (world_dir / WORLD_COMPLETE_MARKER).read_text().strip(),
            "config": config.to_dict(), **log}
    (partial / INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")
    (partial / COMPLETE_MARKER).write_text(expected + "\n")
    if out.exists():
        out.rmdir()  # empty, checked above
    partial.rename(out)
    return out

