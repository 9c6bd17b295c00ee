"""The time floor of one layer's forward / backward from FLOPs, minimum bytes, peak rate and bandwidth.

For x (M × K), frozen W (N × K), adapters A (r × K), B (N × r), input requiring grad:

FLOPs
    base      forward 2MKN (x Wᵀ);  backward 2MKN (dx = dy W; W is frozen, so no dW)
    LoRA      adds forward 2Mr(K+N) (S = x_d Aᵀ, S Bᵀ) and backward 4Mr(K+N) (dB, dS, dA, dS A)

Minimum bytes (each tensor read or written once, the least any implementation of the same function can
move; the dropout mask is not counted because it can be regenerated from a seed)
    base      forward x, W, y (+ bias);  backward dy, W, dx
    LoRA      forward adds A, B and writes S (M × r);
              backward adds x again (for dA = dSᵀ x_d), S, A, B, and writes dA, dB

The floor of a pass is max(FLOPs / peak rate, bytes / bandwidth); forward+backward is the sum of the
two.  LoRA providers (PEFT, fastlora) compute the same function, so they share one floor; "of floor" is
measured / floor.  The peak rate is the dense tensor-core rate for 16-bit dtypes and the fp32 (or TF32
when ``torch.backends.cuda.matmul.allow_tf32``) rate otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["LayerCost", "layer_cost", "Roofline", "floor_ms"]


@dataclass(frozen=True)
class LayerCost:
    fwd_flops: float
    bwd_flops: float
    fwd_bytes: float
    bwd_bytes: float

    @property
    def flops(self) -> float:
        return self.fwd_flops + self.bwd_flops

    @property
    def bytes(self) -> float:
        return self.fwd_bytes + self.bwd_bytes


def layer_cost(M: int, K: int, N: int, r: int, *, lora: bool, elem: int, adapter_elem: int | None = None, bias: bool = False) -> LayerCost:
    """FLOPs and minimum bytes of one layer; ``elem`` bytes per element of x/W/y, ``adapter_elem`` of A/B/S."""
    ae = elem if adapter_elem is None else adapter_elem
    fwd_f = 2.0 * M * K * N
    bwd_f = 2.0 * M * K * N
    fwd_b = float(elem * (M * K + N * K + M * N + (N if bias else 0)))
    bwd_b = float(elem * (M * N + N * K + M * K))
    if lora:
        fwd_f += 2.0 * M * r * (K + N)
        bwd_f += 4.0 * M * r * (K + N)
        fwd_b += ae * (r * K + N * r + M * r)
        bwd_b += elem * M * K + ae * (M * r + 2 * (r * K + N * r))
    return LayerCost(fwd_f, bwd_f, fwd_b, bwd_b)


@dataclass(frozen=True)
class Roofline:
    name: str
    tflops: float
    bandwidth_gbs: float

    def pass_ms(self, flops: float, nbytes: float) -> float:
        return max(flops / (self.tflops * 1e12), nbytes / (self.bandwidth_gbs * 1e9)) * 1e3


def floor_ms(cost: LayerCost, roof: Roofline) -> dict[str, float]:
    fwd = roof.pass_ms(cost.fwd_flops, cost.fwd_bytes)
    bwd = roof.pass_ms(cost.bwd_flops, cost.bwd_bytes)
    return {"fwd": fwd, "bwd": bwd, "fwd_bwd": fwd + bwd}
