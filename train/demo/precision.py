"""Whether the demo's bfloat16 autocast pays on this CPU."""

from __future__ import annotations

import functools

import torch


@functools.cache
def native_bf16() -> bool:
    """True where oneDNN computes bfloat16 natively (AVX512-BF16 or AMX): there bf16 autocast was measured about 4x
    faster than float32 on the demo's towers. On CPUs without it (AVX2 only, such as AMD EPYC Zen 3) bfloat16 is
    emulated and the same steps ran about 10x slower than float32, so the demo's defaults follow this check."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a torch build without oneDNN
        return False
