"""Fast CPU tests of the benchmark engine (fastlora.bench): tiny shapes, few repeats."""

from __future__ import annotations

import csv
import json
import re
import time

import pytest
import torch
from torch import nn

from fastlora.bench import main
from fastlora.bench import report
from fastlora.bench.measure import SavedTensorCounter, count_saved, module_tensors, peak_memory
from fastlora.bench.presets import MODEL_PRESETS, find_gpu_spec, parse_shape, projections
from fastlora.bench.providers import PROVIDERS, Provider, resolve_providers
from fastlora.bench.roofline import Roofline, floor_ms, layer_cost
from fastlora.bench.runner import LayerCase, add_ratios, run_layers
from tests.tolerances import assert_close

CPU = torch.device("cpu")
META_KEYS = ("machine", "cpu", "device", "torch", "triton", "peft", "git_commit", "date")


# ---- saved activations ------------------------------------------------------------------------------


def test_saved_counter_counts_each_storage_once_and_excludes_inputs():
    a = torch.randn(4, 8, requires_grad=True)
    with SavedTensorCounter(inputs=[a]) as c:
        y = a.sin() + a.cos()  # both save `a`: one storage
        z = (a * 3).exp()  # exp saves its output: a new 4×8 float32 storage
    assert c.bytes == 2 * 4 * 8 * 4
    assert c.new_bytes == 4 * 8 * 4
    (y.sum() + z.sum()).backward()


def test_saved_counter_views_share_the_storage():
    a = torch.randn(6, 8, requires_grad=True)
    b = a * 1.0
    with SavedTensorCounter() as c:
        y = b[:3].sin() + b[3:].sin()  # two views of one storage
    assert c.bytes == 6 * 8 * 4
    y.sum().backward()


def test_saved_counter_sets_one_element_storages_apart():
    a = torch.randn(4, 8, requires_grad=True)
    seed = torch.tensor([7])
    with SavedTensorCounter(inputs=[a]) as c:
        y = a.sin() * seed  # sin saves a; the product saves the seed (a's gradient needs it)
        z = a.sum().exp()  # exp saves its one-element output
    assert c.bytes == 4 * 8 * 4 + 8 + 4
    assert c.one_element_bytes == 8 + 4
    fields = c.fields()
    assert fields["saved_one_element_tensors"] == 2 and fields["saved_bytes"] == c.bytes
    (y.sum() + z).backward()


def test_frozen_linear_saves_nothing_but_its_weight():
    lin = nn.Linear(16, 8, bias=True).requires_grad_(False)
    x = torch.randn(5, 16, requires_grad=True)
    saved, new, y = count_saved(lambda: lin(x), exclude=module_tensors(lin), inputs=[x])
    assert saved == 0 and new == 0
    y.sum().backward()


def test_peft_layer_saved_bytes_match_what_peft_keeps():
    M, K, N, r = 32, 16, 24, 4
    x = torch.randn(M, K, requires_grad=True)
    # p = 0: the input itself (excluded from "new") and the rank-r activation.
    m0 = PROVIDERS["peft"].layer(K, N, False, r, 8, 0.0, torch.float32, CPU).train()
    saved, new, y = count_saved(lambda: m0(x), exclude=module_tensors(m0), inputs=[x])
    assert saved == M * K * 4 + M * r * 4
    assert new == M * r * 4
    y.sum().backward()
    # p > 0: a dropped copy of x, its mask and the rank-r activation.  The mask is bool where torch
    # uses its fused dropout (CUDA) and a float tensor of the noise on CPU (ATen's _dropout_impl).
    m1 = PROVIDERS["peft"].layer(K, N, False, r, 8, 0.1, torch.float32, CPU).train()
    saved, new, y = count_saved(lambda: m1(x), exclude=module_tensors(m1), inputs=[x])
    assert new == M * K * 4 + M * K * 4 + M * r * 4
    y.sum().backward()


def test_fastlora_torch_layer_keeps_x_s_and_a_seed():
    reason = PROVIDERS["fastlora-torch"].unavailable(CPU, False)
    if reason:
        pytest.skip(reason)
    M, K, N, r = 32, 16, 24, 4
    x = torch.randn(M, K, requires_grad=True)
    m = PROVIDERS["fastlora-torch"].layer(K, N, False, r, 8, 0.1, torch.float32, CPU).train()
    with SavedTensorCounter(exclude=module_tensors(m), inputs=[x]) as c:
        y = m(x)
    # S and the one-element seed; never the mask or dropout(x)
    assert c.new_bytes == M * r * 4 + 8 and c.one_element_bytes == 8
    y.sum().backward()


@pytest.mark.parametrize("name, same_as", [("peft+patch", "peft"), ("fastlora-torch+inactive", "fastlora-torch")])
def test_companion_providers_compute_the_same_layer_and_save_x_s_and_a_seed(name, same_as):
    M, K, N, r = 32, 16, 24, 4
    x = torch.randn(M, K, requires_grad=True)
    built = {}
    for provider in (name, same_as):
        torch.manual_seed(0)
        built[provider] = PROVIDERS[provider].layer(K, N, False, r, 8, 0.0, torch.float32, CPU).eval()
    with torch.no_grad():
        torch.testing.assert_close(built[name](x), built[same_as](x))
    m = PROVIDERS[name].layer(K, N, False, r, 8, 0.1, torch.float32, CPU).train()
    with SavedTensorCounter(exclude=module_tensors(m), inputs=[x]) as c:
        y = m(x)
    assert c.new_bytes == M * r * 4 + 8 and c.one_element_bytes == 8
    y.sum().backward()


def test_companion_target_lines():
    common = dict(mode="model", case="tiny 2L 4x256", dtype="float32", dropout=0.1)
    rows = [dict(common, provider="peft", fwd_bwd_ms=1.0, saved_bytes=100),
            dict(common, provider="fastlora-torch", fwd_bwd_ms=0.8, saved_bytes=64),
            dict(common, provider="peft+patch", fwd_bwd_ms=0.8, saved_bytes=64),
            dict(common, provider="fastlora-torch+inactive", fwd_bwd_ms=0.9, saved_bytes=64)]
    lines = report.targets(rows)
    assert "tiny 2L 4x256 float32 p=0.1: peft+patch saved / fastlora-torch saved = 1.00 (goal ≤ 1): reached" in lines
    assert ("tiny 2L 4x256 float32 p=0.1: fastlora-torch+inactive step time / one adapter's = 1.12 (goal ≤ 1.05): "
            "not reached") in lines


def test_dora_providers_compute_the_same_layer():
    M, K, N, r = 32, 16, 24, 4
    x = torch.randn(M, K)
    built = {}
    for provider in ("peft-dora", "fastlora-torch-dora"):
        torch.manual_seed(0)
        built[provider] = PROVIDERS[provider].layer(K, N, True, r, 8, 0.0, torch.float32, CPU).eval()
    peft_layer = built["peft-dora"].proj
    ours = built["fastlora-torch-dora"]
    assert ours.use_dora and "default" in peft_layer.lora_magnitude_vector
    with torch.no_grad():
        ours.weight.copy_(peft_layer.base_layer.weight)
        ours.bias.copy_(peft_layer.base_layer.bias)
        ours.lora_A.copy_(peft_layer.lora_A["default"].weight)
        ours.lora_B.normal_()
        peft_layer.lora_B["default"].weight.copy_(ours.lora_B)
        ours.lora_magnitude_vector_default.normal_()
        peft_layer.lora_magnitude_vector["default"].weight.copy_(ours.lora_magnitude_vector_default)
        assert_close(ours(x), built["peft-dora"](x), kind="same_math")


