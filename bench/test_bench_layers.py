"""Forward+backward of one LoRA layer per provider (pytest-benchmark); see conftest.py for how to run."""

from __future__ import annotations

import pytest
import torch

from fastlora.bench.measure import count_saved, module_tensors
from fastlora.bench.presets import MODEL_PRESETS, projections
from fastlora.bench.providers import DEFAULT_ORDER, PROVIDERS

from conftest import bench_device, sync

DEVICE = bench_device()
ON_GPU = DEVICE.type == "cuda"
PRESET = MODEL_PRESETS["llama-3-8b" if ON_GPU else "tiny"]
TOKENS = 8192 if ON_GPU else 1024
DTYPE = torch.bfloat16 if ON_GPU else torch.float32
CASES = [(name, K, N, bias) for name, K, N, bias in projections(PRESET, ["q_proj", "k_proj", "gate_proj", "down_proj"])]
RANK, ALPHA = 16, 32.0


@pytest.mark.parametrize("dropout", [0.1, 0.0], ids=lambda p: f"p{p:g}")
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-{c[1]}x{c[2]}")
@pytest.mark.parametrize("provider", DEFAULT_ORDER)
def test_layer_fwd_bwd(benchmark, provider, case, dropout):
    prov = PROVIDERS[provider]
    reason = prov.unavailable(DEVICE, False)
    if reason:
        pytest.skip(reason)
    name, K, N, bias = case
    torch.manual_seed(0)
    layer = prov.layer(K, N, bias, RANK, ALPHA, dropout, DTYPE, DEVICE).train()
    x = torch.randn(TOKENS, K, device=DEVICE, dtype=DTYPE, requires_grad=True)
    dy = torch.randn(TOKENS, N, device=DEVICE, dtype=DTYPE)
    params = [p for p in layer.parameters() if p.requires_grad] + [x]

    def clear():
        for t in params:
            t.grad = None

    def step():
        layer(x).backward(dy)
        sync(DEVICE)

    saved, new, y = count_saved(lambda: layer(x), exclude=module_tensors(layer), inputs=[x])
    y.backward(dy)
    benchmark.group = f"{PRESET.name} {name} {TOKENS}x{K}->{N} p={dropout:g}"
    benchmark.extra_info.update(
        provider=provider, preset=PRESET.name, case=name, M=TOKENS, K=K, N=N, r=RANK, dropout=dropout,
        dtype=str(DTYPE), device=str(DEVICE), saved_bytes=saved, saved_new_bytes=new,
    )
    benchmark.pedantic(step, setup=clear, rounds=30 if ON_GPU else 10, warmup_rounds=5 if ON_GPU else 2)
