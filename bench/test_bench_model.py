"""One training step (forward + loss + backward) of the tiny Llama model per provider (pytest-benchmark)."""

from __future__ import annotations

import pytest
import torch

from fastlora.bench.measure import count_saved, module_tensors
from fastlora.bench.presets import MODEL_PRESETS
from fastlora.bench.providers import DEFAULT_ORDER, PROVIDERS, SEED_TARGETS
from fastlora.bench.runner import ModelCase, build_model

from conftest import bench_device, sync

DEVICE = bench_device()
PRESET = MODEL_PRESETS["tiny"]


@pytest.mark.parametrize("dropout", [0.1, 0.0], ids=lambda p: f"p{p:g}")
@pytest.mark.parametrize("provider", DEFAULT_ORDER)
def test_tiny_model_step(benchmark, provider, dropout):
    prov = PROVIDERS[provider]
    reason = prov.unavailable(DEVICE, False)
    if reason:
        pytest.skip(reason)
    case = ModelCase(PRESET, PRESET.layers, PRESET.batch, PRESET.seq, PRESET.vocab, 8, 32.0, dropout, torch.float32, list(SEED_TARGETS))
    model = prov.model(build_model(case, DEVICE), case.r, case.alpha, case.dropout, case.targets).train()
    ids = torch.randint(0, case.vocab, (case.batch, case.seq), generator=torch.Generator().manual_seed(0)).to(DEVICE)
    params = [p for p in model.parameters() if p.requires_grad]

    def clear():
        for t in params:
            t.grad = None

    def step():
        model(input_ids=ids, labels=ids).loss.backward()
        sync(DEVICE)

    saved, _, loss = count_saved(lambda: model(input_ids=ids, labels=ids).loss, exclude=module_tensors(model))
    loss.backward()
    benchmark.group = f"tiny model step {case.batch}x{case.seq} p={dropout:g}"
    benchmark.extra_info.update(provider=provider, dropout=dropout, tokens=case.batch * case.seq, saved_bytes=saved)
    benchmark.pedantic(step, setup=clear, rounds=5, warmup_rounds=1)