def test_dora_target_lines():
    rows = []
    for mode, case in (("model", "tiny 2L 4x256"), ("layer", "q_proj")):
        extra = dict(M=8, K=4, N=4) if mode == "layer" else {}
        for p, times in ((0.1, {"peft": 1.0, "fastlora-torch": 0.8, "peft-dora": 2.0, "fastlora-torch-dora": 1.1}),
                         (0.0, {"peft": 1.0, "fastlora-torch": 0.9, "peft-dora": 1.2, "fastlora-torch-dora": 1.0})):
            for provider, ms in times.items():
                rows.append(dict(mode=mode, case=case, dtype="float32", dropout=p, provider=provider, fwd_bwd_ms=ms,
                                 saved_bytes=100 if provider != "fastlora-torch-dora" else 90,
                                 peak_mem_bytes=200 if provider != "fastlora-torch-dora" else 220, **extra))
    lines = report.targets(rows)
    assert not any("fastlora-torch step time / PEFT step time" in line for line in lines)  # judged without DoRA
    for head in ("tiny 2L 4x256 float32", "q_proj 8×4→4 float32"):
        assert f"{head} p=0.1: fastlora-torch-dora step time / peft-dora step time = 0.55 (goal ≤ 0.6): reached" in lines
        assert f"{head} p=0: fastlora-torch-dora step time / fastlora-torch step time = 1.11 (goal ≤ 1.15): reached" in lines
        assert f"{head} p=0: fastlora-torch-dora peak / fastlora-torch peak = 1.10 (goal ≤ 1.05): not reached" in lines
        assert f"{head} p=0.1: fastlora-torch-dora saved / PEFT (LoRA) saved = 0.90 (goal ≤ 1): reached" in lines


# ---- peak memory ------------------------------------------------------------------------------------


def test_cpu_peak_memory_sees_a_temporary():
    def step():
        t = torch.empty(256, 1024)  # 1 MiB, freed at the end of the step
        t.fill_(1.0)
        u = torch.empty(128, 1024)  # 0.5 MiB more while t is alive
        u.fill_(2.0)
        del t, u

    peak, how = peak_memory(step, CPU)
    if peak is None:
        assert how == "n/a"
        pytest.skip("torch.profiler gave no memory events here")
    assert 1.5 * 2**20 <= peak < 1.6 * 2**20
    assert "profiler" in how
    d, t = torch.zeros(64), torch.ones(64)
    assert peak_memory(lambda: d.add_(t), CPU)[0] == 0  # in place: nothing allocated


# ---- roofline, presets, ratios ----------------------------------------------------------------------


def test_layer_cost_flops_and_bytes():
    M, K, N, r = 64, 32, 48, 4
    base = layer_cost(M, K, N, r, lora=False, elem=2)
    assert base.flops == 4 * M * K * N
    assert base.bytes == 2 * (2 * (M * K + N * K + M * N))
    lora = layer_cost(M, K, N, r, lora=True, elem=2, adapter_elem=4)
    assert lora.flops - base.flops == 6 * M * r * (K + N)
    # forward adds A, B, S; backward reads x again and A, B, S, writes dA, dB
    assert lora.bytes - base.bytes == 4 * (r * K + N * r + M * r) + 2 * M * K + 4 * (M * r + 2 * (r * K + N * r))


def test_floor_is_max_of_compute_and_memory():
    roof = Roofline("test", tflops=1.0, bandwidth_gbs=1.0)  # 1e12 FLOP/s, 1e9 B/s
    cost = layer_cost(1000, 1000, 1000, 8, lora=False, elem=2)
    fl = floor_ms(cost, roof)
    assert fl["fwd"] == pytest.approx(max(2e9 / 1e12, 2 * 3e6 / 1e9) * 1e3)
    assert fl["fwd_bwd"] == pytest.approx(fl["fwd"] + fl["bwd"])


def test_gpu_table_lookup():
    assert find_gpu_spec("NVIDIA H100 80GB HBM3").name == "H100 SXM"
    assert find_gpu_spec("NVIDIA H100 NVL").name == "H100 NVL"
    assert find_gpu_spec("NVIDIA H200").name == "H200"
    assert find_gpu_spec("NVIDIA A100-SXM4-40GB").name == "A100 40GB"
    assert find_gpu_spec("NVIDIA A100-SXM4-80GB").name == "A100 80GB"
    assert find_gpu_spec("NVIDIA L40S").name == "L40S"
    assert find_gpu_spec("NVIDIA GeForce RTX 4090").name == "RTX 4090"
    assert find_gpu_spec("rtx 4090").tflops("bfloat16") == pytest.approx(165.2)
    assert find_gpu_spec("Tesla T4") is None


def test_presets_have_real_dims():
    llama = {n: (K, N) for n, K, N, _ in projections(MODEL_PRESETS["llama-3-8b"])}
    assert llama == {
        "q_proj": (4096, 4096), "k_proj": (4096, 1024), "v_proj": (4096, 1024), "o_proj": (4096, 4096),
        "gate_proj": (4096, 14336), "up_proj": (4096, 14336), "down_proj": (14336, 4096),
    }
    qwen = {n: (K, N, b) for n, K, N, b in projections(MODEL_PRESETS["qwen2.5-7b"])}
    assert qwen["k_proj"] == (3584, 512, True) and qwen["down_proj"] == (18944, 3584, False)
    assert [n for n, *_ in projections(MODEL_PRESETS["tiny"], ["q", "down_proj"])] == ["q_proj", "down_proj"]
    assert parse_shape("8,16,32") == (8, 16, 32)
    with pytest.raises(ValueError):
        parse_shape("8,16")


def test_ratios_within_a_case():
    common = dict(mode="layer", preset=None, case="shape", M=1, K=2, N=3, bias=False, r=4, dropout=0.1, dtype="float32")
    rows = [
        dict(common, provider="frozen", fwd_bwd_ms=1.0, fwd_ms=0.5, bwd_ms=0.5, saved_bytes=0, peak_mem_bytes=100),
        dict(common, provider="peft", fwd_bwd_ms=3.0, fwd_ms=1.0, bwd_ms=2.0, saved_bytes=400, peak_mem_bytes=300),
        dict(common, provider="fastlora-torch", fwd_bwd_ms=1.5, fwd_ms=0.5, bwd_ms=1.0, saved_bytes=100, peak_mem_bytes=None),
        dict(common, M=2, provider="peft", fwd_bwd_ms=9.0, fwd_ms=1.0, bwd_ms=2.0, saved_bytes=1, peak_mem_bytes=1),
    ]
    add_ratios(rows)
    fl = rows[2]
    assert fl["time_vs_frozen"] == pytest.approx(1.5)
    assert fl["time_vs_peft"] == pytest.approx(0.5)
    assert fl["saved_vs_peft"] == pytest.approx(0.25)
    assert fl["saved_vs_frozen"] is None  # frozen saved 0 bytes: no ratio, not infinity
    assert fl["peak_vs_peft"] is None  # not measured
    assert rows[1]["bwd_vs_frozen"] == pytest.approx(4.0)
    assert rows[3]["time_vs_frozen"] is None  # a different case (M=2) has no frozen row


def test_resolve_providers_skips_what_is_missing():
    chosen, skipped = resolve_providers(None, CPU)
    names = [p.name for p in chosen]
    assert names[0] == "frozen" and "peft" in names
    if not torch.cuda.is_available():
        assert "fastlora-triton" in skipped  # CPU tensors: only under the interpreter, and only when named
    with pytest.raises(ValueError):
        resolve_providers(["nope"], CPU)


