"""Time each fused-kernel launch against cuBLAS on one GPU: where the forward and backward time goes.

For each Llama-3-8B projection shape (tokens × in → out) it times, with triton.testing.do_bench (median):

    base_fwd   x Wᵀ (cuBLAS, torch.mm)            base_dx   dy W (cuBLAS)
    S          launch_S: S = (x ⊙ m) Aᵀ/(1-p)      dS_dB     launch_dS_dB: one pass over dy
    fwd_gemm   launch_forward_gemm: y              dA        launch_dA: dSᵀ (x ⊙ m)
    forward    lora_forward (S + fwd_gemm)         dx_gemm   launch_dx_gemm: dx with the masked term
                                                   backward  lora_backward (dx, dA, dB)

and the ratio (forward + backward) / (base_fwd + base_dx): the fused layer against the frozen base's two
GEMMs.  Needs CUDA.

    python bench/kernel_breakdown.py [--tokens 8192] [--rank 16] [--dropout 0.1,0] [--adapter-dtype bf16|fp32]
                                     [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

os.environ.pop("TRITON_INTERPRET", None)
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import triton  # noqa: E402
from triton.testing import do_bench  # noqa: E402

from fastlora.kernels import lora_backward, lora_forward  # noqa: E402
from fastlora.kernels.backward import launch_dA, launch_dS_dB, launch_dx_gemm  # noqa: E402
from fastlora.kernels.forward import launch_forward_gemm, launch_S  # noqa: E402

SHAPES = {  # Llama-3-8B projections: (in, out)
    "q_proj": (4096, 4096),
    "k_proj": (4096, 1024),
    "gate_proj": (4096, 14336),
    "down_proj": (14336, 4096),
}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
COLUMNS = ["base_fwd", "S", "fwd_gemm", "forward", "base_dx", "dS_dB", "dA", "dx_gemm", "backward"]


def time_ms(fn) -> float:
    return float(do_bench(fn, warmup=10, rep=50, return_mode="median"))


def measure(name: str, M: int, K: int, N: int, r: int, p: float, dtype, adapter_dtype, dev: str = "cuda") -> dict:
    g = torch.Generator(device=dev).manual_seed(0)
    x = torch.randn(M, K, device=dev, dtype=dtype, generator=g)
    w = torch.randn(N, K, device=dev, dtype=dtype, generator=g) * K**-0.5
    A = torch.randn(r, K, device=dev, dtype=adapter_dtype, generator=g) * K**-0.5
    B = torch.randn(N, r, device=dev, dtype=adapter_dtype, generator=g) * r**-0.5
    dy = torch.randn(M, N, device=dev, dtype=dtype, generator=g)
    seed = torch.tensor([1234], device=dev, dtype=torch.int64)
    s = 2.0
    S = launch_S(x, A, seed, p)
    dS, _ = launch_dS_dB(dy, B, S, s, p, True, False)
    t = {
        "base_fwd": time_ms(lambda: torch.mm(x, w.t())),
        "S": time_ms(lambda: launch_S(x, A, seed, p)),
        "fwd_gemm": time_ms(lambda: launch_forward_gemm(x, w, None, S, B, s)),
        "forward": time_ms(lambda: lora_forward(x, w, None, A, B, seed, s, p)),
        "base_dx": time_ms(lambda: torch.mm(dy, w)),
        "dS_dB": time_ms(lambda: launch_dS_dB(dy, B, S, s, p, True, True)),
        "dA": time_ms(lambda: launch_dA(x, dS, seed, p, A.dtype)),
        "dx_gemm": time_ms(lambda: launch_dx_gemm(dy, w, dS, A, seed, p)),
        "backward": time_ms(lambda: lora_backward(dy, x, w, A, B, S, seed, s, p, True, True, True)),
    }
    base = t["base_fwd"] + t["base_dx"]
    return {
        "shape": name, "M": M, "K": K, "N": N, "r": r, "dropout": p,
        "dtype": str(dtype).removeprefix("torch."), "adapter_dtype": str(adapter_dtype).removeprefix("torch."),
        **{f"{k}_ms": round(v, 4) for k, v in t.items()},
        "fused_over_base": round((t["forward"] + t["backward"]) / base, 4),
        "fwd_gemm_over_base_fwd": round(t["fwd_gemm"] / t["base_fwd"], 4),
        "dx_gemm_over_base_dx": round(t["dx_gemm"] / t["base_dx"], 4),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--dropout", default="0.1,0", help="comma list (default 0.1,0)")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    ap.add_argument("--adapter-dtype", choices=sorted(DTYPES), help="default: the base dtype")
    ap.add_argument("--shapes", default=",".join(SHAPES), help=f"comma list of {', '.join(SHAPES)}")
    ap.add_argument("--json", help="write the rows (plus the environment) here")
    opts = ap.parse_args()
    if not torch.cuda.is_available():
        print("kernel_breakdown: needs CUDA", file=sys.stderr)
        return 2
    dtype = DTYPES[opts.dtype]
    adapter_dtype = DTYPES[opts.adapter_dtype] if opts.adapter_dtype else dtype
    env = {
        "gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "triton": triton.__version__,
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    print(f"{env['gpu']} | torch {env['torch']} | triton {env['triton']} | M={opts.tokens} r={opts.rank} "
          f"{opts.dtype} (adapters {str(adapter_dtype).removeprefix('torch.')}) | ms, median")
    header = f"{'shape':<10} {'p':>4} " + " ".join(f"{c:>9}" for c in COLUMNS) + f" {'fused/base':>10}"
    print(header)
    rows = []
    for p in (float(v) for v in opts.dropout.split(",")):
        for name in opts.shapes.split(","):
            K, N = SHAPES[name]
            row = measure(name, opts.tokens, K, N, opts.rank, p, dtype, adapter_dtype)
            rows.append(row)
            print(f"{name:<10} {p:>4} " + " ".join(f"{row[c + '_ms']:>9.4f}" for c in COLUMNS)
                  + f" {row['fused_over_base']:>10.3f}", flush=True)
            torch.cuda.empty_cache()
    if opts.json:
        with open(opts.json, "w") as f:
            json.dump({"environment": env, "rows": rows}, f, indent=1)
        print(f"wrote {opts.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
