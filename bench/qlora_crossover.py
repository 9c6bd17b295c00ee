"""Where the fused 4-bit GEMM beats bitsandbytes' dequantize-then-cuBLAS: QLoRA layers at Llama-3-8B's projection
shapes, per token count, beside PEFT's QLoRA layer and the frozen 4-bit base; the winner per shape and token count
goes into the package's schedule table as ``base_4bit`` (fastlora/schedules.py).

Each shape (q_proj 4096 → 4096, gate_proj 4096 → 14336, down_proj 14336 → 4096) is one bitsandbytes nf4 weight
(double-quantized absmax, bf16 compute) shared by four layers, each run forward + backward on bf16 activations
(x requires grad, the weight frozen), r=16, lora_alpha=32, float32 adapters, dropout 0.1, measured in this order
(the two that decide the schedule first, so that a budget cut leaves the decision made):

    fastlora-qlora        fastlora, ``base_4bit=dequant``: bitsandbytes' product (the weight dequantized to 16 bits,
                          then cuBLAS, forward and for dx), then the low-rank term
    fastlora-qlora-fused  fastlora, ``base_4bit=fused``: one Triton GEMM that dequantizes the weight tile by tile in
                          its main loop, the low-rank term in its accumulator
    frozen-nf4            the 4-bit layer alone: the floor
    peft-qlora            PEFT's bitsandbytes LoRA layer

It records the median forward + backward time (``triton.testing.do_bench``) and the peak memory above what was
allocated before the step, per layer; per shape and token count the fused layer's time over the dequantizing
one's, and which wins.  The default token counts span where the fused GEMM should win (few tokens: it reads a
quarter of the weight's bytes and writes no 16-bit copy) to where cuBLAS should (8192: compute-bound); the
lowest class of the table starts at the smallest count measured, and fewer tokens than half of it take the
default.  Token counts are measured in the order given, every shape at one count before the next,
until ``--budget`` seconds (counted from the start of the process) are spent; an interrupt (SIGINT) keeps what
was measured.  JSON out::

    python bench/qlora_crossover.py --json FILE [--tokens 512,8192,64,2048] [--package-table FILE] [--budget 32]
    python bench/qlora_crossover.py --dry-run   # CPU, Triton's interpreter, a tiny shape: the code paths only
    python bench/qlora_crossover.py --from-json RESULTS --package-table fastlora/data/kernel_schedules.json

``--package-table FILE`` writes the ``base_4bit`` classes in the package's format, into FILE's other classes
when it holds a table already (bench/kernel_variants.py's dense run: either may come first); with
``--from-json`` it takes them from a results file this script wrote (a GPU run's) instead of measuring.
"""

from __future__ import annotations

import time

STARTED = time.monotonic()  # the budget counts from here: imports and CUDA start-up included

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402

from script_start import prepare  # noqa: E402

prepare(__name__ == "__main__")  # before triton is imported: compiled or interpreted kernels

import torch  # noqa: E402
from torch import nn  # noqa: E402

from fastlora.adapter_settings import AdapterSettings  # noqa: E402
from fastlora.bench.measure import peak_memory  # noqa: E402
from fastlora.quantized import LoRAQuantizedLinear  # noqa: E402
from fastlora.schedules import use_kernel_variants  # noqa: E402
from kernel_variants import (SHAPES, bench_timer, classes_from_winners, run_environment,  # noqa: E402
                             write_package_table, write_results)

DRY_SHAPES = {"tiny": (72, 40)}
# fastlora's two routes first: they decide the schedule, and a budget cut leaves that decision made.
PROVIDERS = ("fastlora-qlora", "fastlora-qlora-fused", "frozen-nf4", "peft-qlora")
ROUTES = {"fastlora-qlora": "dequant", "fastlora-qlora-fused": "fused"}  # fastlora's layers: their base_4bit