def test_run_layers_rows():
    chosen, _ = resolve_providers(["frozen", "peft"], CPU)
    case = LayerCase("shape", None, 16, 8, 12, False, 2, 8.0, 0.1, torch.float32)
    rows = add_ratios(run_layers([case], chosen, CPU, warmup=0, repeats=2, memory=False,
                                 roofline=Roofline("t", 1.0, 1.0)))
    assert [r["provider"] for r in rows] == ["frozen", "peft"]
    for r in rows:
        assert r["fwd_bwd_ms"] > 0 and r["fwd_ms"] > 0 and r["bwd_ms"] > 0
        assert r["floor_ms"] > 0 and r["of_floor"] == pytest.approx(r["fwd_bwd_ms"] / r["floor_ms"])
        assert r["peak_mem_bytes"] is None and r["peak_mem_method"] == "not measured"
    assert rows[0]["saved_bytes"] == 0 and rows[1]["saved_new_bytes"] == 16 * 8 * 8 + 16 * 2 * 4


# ---- torch.compile'd providers ---------------------------------------------------------------------


def test_compile_flag_adds_each_chosen_providers_compiled_twin():
    chosen, _ = resolve_providers(["frozen", "peft", "fastlora-torch"], CPU, with_compiled=True)
    names = [p.name for p in chosen]
    assert names == ["frozen", "peft", "fastlora-torch", "frozen+compile", "peft+compile", "fastlora-torch+compile"]
    assert [p.compiled for p in chosen] == [False] * 3 + [True] * 3
    # named twice (by hand and by the flag): once; a provider without a compiled twin adds none
    chosen, _ = resolve_providers(["peft+patch", "peft", "peft+compile"], CPU, with_compiled=True)
    assert [p.name for p in chosen] == ["peft+patch", "peft", "peft+compile"]
    assert not any(p.compiled for p in resolve_providers(None, CPU)[0])  # not in the default set


def _slow_first_call_provider(first_call_s: float) -> Provider:
    """A 'compiled' provider whose first call sleeps, as a compiling one spends its first call compiling."""

    def layer(K, N, bias, r, alpha, p, dtype, device):
        lin = nn.Linear(K, N, bias=bias, dtype=dtype)
        calls = []

        def first_call_is_slow(module, args):
            if not calls:
                time.sleep(first_call_s)
            calls.append(1)

        lin.register_forward_pre_hook(first_call_is_slow)
        return lin.requires_grad_(False)

    return Provider("slow+compile", lambda device, explicit: None, layer, None, compiled=True, lora=False)


def test_the_compiling_call_is_timed_apart_and_never_in_a_round(monkeypatch):
    """The first call of a compiled provider runs before the rounds, timed on its own, after Dynamo's caches are
    emptied (every case compiles afresh); a compiled frozen base is costed as the frozen base."""
    resets = []
    real_reset = torch._dynamo.reset
    monkeypatch.setattr(torch._dynamo, "reset", lambda: resets.append(1) or real_reset())
    frozen = PROVIDERS["frozen"]
    cases = [LayerCase("shape", None, 16, 8, 12, False, 2, 8.0, 0.1, torch.float32),
             LayerCase("shape", None, 32, 8, 12, False, 2, 8.0, 0.1, torch.float32)]
    rows = run_layers(cases, [frozen, _slow_first_call_provider(0.5)], CPU, warmup=0, repeats=2, memory=False,
                      roofline=Roofline("t", 1.0, 1.0))
    assert len(resets) == 2  # once per case
    for case in cases:
        by = {r["provider"]: r for r in rows if r["M"] == case.M}
        assert by["frozen"]["compile_s"] is None
        assert by["slow+compile"]["compile_s"] >= 0.5
        assert by["slow+compile"]["fwd_bwd_ms_max"] < 500  # no timed round (no warm-up here) took the first call
        assert by["slow+compile"]["flops"] == by["frozen"]["flops"] and by["slow+compile"]["adapter_dtype"] is None
    assert PROVIDERS["frozen+compile"].lora is False and PROVIDERS["peft+compile"].lora is True


def test_compiled_rows_have_ratios_to_compiled_peft_and_the_compiled_floor():
    common = dict(mode="model", case="tiny 2L 4x256", layers=2, batch=4, seq=256, r=8, dtype="float32", dropout=0.1,
                  preset="tiny", other_load=0.01)
    rows = add_ratios([
        dict(common, provider="frozen", fwd_bwd_ms=1.0, saved_bytes=50),
        dict(common, provider="peft", fwd_bwd_ms=2.0, saved_bytes=100),
        dict(common, provider="fastlora-torch", fwd_bwd_ms=1.6, saved_bytes=64),
        dict(common, provider="frozen+compile", fwd_bwd_ms=0.8, saved_bytes=40, compile_s=9.5),
        dict(common, provider="peft+compile", fwd_bwd_ms=1.5, saved_bytes=90, compile_s=12.0),
        dict(common, provider="fastlora-torch+compile", fwd_bwd_ms=0.9, saved_bytes=60, compile_s=10.0),
    ])
    ours = rows[2]
    assert ours["time_vs_peft"] == pytest.approx(0.8) and ours["time_vs_peft_compiled"] == pytest.approx(1.6 / 1.5)
    assert rows[5]["time_vs_frozen_compiled"] == pytest.approx(0.9 / 0.8)
    # faster than the eager frozen base is fine for a compiled provider, not faster than the compiled one
    assert report.unreliable(rows) == {}
    rows[5]["fwd_bwd_ms"] = 0.7
    assert "faster than the compiled frozen base (0.700 < 0.800 ms)" in report.unreliable(rows)[id(rows[5])]
    table = report.format_table(rows)
    assert "step ×PEFT+compile" in table and "compile s" in table and "timed apart" in table
    line = next(ln for ln in table.splitlines() if ln.strip().startswith("peft+compile"))
    assert "12.0" in line and "1.00×" in line
    assert "compile s" not in report.format_table(rows[:3])  # runs without compiled providers: no such columns


def test_compiled_fastlora_layer_computes_what_the_eager_one_does():
    """The +compile provider is the same layer under torch.compile: equal output and gradients."""
    if PROVIDERS["fastlora-torch+compile"].unavailable(CPU, True):
        pytest.skip(PROVIDERS["fastlora-torch+compile"].unavailable(CPU, True))
    torch.manual_seed(0)
    eager = PROVIDERS["fastlora-torch"].layer(16, 12, True, 4, 8.0, 0.0, torch.float32, CPU)
    torch.manual_seed(0)
    compiled = PROVIDERS["fastlora-torch+compile"].layer(16, 12, True, 4, 8.0, 0.0, torch.float32, CPU)
    with torch.no_grad():
        for (_, a), (_, b) in zip(eager.named_parameters(), compiled.named_parameters()):
            b.copy_(torch.randn_like(a)), a.copy_(b)
    x = torch.randn(8, 16)
    outs = []
    for m in (eager, compiled):
        xi = x.clone().requires_grad_(True)
        y = m(xi)
        y.square().sum().backward()
        outs.append((y, xi.grad, *[p.grad for p in m.parameters() if p.requires_grad]))
    assert isinstance(compiled, torch._dynamo.eval_frame.OptimizedModule)
    for a, b in zip(*outs):
        assert_close(b, a, kind="same_math")


# ---- the CLI, files and the markdown --------------------------------------------------------------


