"""Dataset images for training and evaluation: decode one value with the one image opener, and transform it like CLIP.

`decode_image` reads a dataset image value (left undecoded by the loader, `data.py`) where it is used, so a corrupt
file is one skipped sample. `CLIPImageTransform` turns a PIL image into `pixel_values` with PIL and torch only: the
eval transform mirrors `CLIPImageProcessor` (resize the shortest side, center crop, rescale, normalise), the train
transform replaces resize + crop by RandomResizedCrop(scale 0.9-1.0, bicubic). Size, mean and std come from the
model's processor.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import PIL.Image
import torch
from datasets.utils.file_utils import xopen

from modeling_proclip import ImagePolicy, open_image, to_rgb

# Data images: local files and embedded bytes; remote files are read by `datasets` (`decode_image`), never fetched
# as URLs by the opener.
DATA_IMAGES = ImagePolicy(url_hosts=())


def decode_image(value: Any) -> PIL.Image.Image:
    """A dataset image value (`{"bytes", "path"}`, a path, bytes or a PIL image) -> a loaded RGB PIL image, read by
    the one image opener (`modeling_proclip.open_image`); remote paths (`hf://`, `https://`, ...) are read through
    `datasets`' fsspec opener, as `datasets.Image` decodes them.

    Raises `UnreadableImage` (an `OSError`) for a missing file or undecodable bytes, `ValueError` for no image.
    """
    if isinstance(value, Mapping):
        value = value.get("bytes") if value.get("bytes") is not None else value.get("path")
    if value is None:
        raise ValueError("no image")
    if isinstance(value, str) and "://" in value:
        with xopen(value, "rb") as f:
            return open_image(f.read(), DATA_IMAGES)
    return open_image(value, DATA_IMAGES)


def _size_field(size, key):
    return size.get(key) if isinstance(size, Mapping) else getattr(size, key, None)


class CLIPImageTransform:
    """PIL image -> `pixel_values` (3, H, W) float32, configured from a `CLIPImageProcessor`.

    Eval (`train=False`): convert to RGB, resize so the shortest side is `size["shortest_edge"]` (bicubic, long side
    `int(size * long / short)`), center crop to `crop_size`, rescale and normalise with the processor's mean / std:
    the same numbers the processor gives. Train: convert to RGB, RandomResizedCrop to `crop_size` (area `scale`,
    aspect `ratio`, bicubic; torchvision's sampling, drawn from the given `torch.Generator`), rescale, normalise.

    Args:
        image_processor: the model's image processor (`ProCLIPProcessor.image_processor`), or any object with
            `size`, `crop_size`, `image_mean`, `image_std`, `rescale_factor`, `resample`.
        train: random crop (train) or resize + center crop (eval).
        scale, ratio: RandomResizedCrop's area fraction and aspect-ratio ranges.
    """

    def __init__(
        self,
        image_processor,
        train: bool = True,
        scale: tuple[float, float] = (0.9, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
    ):
        self.train = train
        self.scale = tuple(scale)
        self.ratio = tuple(ratio)
        p = image_processor
        size, crop = getattr(p, "size", None), getattr(p, "crop_size", None)
        self.shortest_edge = _size_field(size, "shortest_edge") if size is not None else None
        self.resize_hw = (_size_field(size, "height"), _size_field(size, "width")) if size is not None else None
        self.do_resize = getattr(p, "do_resize", True)
        self.do_center_crop = getattr(p, "do_center_crop", True) and crop is not None
        if self.do_center_crop:
            self.output_hw = (_size_field(crop, "height"), _size_field(crop, "width"))
        elif self.resize_hw is not None and None not in self.resize_hw:
            self.output_hw = self.resize_hw
        else:
            self.output_hw = (self.shortest_edge, self.shortest_edge)
        self.resample = PIL.Image.Resampling(int(getattr(p, "resample", PIL.Image.Resampling.BICUBIC)))
        self.rescale_factor = float(getattr(p, "rescale_factor", 1 / 255)) if getattr(p, "do_rescale", True) else 1.0
        do_normalize = getattr(p, "do_normalize", True)
        mean = getattr(p, "image_mean", None) if do_normalize else None
        std = getattr(p, "image_std", None) if do_normalize else None
        self.mean = torch.tensor(mean if mean is not None else [0.0] * 3, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(std if std is not None else [1.0] * 3, dtype=torch.float32).view(-1, 1, 1)

    def __call__(self, image: PIL.Image.Image, generator: torch.Generator | None = None) -> torch.Tensor:
        image = to_rgb(image)
        height, width = self.output_hw
        if self.train:
            top, left, h, w = self.random_resized_crop_box(image.width, image.height, generator)
            image = image.crop((left, top, left + w, top + h)).resize((width, height), self.resample)
        else:
            if self.do_resize:
                image = image.resize(self._resized_size(image.width, image.height), self.resample)
            if self.do_center_crop:
                top, left = (image.height - height) // 2, (image.width - width) // 2
                image = image.crop((left, top, left + width, top + height))
        pixels = torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1).float()
        return (pixels * self.rescale_factor - self.mean) / self.std

    def _resized_size(self, width: int, height: int) -> tuple[int, int]:
        """(width, height) after resizing, as `transformers.image_transforms.get_resize_output_image_size`."""
        if self.shortest_edge:
            short, long = (width, height) if width <= height else (height, width)
            new_short, new_long = self.shortest_edge, int(self.shortest_edge * long / short)
            return (new_short, new_long) if width <= height else (new_long, new_short)
        return self.resize_hw[1], self.resize_hw[0]

    def random_resized_crop_box(
        self, width: int, height: int, generator: torch.Generator | None = None
    ) -> tuple[int, int, int, int]:
        """(top, left, height, width) of a random crop, sampled as `torchvision.transforms.RandomResizedCrop`."""
        area = height * width
        log_ratio = (math.log(self.ratio[0]), math.log(self.ratio[1]))
        for _ in range(10):
            target_area = area * torch.empty(1).uniform_(*self.scale, generator=generator).item()
            aspect = math.exp(torch.empty(1).uniform_(*log_ratio, generator=generator).item())
            w = int(round(math.sqrt(target_area * aspect)))
            h = int(round(math.sqrt(target_area / aspect)))
            if 0 < w <= width and 0 < h <= height:
                top = int(torch.randint(0, height - h + 1, (1,), generator=generator))
                left = int(torch.randint(0, width - w + 1, (1,), generator=generator))
                return top, left, h, w
        in_ratio = width / height  # fallback: the largest center crop within the aspect-ratio range
        if in_ratio < min(self.ratio):
            w, h = width, int(round(width / min(self.ratio)))
        elif in_ratio > max(self.ratio):
            w, h = int(round(height * max(self.ratio))), height
        else:
            w, h = width, height
        return (height - h) // 2, (width - w) // 2, h, w


__all__ = ["DATA_IMAGES", "CLIPImageTransform", "decode_image"]
