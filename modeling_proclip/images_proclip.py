"""The one image opener of ProCLIP: `open_image(source, policy)` for the model's `encode_image`, the Inference
Endpoints handler, the Space and the training / evaluation data.

Shipped as is inside every exported checkpoint folder (Hub remote code; the handler and the Space import it from
there): it imports only the standard library and PIL.

A source is a PIL image, a local path, an `http(s)://` URL, a `data:image/...;base64,` URI, a bare base64 string,
encoded bytes or a binary file object. An `ImagePolicy` says what may be read (local paths, which URL hosts) and how
large: the encoded size is checked before decoding, and the pixel count and longest side from the image header,
before the pixels are decoded (PIL opens lazily), so an oversized image costs no memory. The result is loaded, turned
upright by its EXIF orientation (as `datasets` and transformers' `load_image` do) and RGB, transparency composited on
white (as `CLIPImageProcessor` does).

Why not transformers' `load_image`: it decodes before any size can be checked, follows every redirect, and drops
transparency without compositing it, so training and inference would see different pixels.
"""

import base64
import binascii
import dataclasses
import io
import os
import urllib.error
import urllib.parse
import urllib.request

import PIL.Image
import PIL.ImageOps


class UnreadableImage(OSError, ValueError):
    """An image that cannot be read or that the policy refuses; the message says which and why.

    Both an `OSError` (what PIL raises for a broken file) and a `ValueError` (what a server answers with HTTP 400).
    """


@dataclasses.dataclass(frozen=True)
class ImagePolicy:
    """What `open_image` may read, and how large.

    Args:
        allow_paths: read local files named by a path (off for servers: a string is then base64 or a URL).
        url_hosts: host names an `http(s)://` URL may point to; `None` allows any host, `()` none. Redirects are
            followed only when any host is allowed (a restricted host could otherwise redirect elsewhere).
        url_timeout: seconds allowed for fetching one URL (connection and each read).
        max_bytes: largest encoded image (bytes, file or URL body; base64 text is measured before decoding).
        max_pixels: largest width x height, checked from the header before decoding.
        max_side: largest width or height (bounds the aspect ratio of an image that passes `max_pixels`).
        max_aspect_ratio: largest longer side / shorter side (CLIP's processor scales the shorter side to its input
            size, so a 1 x 300000 image would be resized to 224 x 67 million pixels).
    """

    allow_paths: bool = True
    url_hosts: tuple[str, ...] | None = None
    url_timeout: float = 10.0
    max_bytes: int | None = None
    max_pixels: int | None = None
    max_side: int | None = None
    max_aspect_ratio: float | None = None

    def check_encoded_size(self, size: int, approximate: bool = False) -> None:
        """Refuse `size` encoded bytes over `max_bytes`."""
        if self.max_bytes is not None and size > self.max_bytes:
            about = "about " if approximate else ""
            raise UnreadableImage(f"the image is {about}{_megabytes(size)}; the limit is {_megabytes(self.max_bytes)}")

    def check_dimensions(self, width: int, height: int) -> None:
        """Refuse a `width` x `height` image over `max_pixels`, `max_side` or `max_aspect_ratio`."""
        if self.max_pixels is not None and width * height > self.max_pixels:
            raise UnreadableImage(f"the image is {width} x {height} pixels; the limit is {self.max_pixels} pixels")
        if self.max_side is not None and max(width, height) > self.max_side:
            raise UnreadableImage(f"the image is {width} x {height} pixels; the limit is {self.max_side} per side")
        longer, shorter = max(width, height), max(min(width, height), 1)
        if self.max_aspect_ratio is not None and longer > self.max_aspect_ratio * shorter:
            raise UnreadableImage(f"the image is {width} x {height} pixels; the limit is an aspect ratio of "
                                  f"{self.max_aspect_ratio:g} (longer side / shorter side)")