def test_cli_layers_writes_json_csv_plot_markdown(tmp_path, capsys):
    j, c, p, md = (tmp_path / n / f"r.{n}" for n in ("json", "csv", "png", "md"))  # missing folders are made
    rc = main([
        "--shape", "32,16,24", "--providers", "frozen,peft,fastlora-torch", "--warmup", "0", "--repeats", "2",
        "--peak-tflops", "1", "--bandwidth-gbs", "10", "--json", str(j), "--csv", str(c), "--plot", str(p),
        "--markdown", str(md), "--no-progress",
    ])
    assert rc == 0
    out = capsys.readouterr().out
    assert "time ×frozen" in out and "time ×PEFT" in out and "32×16→24" in out
    doc = json.loads(j.read_text())
    assert doc["schema"] == report.SCHEMA and doc["command"].startswith("fastlora bench")
    assert len(doc["rows"]) >= 2
    for row in doc["rows"]:
        for k in META_KEYS:
            assert k in row
        assert row["floor_ms"] > 0
        assert row["peak_mem_method"]
    with open(c) as f:
        csv_rows = list(csv.DictReader(f))
    assert len(csv_rows) == len(doc["rows"])
    assert all(r["torch"] == torch.__version__ and r["cpu"] for r in csv_rows)
    assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| case | provider | time ×frozen |" in md.read_text()


def test_cli_model_mode_tiny(tmp_path, capsys):
    j = tmp_path / "m.json"
    rc = main([
        "--model", "tiny", "--layers", "1", "--batch", "1", "--seq", "16", "--vocab", "64", "--warmup", "0",
        "--repeats", "1", "--providers", "frozen,peft", "--no-memory", "--no-progress", "--json", str(j),
    ])
    assert rc == 0
    rows = json.loads(j.read_text())["rows"]
    assert {(r["provider"], r["dropout"]) for r in rows} == {(p, d) for p in ("frozen", "peft") for d in (0.1, 0.0)}
    for r in rows:
        assert r["mode"] == "model" and r["tokens"] == 16 and r["tokens_per_s"] > 0 and r["saved_bytes"] > 0
    peft01 = next(r for r in rows if r["provider"] == "peft" and r["dropout"] == 0.1)
    assert peft01["saved_vs_frozen"] > 1.0  # PEFT's dropped copies and masks
    assert next(r for r in rows if r["provider"] == "frozen")["trainable_params"] == 0


LAYER_RUN = ["--shape", "8,16,16", "--providers", "frozen", "--warmup", "0", "--repeats", "1", "--no-memory",
             "--no-progress"]


@pytest.fixture
def no_measuring(monkeypatch):
    """Any measurement fails the test: the checks must come first."""
    from fastlora.bench import cli

    def measure(*args, **kwargs):
        raise AssertionError("measured before the arguments were checked")

    for name in ("run_layers", "run_model", "_run_steps"):
        monkeypatch.setattr(cli, name, measure)


def _bench_usage_error(capsys, argv: list[str]) -> str:
    """The error line of ``fastlora bench ARGV``, which must be a usage error (exit 2, no traceback)."""
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "Traceback" not in err, err
    line = err.strip().splitlines()[-1]
    assert line.startswith("fastlora bench: error: "), line
    return line


@pytest.mark.parametrize("argv, message", [
    (["--rank", "0"], "argument --rank/-r: must be an integer ≥ 1, not '0'"),
    (["--dropout", "1.5"], "argument --dropout: must be a number from 0 to below 1, not '1.5'"),
    (["--dropout", "0.1,-0.1"], "argument --dropout: must be a number from 0 to below 1, not '-0.1'"),
    (["--alpha", "nan"], "argument --alpha: must be a number > 0, not 'nan'"),
    (["--threads", "-2"], "argument --threads: must be an integer ≥ 1, not '-2'"),
    (["--device", "foo"], "argument --device: must be cpu, cuda or cuda:INDEX, not 'foo'"),
    (["--device", "mps"], "argument --device: must be cpu, cuda or cuda:INDEX, not 'mps'"),
    (["--tokens", "-5"], "argument --tokens: must be an integer ≥ 1, not '-5'"),
    (["--preset", "tiny", "--proj", "nope"], "argument --proj: unknown 'nope'; choose from q_proj, k_proj"),
    (["--shape", "8,16"], "argument --shape: must be M,K,N"),
    (["--repeats", "0"], "argument --repeats: must be an integer ≥ 1, not '0'"),
    (["--repeats", "-3"], "argument --repeats: must be an integer ≥ 1, not '-3'"),
    (["--warmup", "-1"], "argument --warmup: must be an integer ≥ 0, not '-1'"),
    (["--max-other-load", "5"], "argument --max-other-load: must be a number from 0 to 1, not '5'"),
    (["--retries", "-1"], "argument --retries: must be an integer ≥ 0"),
    (["--wait-idle", "-1"], "argument --wait-idle: must be a number ≥ 0"),
    (["--profile", "-1"], "argument --profile: must be an integer ≥ 0"),
    (["--peak-tflops", "-5"], "argument --peak-tflops: must be a number > 0, not '-5'"),
    (["--bandwidth-gbs", "-1"], "argument --bandwidth-gbs: must be a number > 0, not '-1'"),
    (["--providers", ""], "argument --providers: must be a comma-separated list, not empty"),
    (["--providers", "frozen,nope"], "argument --providers: unknown 'nope'; choose from frozen"),
    (["--gpu", "H900"], "argument --gpu: 'H900' is not in the table (H200"),
    (["--hidden", "64"], "--hidden applies only with --step"),
    (["--adapters", "1,2"], "--adapters applies only with --step"),
    (["--layers", "3"], "--layers sizes the model benchmark (--model, --quick) or --step"),
    (["--preset", "tiny", "--seq", "64"], "--seq sizes the model benchmark"),
    (["--step", "mixed-batch", "--adapters", "0"], "argument --adapters: must be an integer ≥ 1, not '0'"),
    (["--step", "mixed-batch", "--adapters", "x"], "argument --adapters: must be an integer ≥ 1, not 'x'"),
    (["--step", "mixed-batch", "--hidden", "-16"], "argument --hidden: must be an integer ≥ 1, not '-16'"),
    (["--step", "gpt2", "--hidden", "24"], "--hidden must be a multiple of 16 with --step"),
    (["--step", "gpt2", "--adapters", "2"], "--adapters applies only with --step mixed-batch"),
    (["--step", "gpt2", "--preset", "tiny"], "--step takes one --preset, for its mixed-batch, qlora-nf4"),
    (["--quant", "nf4", "--preset", "tiny", "--preset", "llama-3-8b"], "--step takes one --preset"),
    (["--step", "qdora-nf4", "--preset", "tiny", "--hidden", "64"], "--hidden and --preset both set the width"),
])
def test_bench_refuses_bad_values_before_measuring(capsys, no_measuring, argv, message):
    step_mode = argv[0] in ("--step", "--quant")
    assert message in _bench_usage_error(capsys, ["--device", "cpu", *([] if step_mode else LAYER_RUN), *argv])


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_bench_refuses_cuda_where_there_is_none(capsys, no_measuring):
    assert _bench_usage_error(capsys, ["--device", "cuda", *LAYER_RUN]).endswith(
        "--device cuda: CUDA is not available here")