def _layers(K: int, N: int, rank: int, p: float, device: str) -> dict[str, nn.Module]:
    """The four layers over one nf4 weight (quantized once, shared: none of them changes it).  PEFT's is its
    bitsandbytes 4-bit LoRA layer, as ``get_peft_model`` makes it on a 4-bit model."""
    import bitsandbytes as bnb
    from peft import LoraConfig
    from peft.tuners.lora.bnb import Linear4bit as PeftLinear4bit

    weight = torch.randn(N, K, generator=torch.Generator().manual_seed(0)) * K**-0.5
    base = bnb.nn.Linear4bit(K, N, bias=False, compute_dtype=torch.bfloat16, compress_statistics=True,
                             quant_type="nf4")
    base.load_state_dict({"weight": weight.to(torch.bfloat16)})
    base = base.to(device)  # quantizes
    base.support_avx512bf16_for_cpu = False  # bitsandbytes 0.50 repacks CPU weights on inference forwards
    config = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=p)
    # recent PEFT reads the options from config, older versions from the keywords: both given
    peft_layer = PeftLinear4bit(base, "default", config=config, r=rank, lora_alpha=2 * rank, lora_dropout=p)
    settings = AdapterSettings(rank, 2 * rank, p, False, False, False)
    ours = {name: LoRAQuantizedLinear.from_quantized(base, "default", settings, False, torch.float32,
                                                     backend="triton").to(device)
            for name in ROUTES}
    return {"frozen-nf4": base, "peft-qlora": peft_layer.to(device), **ours}


def _step(layer: nn.Module, x: torch.Tensor, dy: torch.Tensor, variants: dict):
    trained = [q for q in layer.parameters() if q.requires_grad]

    def run():
        with use_kernel_variants(**variants):
            y = layer(x)
        y.backward(dy)
        x.grad = None
        for q in trained:
            q.grad = None
    return run


def _measure(name: str, M: int, layers: dict[str, nn.Module], rank: int, p: float, device: str, timed, out: dict,
             over_budget) -> None:
    """``out["shapes"][name]`` for an (M × K) → N call of ``layers`` (:func:`_layers`), provider by provider (what
    was measured survives a budget cut)."""
    N, K = (int(d) for d in layers["frozen-nf4"].weight.quant_state.shape)
    g = torch.Generator(device=device).manual_seed(1)
    x = torch.randn(M, K, device=device, generator=g).to(torch.bfloat16).requires_grad_(True)
    dy = torch.randn(M, N, device=device, generator=g).to(torch.bfloat16)
    fused = layers["fastlora-qlora-fused"]
    with use_kernel_variants(base_4bit="fused"), torch.no_grad():
        if fused.train()._fused_4bit_schedule(x, ["default"]) is None:  # else the row would time the other route
            raise RuntimeError(f"{name}: the fused 4-bit path does not run here (16-bit compute, the kernels)")
    kinds = {n: f"{type(m).__module__}.{type(m).__qualname__}" for n, m in layers.items()}  # what each row timed
    entry = out["shapes"][name] = {"M": M, "K": K, "N": N, "r": rank, "dropout": p, "ms": {}, "peak_bytes": {},
                                   "layers": kinds}
    ms = entry["ms"]
    for provider in PROVIDERS:
        if over_budget(f"{name} {provider}"):
            break
        step = _step(layers[provider].train(), x, dy, {"base_4bit": ROUTES.get(provider, "dequant")})
        ms[provider] = timed(step)
        entry["peak_bytes"][provider] = peak_memory(step, torch.device(device))[0] if device == "cuda" else None
    if all(provider in ms for provider in ROUTES):
        entry["fused_over_dequant"] = ms["fastlora-qlora-fused"] / ms["fastlora-qlora"]
        entry["base_4bit"] = "fused" if ms["fastlora-qlora-fused"] < ms["fastlora-qlora"] else "dequant"
    if "peft-qlora" in ms:
        entry["over_peft"] = {route: ms[provider] / ms["peft-qlora"] for provider, route in ROUTES.items()}


def run(tokens: list[int], rank: int, dropout: float, budget: float, dry: bool, out: dict) -> None:
    device = "cpu" if dry else "cuda"
    timed = bench_timer(dry)
    out.update({"shapes": {}, "skipped": []})

    def over_budget(what: str) -> bool:
        if time.monotonic() - STARTED > budget:
            out["skipped"].append(what)
            return True
        return False

    built: dict[str, dict] = {}  # each shape's layers, made (and its weight quantized) once for every token count
    for M in ([24, 40] if dry else tokens):
        for name, (K, N) in (DRY_SHAPES if dry else SHAPES).items():
            if over_budget(f"{name} M={M}"):
                continue
            if name not in built:
                built[name] = _layers(K, N, rank, dropout, device)
            _measure(f"{name} M={M}", M, built[name], rank, dropout, device, timed, out, over_budget)
            if not dry:
                torch.cuda.empty_cache()