def open_image(source, policy: ImagePolicy = ImagePolicy()) -> PIL.Image.Image:
    """A loaded, upright RGB PIL image from `source` (see the module docstring), read under `policy`.

    Raises:
        UnreadableImage: the source is refused by `policy`, cannot be fetched, or is not an image PIL can read.
    """
    if isinstance(source, PIL.Image.Image):
        policy.check_dimensions(*source.size)
        return to_rgb(source)
    name, data = _encoded(source, policy)
    try:
        image = PIL.Image.open(data)
        policy.check_dimensions(*image.size)
        image.load()
    except UnreadableImage:
        raise
    except (PIL.UnidentifiedImageError, PIL.Image.DecompressionBombError, OSError, SyntaxError, ValueError) as error:
        detail = "" if isinstance(error, PIL.UnidentifiedImageError) else f" ({error})"  # its text is a BytesIO repr
        raise UnreadableImage(f"{name} is not an image PIL can read{detail}") from error
    if image.getexif().get(PIL.Image.ExifTags.Base.Orientation) is not None:
        image = PIL.ImageOps.exif_transpose(image)
    return to_rgb(image)


def to_rgb(image: PIL.Image.Image) -> PIL.Image.Image:
    """Grayscale, palette, CMYK, ... -> RGB; transparency is composited on white, as `CLIPImageProcessor` does."""
    if image.mode == "RGB":
        return image
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        image = image.convert("RGBA")
        background = PIL.Image.new("RGBA", image.size, (255, 255, 255, 255))
        return PIL.Image.alpha_composite(background, image).convert("RGB")
    return image.convert("RGB")


def _encoded(source, policy: ImagePolicy) -> tuple[str, object]:
    """`(name for messages, what PIL.Image.open reads)`: a path or a binary file object, size-checked."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        policy.check_encoded_size(len(source))
        return "the data", io.BytesIO(source)
    if hasattr(source, "read"):
        return "the file", source
    if isinstance(source, os.PathLike):
        source = os.fspath(source)
    if not isinstance(source, str):
        raise UnreadableImage(f"an image must be a path, URL, base64 string, bytes or a PIL image, "
                              f"not {type(source).__name__}")
    if source.startswith(("http://", "https://")):
        return "the data", io.BytesIO(fetch_url(source, policy))
    if source.startswith("data:"):
        header, _, payload = source.partition(",")
        if not header.endswith(";base64"):
            raise UnreadableImage(f"only base64 data URIs hold images here; got one starting {source[:40]!r}")
        return "the data", io.BytesIO(_base64_bytes(payload, policy))
    if policy.allow_paths and os.path.isfile(source):
        policy.check_encoded_size(os.path.getsize(source))
        return os.path.basename(source), source
    try:
        return "the data", io.BytesIO(_base64_bytes(source, policy))
    except UnreadableImage:
        if policy.allow_paths:
            raise UnreadableImage(f"{source[:200]!r} is neither an image file nor base64") from None
        raise


def _base64_bytes(text: str, policy: ImagePolicy) -> bytes:
    policy.check_encoded_size(len(text) * 3 // 4, approximate=True)  # refused before decoding
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as error:
        raise UnreadableImage(f"the image is not valid base64 ({error})") from error


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, req, fp, code, msg, headers, newurl):
        raise UnreadableImage(f"image URL {req.full_url} redirects to {newurl}; give the final URL")


def fetch_url(url: str, policy: ImagePolicy) -> bytes:
    """The body at an `http(s)://` URL whose host `policy` allows, within `url_timeout` and `max_bytes`."""
    host = (urllib.parse.urlsplit(url).hostname or "").lower()
    if policy.url_hosts is not None and host not in policy.url_hosts:
        allowed = ", ".join(policy.url_hosts) or "none"
        raise UnreadableImage(f"image URL host {host!r} is not allowed; allowed: {allowed}")
    opener = urllib.request.build_opener(*([] if policy.url_hosts is None else [_NoRedirects]))
    try:
        with opener.open(url, timeout=policy.url_timeout) as response:
            content = response.read(None if policy.max_bytes is None else policy.max_bytes + 1)
    except UnreadableImage:
        raise
    except urllib.error.HTTPError as error:
        raise UnreadableImage(f"image URL {url} answered HTTP {error.code}") from error
    except (urllib.error.URLError, OSError) as error:
        raise UnreadableImage(f"image URL {url} could not be fetched: {getattr(error, 'reason', error)}") from error
    if policy.max_bytes is not None and len(content) > policy.max_bytes:
        raise UnreadableImage(f"image URL {url} holds more than {_megabytes(policy.max_bytes)}, the limit")
    return content


def _megabytes(size: int) -> str:
    return f"{size / 2**20:.1f} MB"


__all__ = ["ImagePolicy", "UnreadableImage", "fetch_url", "open_image", "to_rgb"]
