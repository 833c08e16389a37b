"""Where the model runs and in which dtype: CUDA with bf16 (fp16 where the GPU lacks bf16)
when a GPU is present, else CPU with fp32.

Its own module so that evaluate and serving share the choice with tune without
importing tune (an edit to tune would otherwise rerun evaluate in DVC).
"""
from __future__ import annotations

import torch


def device_and_dtype() -> tuple[str, torch.dtype]:
    if torch.cuda.is_available():
        return "cuda", torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return "cpu", torch.float32
