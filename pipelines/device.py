"""Where the model runs and in which dtype: CUDA with bf16 (fp16 where the GPU lacks bf16)
when a GPU is present, else CPU with fp32; which dtype training computes in
(``training_dtype``) and which the frozen base model's weights hold (``frozen_weights_dtype``).

Its own module so that evaluate and serving share the choice with tune without
importing tune (an edit to tune would otherwise rerun evaluate in DVC).
"""
from __future__ import annotations

import torch

from pipelines.common import StageError


def device_and_dtype() -> tuple[str, torch.dtype]:
    if torch.cuda.is_available():
        return "cuda", torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return "cpu", torch.float32


def cpu_computes_bf16() -> bool:
    """Whether this CPU multiplies bf16 in hardware (AVX512-BF16 or AMX), not by emulation.

    Measured on the 2-core AMD EPYC development machine (AVX512-BF16): a LoRA training step of
    the embedded 135M model, batch 8 x 32 tokens, took 880-904 ms in fp32 and 449-502 ms under
    bf16 autocast. Without hardware support oneDNN emulates bf16, slower than fp32.
    """
    cpu = getattr(torch, "cpu", None)
    try:  # private probes of torch (2.1+): absent or failing means no
        return bool(cpu._is_avx512_bf16_supported() or cpu._is_amx_tile_supported())
    except Exception:
        return False


def training_dtype(precision: str, device: str) -> torch.dtype:
    """The dtype a training step computes in, under autocast (master weights stay fp32).

    ``auto``: bf16 on a GPU that has it (else fp16) and on a CPU that computes it in hardware,
    else fp32. ``float32``: no autocast. ``bfloat16``: bf16 wherever asked (a CPU without
    hardware support emulates it, slowly).
    """
    if precision == "float32":
        return torch.float32
    if precision == "bfloat16":
        if device == "cuda" and not torch.cuda.is_bf16_supported():
            raise StageError("tune.precision: bfloat16, but this GPU lacks bf16; use auto (fp16) or float32")
        return torch.bfloat16
    if device == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if cpu_computes_bf16() else torch.float32


def frozen_weights_dtype(method: str, compute: torch.dtype) -> torch.dtype:
    """The dtype the base model's weights load in for training ``method`` with steps computing
    in ``compute``: bf16 where the steps compute in bf16 and the weights stay frozen (every
    method but full fine-tuning), else fp32. The weights that train stay fp32
    (``methods.trainable_in_fp32``).

    Why: under autocast a frozen fp32 weight is cast to bf16 at every forward (autocast caches
    casts of trainable leaves only), so bf16 storage computes the same products without the
    casts, in half the memory: 2 bytes per base parameter instead of 4 (a 7B base: 13.5 GB
    instead of 27). Measured on 2 CPU cores (AVX512-BF16), SST-2 batch 8: tokens per CPU-second
    +10% prefix, +9% prompt tuning, +4% LoRA (within noise). fp16 keeps fp32 weights: its range
    needs the loss scaler, which unscales only the trainable parameters' gradients anyway,
    and no fp16 GPU has been measured here.
    """
    return torch.bfloat16 if compute == torch.bfloat16 and method != "full" else torch.float32