def schedule_table(out: dict) -> list[dict]:
    """The ``base_4bit`` classes: per (N, K) and token count the faster of fastlora's two 4-bit layers (shapes
    with both measured)."""
    winners = {(e["N"], e["K"], e["M"]): {"base_4bit": e["base_4bit"]}
               for e in out.get("shapes", {}).values() if "base_4bit" in e}
    return classes_from_winners(winners)


def crossover(out: dict) -> dict:
    """Per (N, K): the token counts measured, in order, each with the winner and the fused / dequant time; and
    the largest token count where the fused layer still wins (None where it never does)."""
    per_shape: dict[str, dict] = {}
    for entry in sorted(out.get("shapes", {}).values(), key=lambda e: e["M"]):
        if "base_4bit" not in entry:
            continue
        shape = per_shape.setdefault(f"{entry['K']}->{entry['N']}", {"tokens": [], "fused_wins_up_to": None})
        shape["tokens"].append({"M": entry["M"], "base_4bit": entry["base_4bit"],
                                "fused_over_dequant": entry["fused_over_dequant"]})
        if entry["base_4bit"] == "fused":
            shape["fused_wins_up_to"] = entry["M"]
    return per_shape


def _report(results: dict) -> None:
    for name, entry in results.get("shapes", {}).items():
        times = " ".join(f"{p} {t:.4f}" for p, t in entry["ms"].items())
        peaks = " ".join(f"{p} {b / 2**20:.1f}" for p, b in entry["peak_bytes"].items() if b is not None)
        print(f"{name}: fwd+bwd ms: {times}" + (f"; peak MiB: {peaks}" if peaks else ""))
        if "base_4bit" in entry:
            print(f"  fused / dequant {entry['fused_over_dequant']:.3f} -> base_4bit={entry['base_4bit']}" + (
                "; over PEFT: " + ", ".join(f"{route} {r:.3f}" for route, r in entry["over_peft"].items())
                if "over_peft" in entry else ""))
    print("crossover:", json.dumps(results["crossover"]))
    if results.get("skipped"):
        print(f"skipped (budget): {len(results['skipped'])} measurements")
    if results.get("interrupted"):
        print("interrupted: the results above are partial")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", default="512,8192,64,2048", help="comma list of token counts, measured in this "
                                                                 "order (default 512,8192,64,2048)")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--dropout", type=float, default=0.1)
    ap.add_argument("--budget", type=float, default=32.0, help="seconds; later measurements are skipped (default 32)")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--package-table", help="write (or merge) the base_4bit classes into this schedule table")
    ap.add_argument("--dry-run", action="store_true", help="CPU, Triton's interpreter, a tiny shape: no timing worth "
                                                           "reading")
    ap.add_argument("--from-json", help="measure nothing: the classes of this results file (with --package-table)")
    opts = ap.parse_args()
    if opts.from_json:
        if not opts.package_table:
            ap.error("--from-json writes the classes of a results file: name the table with --package-table")
        with open(opts.from_json) as f:
            measured = json.load(f)
        write_package_table(opts.package_table, schedule_table(measured), measured["environment"], opts.from_json)
        return 0
    if not opts.dry_run and not torch.cuda.is_available():
        print("qlora_crossover: needs CUDA (or --dry-run)", file=sys.stderr)
        return 2
    env = run_environment(opts.dry_run)
    try:
        import bitsandbytes
        import peft
        env["bitsandbytes"], env["peft"] = bitsandbytes.__version__, peft.__version__
    except ImportError as err:
        print(f"qlora_crossover: needs bitsandbytes and peft ({err})", file=sys.stderr)
        return 2
    results: dict = {"environment": env}
    try:
        run([int(v) for v in opts.tokens.split(",")], opts.rank, opts.dropout, opts.budget, opts.dry_run, results)
    except KeyboardInterrupt:  # gpu_check's time limit: keep what was measured
        results["interrupted"] = True
    finally:
        results["schedule_table"] = schedule_table(results)
        results["crossover"] = crossover(results)
        _report(results)
        write_results(results, opts.json, opts.package_table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