def test_bench_step_mode_refuses_the_options_it_does_not_use(capsys, no_measuring):
    """--step runs whole models of its own: the layer benchmark's options would be silently ignored, so they are
    refused, each by name; the --step help names exactly the options that apply."""
    from fastlora.bench.cli import STEP_OPTIONS, build_parser

    line = _bench_usage_error(capsys, [
        "--step", "gpt2", "--providers", "frozen", "--rank", "2", "--dropout", "0.5", "--dtype", "bf16", "--csv",
        "x.csv", "--markdown", "x.md", "--model", "--max-other-load", "0.1", "--gpu", "H100 SXM"])
    assert line.endswith("--csv, --dropout, --dtype, --gpu, --markdown, --max-other-load, --model, --providers, "
                         "--rank: not used with --step (see --help for the options that apply)")
    parser = build_parser()
    step_help = next(a.help for a in parser._actions if a.dest == "step")
    named = set(re.findall(r"--[a-z-]+", step_help.split("apply with it:")[1]))
    assert named == {"--" + dest.replace("_", "-") for dest in STEP_OPTIONS[1:]}
    for case in ("gpt2", "moe", "qlora-nf4", "qlora-int8", "qdora-nf4", "mixed-batch"):
        assert f"{case} (" in step_help or f"{case}, " in step_help, case
    assert "seed config" not in parser.format_help()


def test_bench_checks_every_output_path_before_measuring(tmp_path, capsys, no_measuring):
    afile = tmp_path / "afile"
    afile.write_text("x")
    for option in ("--json", "--csv", "--plot", "--markdown"):
        line = _bench_usage_error(capsys, ["--device", "cpu", *LAYER_RUN, option, str(tmp_path)])
        assert line.endswith(f"{option} {tmp_path}: is a folder; give a file")
        line = _bench_usage_error(capsys, ["--device", "cpu", *LAYER_RUN, option, str(afile / "sub" / "out")])
        assert line.endswith(f"{option} {afile / 'sub' / 'out'}: {afile} is a file, not a folder")
    line = _bench_usage_error(capsys, ["--device", "cpu", "--step", "mixed-batch", "--json", str(tmp_path)])
    assert line.endswith(f"--json {tmp_path}: is a folder; give a file")


def test_report_main_says_what_is_wrong_with_its_files(tmp_path, capsys):
    empty, listing = tmp_path / "empty.json", tmp_path / "list.json"
    empty.write_text("")
    listing.write_text("[]")
    for argv, message in (([str(tmp_path / "missing.json")], "missing.json: No such file or directory"),
                          ([str(empty)], "empty.json: not a JSON file"),
                          ([str(listing)], "none of the files holds layer / model rows"),
                          ([str(listing), "--page", str(tmp_path / "no" / "page.md")], "page.md: no such file"),
                          ([str(listing), "-o", str(empty / "x.md")], f"{empty} is a file, not a folder")):
        with pytest.raises(SystemExit) as exit_:
            report.main(argv)
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and "Traceback" not in err
        assert err.strip().splitlines()[-1].startswith("python -m fastlora.bench.report: error: ") and message in err


