"""Shape presets named after real models, the end-to-end model presets, and the GPU spec table.

Layer presets list each adapted projection of one decoder layer with the model's real dimensions
(in_features K → out_features N, and whether the projection has a bias).  Model presets give the
width of the Llama-architecture model that ``--model`` builds (a few decoder layers, random weights,
nothing downloaded).
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "ModelPreset",
    "MODEL_PRESETS",
    "PROJECTIONS",
    "projections",
    "parse_shape",
    "GpuSpec",
    "GPU_SPECS",
    "find_gpu_spec",
]

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class ModelPreset:
    name: str
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    vocab: int
    layers: int  # decoder layers built by --model (the real models have 28-32; we build a few)
    qkv_bias: bool = False  # Qwen2.5 has a bias on q/k/v
    batch: int = 4  # --model default batch × sequence
    seq: int = 256

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim


MODEL_PRESETS: dict[str, ModelPreset] = {
    # Published configs: Meta-Llama-3-8B, Mistral-7B-v0.3, Qwen2.5-7B.
    "llama-3-8b": ModelPreset("llama-3-8b", 4096, 14336, 32, 8, 128256, layers=2, batch=4, seq=2048),
    "mistral-7b": ModelPreset("mistral-7b", 4096, 14336, 32, 8, 32768, layers=2, batch=4, seq=2048),
    "qwen2.5-7b": ModelPreset("qwen2.5-7b", 3584, 18944, 28, 4, 152064, layers=2, qkv_bias=True, batch=4, seq=2048),
    # The CPU target model: hidden 512, intermediate 1376, 2 layers, 4 × 256 tokens, fp32.
    # A 1024-token vocabulary keeps the LM head from dominating the step (with 32000 the logits are
    # 2/3 of the saved activations); with it PEFT saves 1.99× / 1.28× the frozen model's bytes at
    # p = 0.1 / 0.
    "tiny": ModelPreset("tiny", 512, 1376, 8, 8, 1024, layers=2, batch=4, seq=256),
}


def projections(preset: ModelPreset, only: list[str] | None = None) -> list[tuple[str, int, int, bool]]:
    """``(name, K, N, bias)`` for each of q/k/v/o/gate/up/down (or the ``only`` subset) of ``preset``."""
    h, kv, inter = preset.hidden, preset.kv_dim, preset.intermediate
    table = {
        "q_proj": (h, h, preset.qkv_bias),
        "k_proj": (h, kv, preset.qkv_bias),
        "v_proj": (h, kv, preset.qkv_bias),
        "o_proj": (h, h, False),
        "gate_proj": (h, inter, False),
        "up_proj": (h, inter, False),
        "down_proj": (inter, h, False),
    }
    names = list(PROJECTIONS) if not only else only
    out = []
    for n in names:
        key = n if n in table else f"{n}_proj"
        if key not in table:
            raise ValueError(f"unknown projection {n!r}; choose from {', '.join(PROJECTIONS)}")
        K, N, bias = table[key]
        out.append((key, K, N, bias))
    return out


def parse_shape(text: str) -> tuple[int, int, int]:
    """``"M,K,N"`` (tokens, in_features, out_features) → ints."""
    parts = [p for p in text.replace("x", ",").split(",") if p.strip()]
    if len(parts) != 3:
        raise ValueError(f"--shape wants M,K,N (tokens, in_features, out_features), got {text!r}")
    M, K, N = (int(p) for p in parts)
    if min(M, K, N) <= 0:
        raise ValueError(f"--shape dimensions must be positive, got {text!r}")
    return M, K, N


@dataclass(frozen=True)
class GpuSpec:
    """Dense (no sparsity) peak matrix rates in TFLOP/s and DRAM bandwidth in GB/s, from vendor spec sheets."""

    name: str
    match: tuple[str, ...]  # lower-case substrings of torch.cuda.get_device_name()
    tflops_16: float  # bf16/fp16 tensor cores, fp32 accumulate
    tflops_tf32: float
    tflops_32: float  # plain fp32 (CUDA cores)
    bandwidth_gbs: float

    def tflops(self, dtype_name: str, allow_tf32: bool = False) -> float:
        if dtype_name in ("bfloat16", "float16", "bf16", "fp16"):
            return self.tflops_16
        return self.tflops_tf32 if allow_tf32 else self.tflops_32


# Order matters: the first entry whose every substring occurs in the device name wins.
GPU_SPECS: list[GpuSpec] = [
    GpuSpec("H200", ("h200",), 989.4, 494.7, 66.9, 4800.0),
    GpuSpec("H100 NVL", ("h100", "nvl"), 835.5, 417.8, 60.0, 3900.0),
    GpuSpec("H100 PCIe", ("h100", "pcie"), 756.5, 378.0, 51.2, 2000.0),
    GpuSpec("H100 SXM", ("h100",), 989.4, 494.7, 66.9, 3350.0),
    GpuSpec("A100 40GB", ("a100", "40gb"), 312.0, 156.0, 19.5, 1555.0),
    GpuSpec("A100 80GB", ("a100",), 312.0, 156.0, 19.5, 2039.0),
    GpuSpec("L40S", ("l40s",), 362.1, 183.0, 91.6, 864.0),
    GpuSpec("RTX 4090", ("4090",), 165.2, 82.6, 82.6, 1008.0),
]


def find_gpu_spec(name: str | None) -> GpuSpec | None:
    """The table entry for a device name (``torch.cuda.get_device_name()``) or a table name, else None."""
    if not name:
        return None
    low = name.lower()
    for spec in GPU_SPECS:
        if spec.name.lower() == low:
            return spec
    for spec in GPU_SPECS:
        if all(m in low for m in spec.match):
            return spec
    return None
