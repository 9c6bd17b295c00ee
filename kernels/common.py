"""Launcher-side helpers shared by the forward and backward launchers: flags derived from the operands."""

from __future__ import annotations

import contextvars

import torch
import triton
from torch import Tensor

from .configs import INTERPRET, num_sms

__all__ = [
    "check_dtypes", "block_r", "dot_precision", "skinny_precision", "gemm_precision", "small_skinny_tiles",
    "needs_int64", "upcast", "row_major", "seed_arg", "split_reduction", "launch", "backward_operands",
    "gradient_operands",
    "empty_batch_grads", "tma_readable", "launch_with_scratch",
]

_INT32_LIMIT = 2**31 - 1


def block_r(r: int) -> int:
    """r padded to a power of two, at least 16 (tl.dot's minimum)."""
    return max(16, triton.next_power_of_2(int(r)))


def dot_precision() -> str:
    """fp32 dots follow torch's matmul precision setting: "highest" → exact fp32, otherwise tf32."""
    return "ieee" if torch.get_float32_matmul_precision() == "highest" else "tf32"


def skinny_precision(big_dtype: torch.dtype, adapter_dtype: torch.dtype) -> str:
    """Dot precision of a rank-r kernel whose big operand (x or dy) has ``big_dtype``.  The dots run in the
    adapters' dtype.  A 16-bit big operand beside fp32 adapters (PEFT's default setup) is exact in tf32, so
    three tf32 products ("tf32x3": the adapter operand split in a high and a low tf32 part) give fp32-class
    results on tensor cores where exact fp32 dots would run on the CUDA cores; torch's "high" / "medium"
    settings ask for plain tf32.  Otherwise torch's setting decides (``dot_precision``)."""
    if adapter_dtype == torch.float32 and big_dtype != torch.float32:
        return "tf32x3" if dot_precision() == "ieee" else "tf32"
    return dot_precision()


def gemm_precision(base_dtype: torch.dtype) -> str:
    """Dot precision of the fused GEMM.  With a 16-bit base the fp32 operands are only those of the low-rank
    prologue (fp32 adapters), whose sum is rounded to 16 bits in y / dx: tf32 products (10-bit mantissas)
    lose nothing that rounding keeps, and exact fp32 dots there make the large tiles spill.  An fp32 base
    follows torch's setting."""
    return dot_precision() if base_dtype == torch.float32 else "tf32"


def small_skinny_tiles(big_dtype: torch.dtype, adapter_dtype: torch.dtype, precision: str) -> bool:
    """Whether a rank-r kernel needs the smaller tiles: exact fp32 (CUDA cores) and 3×tf32 dots take more
    registers than plain tf32 or 16-bit ones, and so does an fp32 big operand converted to 16-bit adapters'
    dtype in registers."""
    if adapter_dtype == torch.float32:
        return precision in ("ieee", "tf32x3")
    return big_dtype == torch.float32


def needs_int64(*tensors: Tensor | None) -> bool:
    """True when some operand's furthest element lies past 2^31 - 1 (int32 offsets would wrap)."""
    for t in tensors:
        if t is None or t.numel() == 0:
            continue
        extent = 1 + sum((size - 1) * abs(stride) for size, stride in zip(t.shape, t.stride()))
        if max(extent, t.numel()) > _INT32_LIMIT:
            return True
    return False


def upcast(*tensors: Tensor | None) -> bool:
    """Interpreter only: compute in fp32 when any operand is bf16 (the interpreter has no bf16 arithmetic)."""
    return INTERPRET and any(t is not None and t.dtype == torch.bfloat16 for t in tensors)


_FLOATS = (torch.float32, torch.float16, torch.bfloat16)


def check_dtypes(x: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor) -> None:
    """x and weight share a dtype (tl.dot needs one operand dtype); so do lora_A and lora_B, in any of fp32,
    fp16, bf16 (fp32 adapters beside a 16-bit base is PEFT's default; 16-bit adapters beside an fp32 base run
    the LoRA branch in 16 bits, as the torch path does)."""
    for pair, (a, b) in (("x and weight", (x, weight)), ("lora_A and lora_B", (lora_A, lora_B))):
        if a.dtype != b.dtype:
            raise TypeError(f"{pair} must share a dtype, got {a.dtype} and {b.dtype}")
        if a.dtype not in _FLOATS:
            raise TypeError(f"the Triton kernels take {pair} in fp32, fp16 or bf16, got {a.dtype} (backend='torch' "
                            f"also takes float64)")