def test_report_main_and_targets(tmp_path, capsys):
    meta = {"cpu": "Test CPU", "device": "cpu", "threads": 2, "torch": "x", "git_commit": "abc"}
    common = dict(mode="model", preset="tiny", case="tiny 2L 4x256", layers=2, batch=4, seq=256, r=8, dtype="float32")
    rows = []
    # fastlora at p=0.1 keeps two 8-byte seeds more than at p=0, and nothing else
    for p, fl_t, fl_s, seeds, pe_t, pe_s in ((0.1, 0.8, 76, 2, 1.0, 100), (0.0, 0.7, 60, 0, 0.9, 70)):
        rows += [
            dict(common, dropout=p, provider="frozen", fwd_bwd_ms=0.5, saved_bytes=50),
            dict(common, dropout=p, provider="peft", fwd_bwd_ms=pe_t, saved_bytes=pe_s),
            dict(common, dropout=p, provider="fastlora-torch", fwd_bwd_ms=fl_t, saved_bytes=fl_s,
                 saved_one_element_bytes=8 * seeds, saved_one_element_tensors=seeds),
        ]
    add_ratios(rows)
    path = tmp_path / "res.json"
    report.write_json(path, rows, meta)
    assert report.main([str(path), "--plot-link", "bench/results/x.png"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("## Performance")
    assert "| case | provider | step ×frozen | step ×PEFT |" in out
    assert "saved / PEFT saved = 0.76 (goal ≤ 0.7): not reached" in out
    assert "step time / PEFT step time = 0.80 (goal ≤ 0.85): reached" in out
    assert ("saved activations(p) / saved activations(p=0) [all saved storages +16 bytes, +2 one-element "
            "tensors] = 1.00 (goal ≤ 1): reached") in out
    # one more activation byte at p > 0 is a miss
    rows[2]["saved_bytes"] += 1
    report.write_json(path, rows, meta)
    assert report.main([str(path)]) == 0
    assert "+17 bytes, +2 one-element tensors] = 1.02 (goal ≤ 1): not reached" in capsys.readouterr().out
    assert "![fastlora benchmark](bench/results/x.png)" in out
    with pytest.raises(ValueError):
        bad = tmp_path / "bad.json"
        bad.write_text("{}")
        report.read_results(bad)


def test_other_load_share_and_retry_bookkeeping():
    from fastlora.bench.measure import OtherLoad

    with OtherLoad() as o:
        sum(i * i for i in range(20000))  # our own CPU time is not counted as "other"
    assert o.value is None or 0.0 <= o.value <= 1.0
    chosen, _ = resolve_providers(["frozen"], CPU)
    case = LayerCase("shape", None, 8, 8, 8, False, 2, 8.0, 0.0, torch.float32)
    from fastlora.bench.runner import Quiet

    rows = run_layers([case], chosen, CPU, warmup=0, repeats=1, memory=False, quiet=Quiet(max_other=1.0, retries=1, wait_s=0))
    assert rows[0]["attempts"] == 1 and (rows[0]["other_load"] is None or rows[0]["other_load"] <= 1.0)


def test_report_embeds_between_readme_markers(tmp_path):
    from fastlora.bench.report import README_END, README_START, embed_in_readme

    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{README_START}\nold table\n{README_END}\noutro\n")
    embed_in_readme(readme, "## Performance\n\n| a | b |\n")
    assert readme.read_text() == f"intro\n{README_START}\n| a | b |\n{README_END}\noutro\n"
    embed_in_readme(readme, "## Performance\n\nnew\n")  # idempotent on its own output
    assert readme.read_text() == f"intro\n{README_START}\nnew\n{README_END}\noutro\n"
    (tmp_path / "bare.md").write_text("no markers")
    with pytest.raises(SystemExit, match="markers"):
        embed_in_readme(tmp_path / "bare.md", "x")


# ---- a benchmark that never misleads -----------------------------------------------------------------


def _model_rows(**fastlora_fields):
    common = dict(mode="model", case="tiny 2L 4x256", dtype="float32", dropout=0.1, other_load=0.01)
    return [dict(common, provider="frozen", fwd_bwd_ms=0.5, saved_bytes=50),
            dict(common, provider="peft", fwd_bwd_ms=1.0, saved_bytes=100),
            dict(common, **{"provider": "fastlora-torch", "fwd_bwd_ms": 0.8, "saved_bytes": 64, **fastlora_fields})]


def test_targets_are_not_judged_on_unreliable_timings():
    assert "step time / PEFT step time = 0.80 (goal ≤ 0.85): reached" in "\n".join(report.targets(_model_rows()))
    loaded = report.targets(_model_rows(other_load=0.4))
    line = next(t for t in loaded if "step time" in t)
    assert "not judged (fastlora-torch: other processes used 40% of the CPUs" in line
    assert any("saved / PEFT saved = 0.64 (goal ≤ 0.7): reached" in t for t in loaded)  # bytes do not depend on load
    noisy = report.targets(_model_rows(fwd_bwd_ms_q1=0.5, fwd_bwd_ms_q3=0.9))
    assert "not judged (fastlora-torch: its rounds spread 50% of the median" in next(t for t in noisy if "step time" in t)
    table = report.format_table(_model_rows(fwd_bwd_ms=0.1))
    assert "! fastlora-torch: not reliable: faster than the frozen base (0.100 < 0.500 ms): impossible" in table
    assert "not judged" in next(t for t in report.targets(_model_rows(fwd_bwd_ms=0.1)) if "step time" in t)


def test_markdown_of_an_ad_hoc_run_does_not_claim_the_results_directory():
    doc = {"schema": report.SCHEMA, "meta": {}, "rows": _model_rows(other_load=0.3)}
    ad_hoc = report.markdown([doc], from_results_dir=False)
    assert "bench/results" not in ad_hoc and "Measured by the command below" in ad_hoc
    assert "Timings not to be trusted" in ad_hoc and "other processes used 30% of the CPUs" in ad_hoc
    assert "bench/results" in report.markdown([doc])


def test_plot_without_matplotlib_names_the_extra(monkeypatch, capsys):
    import sys

    from fastlora.bench import cli

    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(SystemExit):
        cli.main(["--quick", "--plot", "x.png"])
    assert "pip install 'fastlora-kernels[bench]'" in capsys.readouterr().err


def test_profiler_chatter_does_not_reach_the_terminal(capfd):
    from fastlora.bench.measure import peak_memory

    x = torch.randn(64, 64, requires_grad=True)
    peak, how = peak_memory(lambda: (x @ x).sum().backward(), CPU)
    assert peak is not None and how.startswith("cpu allocator")
    assert "USDT" not in capfd.readouterr().err


@pytest.mark.parametrize("choice, case, adapter", [(["--quant", "nf4"], "qlora-nf4", "qlora"),
                                                    (["--step", "qdora-nf4"], "qdora-nf4", "qdora")],
                         ids=["qlora-nf4", "qdora-nf4"])
def test_qlora_step_reports_cpu_peak_memory(tmp_path, capsys, choice, case, adapter):
    """The QLoRA (``--quant nf4``) and QDoRA steps' peak memory on the CPU (torch's allocator through the
    profiler) for every provider: at least the activations the step keeps for backward, which it allocates; and
    fastlora's peak above the frozen 4-bit model's at most what it keeps beyond it, its adapters' gradients and one
    layer's dequantized weight (float32, the largest: the MLP's), made and dropped layer by layer."""
    import json

    pytest.importorskip("bitsandbytes")
    from fastlora.bench.cli import main

    out = tmp_path / "qlora.json"
    assert main(["--device", "cpu", *choice, "--hidden", "64", "--layers", "1", "--batch", "2",
                 "--seq", "16", "--vocab", "128", "--warmup", "0", "--repeats", "1", "--no-progress",
                 "--json", str(out)]) == 0
    rows = {r["provider"]: r for r in json.loads(out.read_text())["rows"]}
    # the providers named after the adapter: PEFT's and fastlora's QLoRA (QDoRA) beside the frozen 4-bit base
    assert sorted(rows) == [f"fastlora-{adapter}", "frozen", f"peft-{adapter}"]
    assert {r["step"] for r in rows.values()} == {case}
    assert {r["provider"]: r["library"] for r in rows.values()} == {
        "frozen": "frozen", f"peft-{adapter}": "peft", f"fastlora-{adapter}": "fastlora"}
    for r in rows.values():
        assert r["peak_bytes"] is not None and r["peak_bytes"] >= r["saved_bytes"] > 0, r
    ours, frozen, theirs = rows[f"fastlora-{adapter}"], rows["frozen"], rows[f"peft-{adapter}"]
    line = next(li for li in capsys.readouterr().out.splitlines() if li.strip().startswith(f"fastlora-{adapter}"))
    assert line.split()[2:4] == [f"{ours['step_ms'] / frozen['step_ms']:.2f}x", f"{ours['step_ms'] / theirs['step_ms']:.2f}x"]
    dequantized_layer = 64 * int(64 * 2.6875) * 4  # hidden × the MLP width the case builds, float32
    adapter_grads = 4 * ours["trainable_params"]
    assert ours["peak_bytes"] - frozen["peak_bytes"] <= (ours["saved_bytes"] - frozen["saved_bytes"]) + adapter_grads \
        + dequantized_layer, (ours, frozen)


def test_a_quantized_steps_roles_load_one_checkpoint_written_once(monkeypatch):
    """The frozen, PEFT and fastlora models of a QLoRA step load one checkpoint, written once (a Llama-3-8B-width
    layer is 0.9 GB in float32: writing it per role would eat the GPU check's time), so they hold one set of
    weights."""
    pytest.importorskip("bitsandbytes")
    from transformers import LlamaForCausalLM

    from fastlora.bench.steps import STEP_CASES, StepSizes

    writes = []
    save = LlamaForCausalLM.save_pretrained
    monkeypatch.setattr(LlamaForCausalLM, "save_pretrained",
                        lambda self, directory, **kw: (writes.append(directory), save(self, directory, **kw))[1])
    sizes = StepSizes(hidden=64, layers=1, batch=1, seq=8, vocab=64)
    build = STEP_CASES["qlora-nf4"].build
    first, second = build(sizes, "cpu"), build(sizes, "cpu")
    assert len(writes) == 1
    weights = [m.model.layers[0].mlp.down_proj.weight.data for m in (first, second)]
    assert first is not second and torch.equal(*weights)


def _script(args: list[str]) -> None:
    """Run bench/ARGS[0] with the rest of ARGS as a script (as gpu_check.sh does); it must succeed."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    done = subprocess.run([sys.executable, str(root / "bench" / args[0]), *args[1:]], capture_output=True, text=True,
                          timeout=900, cwd=root)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]


def _dry_run(tmp_path, script: str) -> tuple[dict, list[dict]]:
    """A measuring script's --dry-run: its results file and the classes of the schedule table it writes."""
    import json

    out, table = tmp_path / "results.json", tmp_path / "kernel_schedules.json"
    _script([script, "--dry-run", "--json", str(out), "--package-table", str(table)])
    return json.loads(out.read_text()), json.loads(table.read_text())["classes"]


def test_kernel_variants_script_runs_its_code_paths(tmp_path):
    """bench/kernel_variants.py (the GPU run that decides the kernel design) in its --dry-run mode: the real
    launches of every schedule and precision variant under Triton's interpreter, tiny shapes, the JSON with a
    decision.  Its timings mean nothing here; the point is that the one GPU run cannot fail on a code path."""
    result, classes = _dry_run(tmp_path, "kernel_variants.py")
    assert set(result["shapes"]) == {"tiny M=24", "tiny M=40"}
    variants = result["shapes"]["tiny M=24"]["variants"]
    assert len(variants) == 2 * 6 * 2  # dropouts × schedules × precisions
    assert {(v["base"], v["db"], v["low_rank"]) for v in variants} == {
        ("fused", d, lr) for d in ("atomic", "separate") for lr in ("prologue", "epilogue")} | {
        ("cublas", d, "prologue") for d in ("atomic", "separate")}
    assert set(result["decision"]) == {f"p={p} {q}" for p in ("0.1", "0") for q in ("tf32x3", "tf32")} | {
        "tf32x3_error_within_4x_peft"}
    assert all(0 <= e < 1 for errs in result["errors"]["tiny M=24"].values() for e in errs.values())
    # the package's table: one class per token count measured, split at their geometric mean (√(24·40) ≈ 31)
    assert [(c["N"], c["K"], c["tokens"]) for c in classes] == [(40, 48, [24, 30]), (40, 48, [31, 40])]
    assert all(set(c["variants"]) == {"base", "db", "low_rank"} for c in classes)
    assert isinstance(result["gemm_autotune_winners"], list)  # one config under the interpreter: none tuned


def test_a_budget_cut_in_the_crossover_keeps_the_decision_of_fastlora_routes(monkeypatch):
    """The crossover times fastlora's two 4-bit routes first: a budget that runs out before the frozen layer and
    PEFT's still leaves the winner (and its base_4bit class), and no ratio over PEFT's missing time."""
    pytest.importorskip("bitsandbytes")
    from fastlora.kernels.configs import INTERPRET

    if not INTERPRET:
        pytest.skip("the fused 4-bit path on the CPU needs Triton's interpreter")
    from pathlib import Path

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parent.parent / "bench"))
    import qlora_crossover as qc

    out = {"shapes": {}}
    times = iter([2.0, 1.0])
    qc._measure("tiny M=24", 24, qc._layers(72, 40, 4, 0.1, "cpu"), 4, 0.1, "cpu", lambda step: next(times), out,
                lambda what: what.endswith(("frozen-nf4", "peft-qlora")))
    entry = out["shapes"]["tiny M=24"]
    assert entry["ms"] == {"fastlora-qlora": 2.0, "fastlora-qlora-fused": 1.0}
    assert entry["base_4bit"] == "fused" and entry["fused_over_dequant"] == 0.5 and "over_peft" not in entry
    assert [c["variants"] for c in qc.schedule_table(out)] == [{"base_4bit": "fused"}]


