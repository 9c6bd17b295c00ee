"""The launchers ``fastlora.ops`` calls inside its ``triton_op`` bodies (imports only torch and triton).

They allocate outputs with torch, launch through ``torch.library.wrap_triton`` and never synchronise.

    dropout.py   the Philox keep mask every kernel regenerates from (seed, row, col)
    masking.py   that mask applied on its own, in place, to a whole tensor (for DoRA's torch products)
    gemm.py      the fused GEMM: base matmul + (masked) low-rank term in one accumulator, one store; its launcher
    low_rank_add.py  the low-rank term added in place to cuBLAS's base product (the default base="cublas")
    skinny.py    the rank-r kernels: S from x; dS and dB from dy; dA from x and dS
    configs.py   autotune lists (Hopper / Ampere), skinny block choices, M bucket, config pinning
    common.py    launcher helpers: dtype checks, precision, 64-bit offsets, reduction splits
    forward.py   lora_forward launcher
    backward.py  lora_backward launcher
    dora.py      DoRA: the row-norm kernel, the GEMM with the magnitude scale, dora_forward / dora_backward
    dequant4.py  bitsandbytes' 4-bit (nf4 / fp4, double-quantized) weights read in Triton, bit for bit as bitsandbytes
    gemm4bit.py  the fused GEMM over a 4-bit weight, dequantized tile by tile in its main loop
    qlora.py     qlora_forward / qlora_backward: a LoRA layer over a 4-bit weight, fused
    grouped.py   many adapters' (or experts') low-rank products at once, one segment each: segment matmul / reduce

The folder has no ``__init__.py`` on purpose: it is the subpackage ``fastlora.kernels`` (``fastlora/kernels``
links to it), never a top-level package of its own.  With an ``__init__.py``, Python started at the repository
root would import it as ``kernels`` in place of Hugging Face's ``kernels`` package, which transformers imports.
"""

from .backward import lora_backward
from .dora import dora_backward, dora_forward, zero_magnitude_dm
from .forward import linear_plus_low_rank, lora_forward
from .masking import zero_dropped_
from .qlora import qlora_backward, qlora_forward

__all__ = ["lora_forward", "linear_plus_low_rank", "lora_backward", "dora_forward", "dora_backward", "zero_magnitude_dm", "zero_dropped_",
           "qlora_forward", "qlora_backward"]