def split_reduction(programs: int, length: int, block: int) -> tuple[int, int]:
    """Split a reduction over ``length`` (in ``block`` multiples) when ``programs`` alone would leave the GPU
    idle, aiming at about two waves: returns (splits, length per split)."""
    blocks = triton.cdiv(length, block)
    want = max(1, (2 * num_sms()) // max(1, programs))
    per_split = triton.cdiv(blocks, max(1, min(want, blocks))) * block
    return triton.cdiv(length, per_split), per_split


def row_major(t: Tensor) -> Tensor:
    """t itself when its last stride is 1, else a contiguous copy (the kernels take any leading stride)."""
    return t if t.stride(-1) == 1 else t.contiguous()


def seed_arg(seed: Tensor | None, dropout: bool, placeholder: Tensor) -> Tensor:
    """The seed tensor the kernels take: required with dropout; without it any tensor (never read) will do."""
    if seed is not None:
        return seed
    if dropout:
        raise ValueError("dropout_p > 0 needs a seed tensor (int64, shape (1,), on the input's device)")
    return placeholder


def _aligned_16(t: Tensor, *strides: int) -> bool:
    """t's first element and the given strides (elements) fall on 16-byte boundaries.  The first element is
    checked through the storage offset (torch's allocators align storages to far more than 16 bytes) where the
    address is not there to read (fake tensors under torch.compile)."""
    el = t.element_size()
    try:
        start = t.data_ptr()
    except (RuntimeError, NotImplementedError):
        start = t.storage_offset() * el
    return start % 16 == 0 and all((s * el) % 16 == 0 for s in strides)


def tma_readable(a: Tensor, b: Tensor) -> bool:
    """Whether the GEMM's A (M, K) and B (K, N) can be read through TMA descriptors: 16-bit operands (the dtype of
    the TMA configs the compile check proves) on a GPU with TMA (sm_90 and later; the interpreter emulates it), A's
    rows contiguous, B contiguous along K (B = Wᵀ) or along N (B = W), rows that do not overlap (no stride-0
    expansion), 16-byte aligned starts and leading strides."""
    if a.dtype not in (torch.float16, torch.bfloat16) or b.dtype != a.dtype:
        return False
    if not INTERPRET and not (a.is_cuda and torch.cuda.get_device_capability(a.device)[0] >= 9):
        return False
    if a.stride(1) != 1 or a.stride(0) < a.shape[1] or not _aligned_16(a, a.stride(0)):
        return False
    if b.stride(0) == 1:
        return b.stride(1) >= b.shape[0] and _aligned_16(b, b.stride(1))
    return b.stride(1) == 1 and b.stride(0) >= b.shape[1] and _aligned_16(b, b.stride(0))


def _scratch_on(device: torch.device):
    def allocate(size: int, alignment: int, stream) -> Tensor:
        return torch.empty(size, dtype=torch.int8, device=device)

    return allocate


def launch_with_scratch(device: torch.device, run, *args) -> None:
    """``run(*args)`` with triton's allocator set to one that takes memory on ``device`` from torch's allocator: a
    kernel that builds TMA descriptors on the device needs global scratch memory for them.  Set in a copy of the
    current context, so the caller's own allocator setting (triton's is a context variable) is left as it was."""

    def with_allocator():
        triton.set_allocator(_scratch_on(device))
        run(*args)

    contextvars.copy_context().run(with_allocator)


def launch(kernel):
    """The kernel as PyTorch's custom-op machinery wants it: ``torch.library.wrap_triton(kernel)``."""
    return torch.library.wrap_triton(kernel)


def gradient_operands(dy: Tensor, x: Tensor, lora_B: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(dy, dy_low_rank, x) as the backward launchers take them: dy in x's dtype (a gradient may arrive in another
    precision; the dx GEMM needs one dtype); the dy the rank-r products (dS, dB) read, as given when it comes in the
    adapters' dtype (an fp32 gradient beside a 16-bit base keeps its precision there); x with a last stride of 1."""
    cast = dy if dy.dtype == x.dtype else dy.to(x.dtype)
    return cast, (dy if dy.dtype == lora_B.dtype else cast), row_major(x)


def backward_operands(dy: Tensor, x: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor
                      ) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`gradient_operands` after the dtype checks of a dense base."""
    check_dtypes(x, weight, lora_A, lora_B)
    return gradient_operands(dy, x, lora_B)


def empty_batch_grads(x: Tensor, N: int, lora_A: Tensor, lora_B: Tensor, need_dx: bool, need_dA: bool,
                      need_dB: bool) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """(dx, dA, dB) for a batch of no rows: an empty dx, zero dA and dB (None where not needed)."""
    K, r = x.shape[1], lora_A.shape[0]
    return (
        torch.empty((0, K), device=x.device, dtype=x.dtype) if need_dx else None,
        torch.zeros((r, K), device=x.device, dtype=lora_A.dtype) if need_dA else None,
        torch.zeros((N, r), device=x.device, dtype=lora_B.dtype) if need_dB else None,
    )