def test_qlora_crossover_script_runs_its_code_paths(tmp_path):
    """bench/qlora_crossover.py (where the fused 4-bit GEMM beats dequantize-then-cuBLAS) in its --dry-run mode:
    the four QLoRA layers over one nf4 weight under Triton's interpreter, the fused one checked to take the fused
    path, the winners as base_4bit classes of the package's table.  Timings mean nothing here."""
    import json

    pytest.importorskip("bitsandbytes")
    result, classes = _dry_run(tmp_path, "qlora_crossover.py")
    assert set(result["shapes"]) == {"tiny M=24", "tiny M=40"}
    for entry in result["shapes"].values():
        assert set(entry["ms"]) == {"frozen-nf4", "peft-qlora", "fastlora-qlora", "fastlora-qlora-fused"}
        # PEFT's row is its bitsandbytes 4-bit layer (what get_peft_model makes on a 4-bit model), not lora.Linear
        assert entry["layers"]["peft-qlora"] == "peft.tuners.lora.bnb.Linear4bit", entry["layers"]
        assert entry["layers"]["fastlora-qlora-fused"] == "fastlora.quantized.LoRAQuantizedLinear"
        assert all(t > 0 for t in entry["ms"].values())
        ms = entry["ms"]
        assert entry["base_4bit"] == ("fused" if ms["fastlora-qlora-fused"] < ms["fastlora-qlora"] else "dequant")
    assert [t["M"] for t in result["crossover"]["72->40"]["tokens"]] == [24, 40]
    assert [(c["N"], c["K"], c["tokens"]) for c in classes] == [(40, 72, [24, 30]), (40, 72, [31, 40])]
    assert all(set(c["variants"]) == {"base_4bit"} for c in classes)
    # committing a GPU run's results: the same classes from its results file, into a table that has others
    again = tmp_path / "package.json"
    again.write_text(json.dumps({"runs": [], "classes": [{"N": 40, "K": 72, "tokens": [1, 99],
                                                          "variants": {"base": "fused"}}]}))
    _script(["qlora_crossover.py", "--from-json", str(tmp_path / "results.json"), "--package-table", str(again)])
    assert json.loads(again.read_text())["classes"][1:] == classes


def test_the_package_table_keeps_the_other_runs_classes(tmp_path):
    """The dense run (kernel_variants.py) and the 4-bit run (qlora_crossover.py) write one table, in either order:
    each keeps the variants the other decided, and a second run of one replaces its own."""
    import json
    import sys
    from pathlib import Path

    from fastlora import schedules

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
    import kernel_variants as kv

    path = str(tmp_path / "table.json")
    dense = [{"N": 12, "K": 16, "tokens": [64, 256], "variants": {"base": "fused", "db": "atomic", "low_rank": "prologue"}}]
    four_bit = [{"N": 12, "K": 16, "tokens": [1, 128], "variants": {"base_4bit": "fused"}},
                {"N": 12, "K": 16, "tokens": [129, 8192], "variants": {"base_4bit": "dequant"}}]
    kv.write_package_table(path, four_bit, {"run": 1}, "crossover.json")
    kv.write_package_table(path, dense, {"run": 2}, "variants.json")
    table = json.loads(Path(path).read_text())
    assert table["classes"] == four_bit + dense
    assert [r["source"] for r in table["runs"]] == ["crossover.json", "variants.json"]
    assert schedules.table_variants(100, 12, 16, table["classes"]) == {
        "base_4bit": "fused", "base": "fused", "db": "atomic", "low_rank": "prologue"}
    assert schedules.table_variants(200, 12, 16, table["classes"])["base_4bit"] == "dequant"
    again = [{"N": 12, "K": 16, "tokens": [1, 8192], "variants": {"base_4bit": "dequant"}}]
    kv.write_package_table(path, again, {"run": 3}, "crossover.json")
    table = json.loads(Path(path).read_text())
    assert table["classes"] == dense + again
    assert [r["source"] for r in table["runs"]] == ["variants.json", "crossover.json"]


def test_kernel_variants_records_which_gemm_config_won(monkeypatch):
    """The run records the fused GEMM autotune's winner per key, with its schedule flags (TMA or not)."""
    import sys
    from pathlib import Path
    from types import SimpleNamespace

    import triton

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
    import kernel_variants as kv

    won = triton.Config({"BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_K": 64, "GROUP_M": 8, "TMA": True,
                         "PERSISTENT": False}, num_warps=8, num_stages=3)
    tuned = {(False, True, False, True): {(8192, 4096, 4096, 1, False): won}}
    monkeypatch.setattr(kv, "autotuned_gemm", lambda *flags: SimpleNamespace(cache=tuned.get(flags, {})))
    assert kv.gemm_winners() == [{
        "operands": "16-bit", "masked": True, "tma_readable": True, "key": ["8192", "4096", "4096", "1", "False"],
        "config": {"BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_K": 64, "GROUP_M": 8, "TMA": True, "PERSISTENT": False,
                   "num_warps": 8, "num_stages": 3}}]


def test_the_schedule_table_picks_per_shape_and_the_environment_wins(monkeypatch):
    from fastlora import schedules

    table = [{"N": 12, "K": 16, "tokens": [64, 256], "variants": {"base": "fused", "low_rank": "epilogue"}}]
    monkeypatch.setattr(schedules, "_TABLE", table)
    weight = torch.zeros(12, 16)
    assert schedules.resolve("triton", torch.zeros(128, 16), weight).base == "fused"
    assert schedules.resolve("triton", torch.zeros(4, 100, 16), weight).low_rank == "epilogue"  # 400 tokens: near
    assert schedules.resolve("triton", torch.zeros(2048, 16), weight).base == "cublas"  # far from the class
    assert schedules.resolve("triton", torch.zeros(128, 32), torch.zeros(12, 32)).base == "cublas"  # no class
    monkeypatch.setenv("FASTLORA_KERNEL_VARIANTS", "base=cublas")
    resolved = schedules.resolve("triton", torch.zeros(128, 16), weight)
    assert (resolved.base, resolved.low_rank) == ("cublas", "epilogue")
    monkeypatch.undo()
    assert schedules.schedule_table() == schedules._read_table() == []  # the committed table: no GPU run yet


def test_kernel_variants_decision_only_compares_complete_shapes():
    """A shape the budget cut short does not decide; missing error data is "not measured", not a failure."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
    import kernel_variants as kv

    def variant(base, db, low_rank, ms, p=0.1, precision="tf32x3"):
        return {"dropout": p, "base": base, "db": db, "low_rank": low_rank, "precision": precision,
                "ms": {"forward": ms / 2, "backward": ms / 2}}

    every = [variant(v["base"], v["db"], v["low_rank"], 2.0 if v["db"] == "separate" else 3.0) for v in kv.VARIANTS]
    out = {"shapes": {"a": {"variants": every}, "b": {"variants": every},
                      "c": {"variants": [variant("cublas", "atomic", "prologue", 0.1)]}},  # cut short: would distort
           "errors": {}}
    decision = kv._decide(out)
    assert decision["p=0.1 tf32x3"]["shapes"] == 2
    assert decision["p=0.1 tf32x3"]["best"]["db"] == "separate" and not decision["p=0.1 tf32x3"]["best_is_default"]
    assert decision["tf32x3_error_within_4x_peft"] is None


def test_gpu_check_script_parses():
    import subprocess
    from pathlib import Path

    script = Path(__file__).resolve().parent.parent / "bench" / "gpu_check.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    text = script.read_text()
    steps = [line.split() for line in text.splitlines() if line.split()[:1] in (["step"], ["qlora_step"])]
    limits = [int(words[2]) for words in steps]
    # the full check's steps within 420 s, so that a failed step can be run again in the same 15-minute lease
    # (machine start included); the preflight step (its own call) within 60 s
    names = [words[1] for words in steps]
    preflight = [n for name, n in zip(names, limits) if name == "preflight"]
    kinds = [n for name, n in zip(names, limits) if name.startswith("kinds-")]  # --steps, a call of its own
    assert preflight == [50] and sum(limits) - sum(preflight) - sum(kinds) <= 420, limits
    # --steps: with the preflight and the full check, 635 s of the lease's 900 s, the rest for the machine's start
    assert 0 < sum(kinds) <= 155, kinds


def test_what_a_profiled_step_writes_still_reaches_the_user(capfd):
    import sys

    from fastlora.bench.measure import peak_memory

    peak_memory(lambda: print("the step's own message", file=sys.stderr, flush=True), CPU)
    err = capfd.readouterr().err
    assert "the step's own message" in err and "USDT" not in err


def test_every_table_and_the_targets_carry_a_legend():
    layer = dict(mode="layer", case="q_proj", preset="tiny", M=8, K=4, N=4, dtype="float32", dropout=0.1)
    rows = [dict(layer, provider="frozen", fwd_bwd_ms=0.5), dict(layer, provider="peft", fwd_bwd_ms=1.0),
            dict(layer, dropout=0.0, provider="frozen", fwd_bwd_ms=0.5)]
    rows += _model_rows() + [dict(r, dropout=0.0) for r in _model_rows()]
    table = report.format_table(rows)
    blocks = [b for b in table.split("\n\n") if b.strip()]
    assert len(blocks) == 5  # two layer tables, two model tables, the targets
    for block in blocks[:2]:
        assert "new saved MiB: the same without the layer's input" in block
    for block in blocks[2:4]:
        assert "step: forward + loss + backward" in block
    assert blocks[4].startswith("goals") and "the bracket gives what p adds over p=0" in blocks[4]


def test_step_cases_run_every_provider_and_write_their_results(tmp_path, capsys):
    """``fastlora bench --step``: each case's frozen base, PEFT and fastlora, with the same trainable parameters
    for both libraries; mixed-batch one row per k.  Sizes tiny: this checks the plumbing, not the numbers."""
    import json

    from fastlora.bench.cli import main
    from fastlora.bench.steps import STEPS_SCHEMA

    out = tmp_path / "new" / "steps.json"  # a missing folder is made
    assert main(["--device", "cpu", "--step", "gpt2", "--step", "moe", "--step", "mixed-batch", "--adapters", "1,2",
                 "--hidden", "32", "--layers", "1", "--batch", "1", "--seq", "8", "--vocab", "64", "--warmup", "0",
                 "--repeats", "1", "--json", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert doc["schema"] == STEPS_SCHEMA and "--step gpt2" in doc["command"]
    for case in ("gpt2", "moe"):
        rows = {r["provider"]: r for r in doc["rows"] if r["step"] == case}
        assert sorted(rows) == ["fastlora", "frozen", "peft"]
        assert all(r["step_ms"] > 0 and r["saved_bytes"] > 0 for r in rows.values())
        assert rows["fastlora"]["trainable_params"] == rows["peft"]["trainable_params"] > 0
        assert rows["frozen"]["trainable_params"] == 0
    mixed = [r for r in doc["rows"] if r["step"] == "mixed-batch"]
    assert [r["adapters"] for r in mixed] == [1, 2]
    for r in mixed:
        assert r["fastlora-mixed_ms"] > 0 and r["fastlora-one-adapter_ms"] > 0
        assert r["one_adapter_over_separate"] == round(r["fastlora-one-adapter_ms"] / r["fastlora-separate_ms"], 3)
    printed = capsys.readouterr().out
    assert "gpt2: GPT-2" in printed and "one adapter" in printed


def test_step_cases_under_compile_time_their_first_step_apart(tmp_path, capsys):
    """``--step … --compile``: each provider also compiled (the same model), its first step timed apart as
    compile_s, the ratios of a compiled row taken against the compiled frozen base and PEFT; the mixed-batch case,
    which has no compiled providers, is refused."""
    import json

    from fastlora.bench.cli import main
    from fastlora.bench.providers import compile_unavailable

    if compile_unavailable(CPU):
        pytest.skip(compile_unavailable(CPU))
    out = tmp_path / "steps.json"
    assert main(["--device", "cpu", "--step", "gpt2", "--compile", "--hidden", "32", "--layers", "1", "--batch", "1",
                 "--seq", "8", "--vocab", "64", "--warmup", "0", "--repeats", "1", "--no-progress",
                 "--json", str(out)]) == 0
    rows = {r["provider"]: r for r in json.loads(out.read_text())["rows"]}
    assert sorted(rows) == ["fastlora", "fastlora+compile", "frozen", "frozen+compile", "peft", "peft+compile"]
    for name, r in rows.items():
        assert r["step_ms"] > 0 and r["saved_bytes"] > 0, name
        assert ("compile_s" in r) == name.endswith("+compile"), name
    assert rows["fastlora+compile"]["trainable_params"] == rows["fastlora"]["trainable_params"] > 0
    printed = capsys.readouterr().out
    line = next(li for li in printed.splitlines() if li.strip().startswith("fastlora+compile"))
    step = rows["fastlora+compile"]["step_ms"]
    assert line.split()[2] == f"{step / rows['frozen+compile']['step_ms']:.2f}x"
    assert line.split()[3] == f"{step / rows['peft+compile']['step_ms']:.2f}x"
    assert main(["--device", "cpu", "--step", "mixed-batch", "--compile"]) == 2
    assert "no compiled providers" in capsys.readouterr().err
