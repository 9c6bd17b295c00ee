"""The GPU run that decides the kernel design: every launch against its floor, the Triton GEMM against
cuBLAS, the schedule and precision variants side by side, the fused layer against the frozen base, and
the rank-r kernels' error against float64 next to PEFT's.

For Llama-3-8B projections at 8192 tokens, r = 16, a bf16 base with fp32 adapters (what ``get_peft_model``
makes, as PEFT does), dropout 0.1 and 0, it records (median of ``triton.testing.do_bench``):

* ``cublas``: the frozen layer's two GEMMs (x Wᵀ, dy W) — the floor the fused layer is held to;
* ``triton_gemm``: the fused GEMM with no low-rank term (R = 0) on the same shapes: Triton against cuBLAS;
* for each schedule variant (``base``: cublas — cuBLAS's product and one Triton pass adding the low-rank term —
  | fused; ``db``: atomic | separate; ``low_rank``: prologue | epilogue, for the fused base — see
  fastlora/schedules.py) and each precision setup of the rank-r kernels (3×tf32, torch's default; tf32 under
  ``torch.set_float32_matmul_precision("high")``): each launch's time, its memory and compute floor
  (bytes / bandwidth, FLOPs / peak), and forward + backward against ``cublas``;
* the error of S, dA and dB against float64 for each precision, beside PEFT's (torch's fp32 matmuls);
* ``decision``: per dropout and precision, the schedule with the least forward + backward time summed over
  the shapes measured for every schedule, its gain over the default, and whether 3×tf32's error is within
  4× of PEFT's;
* ``gemm_autotune_winners``: the config the fused GEMM's autotune chose per key, the Hopper TMA and persistent
  candidates among the classic ones (kernels/configs.py).

Stops adding measurements when ``--budget`` seconds (counted from the start of the process) are spent, and
on an interrupt (SIGINT) writes what it has; what was skipped is listed.  JSON out::

    python bench/kernel_variants.py --json FILE [--tokens 8192] [--rank 16] [--budget 110]
    python bench/kernel_variants.py --dry-run     # CPU, Triton's interpreter, tiny shapes: the code paths only
"""

from __future__ import annotations

import time

STARTED = time.monotonic()  # the budget counts from here: imports and CUDA start-up included

import argparse  # noqa: E402
import itertools  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
from contextlib import contextmanager  # noqa: E402

from script_start import prepare  # noqa: E402

prepare(__name__ == "__main__")  # before triton is imported: compiled or interpreted kernels

import torch  # noqa: E402
import triton  # noqa: E402

from fastlora.bench.presets import find_gpu_spec  # noqa: E402
from fastlora.schedules import VARIANTS as SCHEDULE_VARIANTS  # noqa: E402
from fastlora.kernels.launchers import lora_backward, lora_forward  # noqa: E402
from fastlora.kernels.backward import launch_dA, launch_dS_dB, launch_dx_gemm  # noqa: E402
from fastlora.kernels.forward import launch_forward_gemm, launch_S  # noqa: E402
from fastlora.kernels.low_rank_add import launch_low_rank_add  # noqa: E402
from fastlora.kernels.gemm import autotuned_gemm  # noqa: E402

SHAPES = {"q_proj": (4096, 4096), "gate_proj": (4096, 14336), "down_proj": (14336, 4096)}
DRY_SHAPES = {"tiny": (48, 40)}
PRECISIONS = {"tf32x3": "highest", "tf32": "high"}  # rank-r precision → torch's fp32 matmul setting that picks it
# The schedule variants LoRA's launches depend on (dora is DoRA's only); low_rank only with the fused base.
VARIANTS = [{"base": base, "db": db, "low_rank": low_rank}
            for base, db, low_rank in itertools.product(*(SCHEDULE_VARIANTS[n] for n in ("base", "db", "low_rank")))
            if base == "fused" or low_rank == SCHEDULE_VARIANTS["low_rank"][0]]
DEFAULT = {name: SCHEDULE_VARIANTS[name][0] for name in ("base", "db", "low_rank")}


def bench_timer(dry: bool):
    if dry:
        def once(fn) -> float:
            t0 = time.perf_counter()
            fn()
            return (time.perf_counter() - t0) * 1e3
        return once
    from triton.testing import do_bench

    return lambda fn: float(do_bench(fn, warmup=10, rep=40, return_mode="median"))


@contextmanager
def _precision(setting: str):
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(setting)
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(previous)


def _inputs(M, K, N, r, device, dtype=torch.bfloat16, adapter_dtype=torch.float32):
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(M, K, device=device, generator=g).to(dtype)
    w = (torch.randn(N, K, device=device, generator=g) * K**-0.5).to(dtype)
    A = (torch.randn(r, K, device=device, generator=g) * K**-0.5).to(adapter_dtype)
    B = (torch.randn(N, r, device=device, generator=g) * r**-0.5).to(adapter_dtype)
    dy = torch.randn(M, N, device=device, generator=g).to(dtype)
    seed = torch.tensor([1234], device=device, dtype=torch.int64)
    return x, w, A, B, dy, seed


def _floors(M, K, N, r, spec, precision: str) -> dict:
    """Per launch: max(bytes moved at least / bandwidth, FLOPs / the rate of the precision the launch's dots
    run at) in ms.  bf16 base, fp32 adapters and fp32 S / dS; the rank-r dots at ``precision`` (3×tf32: three
    tf32 products each), the GEMMs' base part at the bf16 rate and their low-rank part at tf32's."""
    e, a = 2, 4
    rank_rate = None if spec is None else spec.tflops_tf32 / (3 if precision == "tf32x3" else 1)
    work = {  # name: (bytes, [(FLOPs, rate)])
        "S": (e * M * K + a * (r * K + M * r), [(2 * M * K * r, rank_rate)]),
        "fwd_gemm": (e * (M * K + N * K + M * N) + a * (M * r + N * r),
                     [(2 * M * K * N, None if spec is None else spec.tflops_16),
                      (2 * M * N * r, None if spec is None else spec.tflops_tf32)]),
        "dS_dB": (e * M * N + a * 4 * (M * r + N * r) // 2, [(4 * M * N * r, rank_rate)]),
        "dA": (e * M * K + a * (M * r + r * K), [(2 * M * K * r, rank_rate)]),
        "dx_gemm": (e * (M * N + N * K + M * K) + a * (M * r + r * K),
                    [(2 * M * K * N, None if spec is None else spec.tflops_16),
                     (2 * M * K * r, None if spec is None else spec.tflops_tf32)]),
    }
    if spec is None:
        return {k: None for k in work}
    return {k: max(b / (spec.bandwidth_gbs * 1e9), sum(f / (rate * 1e12) for f, rate in flops)) * 1e3
            for k, (b, flops) in work.items()}


def _launch_times(timed, x, w, A, B, dy, seed, s, p, base: str, db: str, low_rank: str) -> dict:
    """Each launch's time; "fwd_gemm" / "dx_gemm" are the base product with the low-rank term: the fused GEMM,
    or cuBLAS's product and the low-rank pass."""
    S = launch_S(x, A, seed, p)
    dS, _ = launch_dS_dB(dy, B, S, s, p, True, False)
    if base == "fused":
        fwd_base = lambda: launch_forward_gemm(x, w, None, S, B, s, low_rank)  # noqa: E731
        dx_base = lambda: launch_dx_gemm(dy, w, dS, A, seed, p, low_rank)  # noqa: E731
    else:
        fwd_base = lambda: launch_low_rank_add(torch.mm(x, w.t()), S, B.t(), None, s, 0.0)  # noqa: E731
        dx_base = lambda: launch_low_rank_add(torch.mm(dy, w), dS, A, seed, 1.0, p)  # noqa: E731
    return {
        "S": timed(lambda: launch_S(x, A, seed, p)),
        "fwd_gemm": timed(fwd_base),
        "dS_dB": timed(lambda: launch_dS_dB(dy, B, S, s, p, True, True, db=db)),
        "dA": timed(lambda: launch_dA(x, dS, seed, p, A.dtype)),
        "dx_gemm": timed(dx_base),
        "forward": timed(lambda: lora_forward(x, w, None, A, B, seed, s, p, low_rank=low_rank, base=base)),
        "backward": timed(lambda: lora_backward(dy, x, w, A, B, S, seed, s, p, True, True, True, db=db,
                                                low_rank=low_rank, base=base)),
    }


def _errors(x, w, A, B, dy, seed, s, p) -> dict:
    """Max relative error (to max |ref|) of S, dA, dB against float64, for the kernels and for torch's fp32."""
    d = {n: t.double() for n, t in dict(x=x, A=A, B=B, dy=dy).items()}
    S_ref = d["x"] @ d["A"].T
    dS_ref = s * d["dy"] @ d["B"]
    refs = {"S": S_ref, "dB": s * d["dy"].T @ S_ref, "dA": dS_ref.T @ d["x"]}

    def rel(got, ref):
        return float((got.double() - ref).abs().max() / ref.abs().max().clamp_min(1e-30))

    out = {}
    for precision, setting in PRECISIONS.items():
        with _precision(setting):
            _, S = lora_forward(x, w, None, A, B, None, s, 0.0)
            _, dA, dB = lora_backward(dy, x, w, A, B, S, None, s, 0.0, False, True, True)
        out[precision] = {"S": rel(S, refs["S"]), "dA": rel(dA, refs["dA"]), "dB": rel(dB, refs["dB"])}
    with _precision("highest"):  # PEFT: x cast to the adapters' fp32, torch's fp32 matmuls
        xf, dyf = x.float(), dy.float()
        S_p = xf @ A.T
        out["peft_fp32"] = {"S": rel(S_p, refs["S"]), "dA": rel((s * dyf @ B).T @ xf, refs["dA"]),
                            "dB": rel(s * dyf.T @ S_p, refs["dB"])}
    return out


def _measure_shape(name, M, K, N, rank, dropouts, device, timed, spec, out, over_budget, first: bool) -> None:
    """Fill ``out["shapes"][name]`` measurement by measurement, so that what was measured survives a budget cut or
    an interrupt: ``first``, the cuBLAS baselines and every schedule at the default 3×tf32 precision (what the
    schedule table needs); else the tf32 schedules, the Triton GEMM alone and the errors."""
    s = 2.0
    x, w, A, B, dy, seed = _inputs(M, K, N, rank, device)
    empty_S, empty_B = torch.empty(M, 0, device=device), torch.empty(N, 0, device=device)
    if first:
        out["shapes"][name] = {
            "M": M, "K": K, "N": N, "r": rank, "floors_ms": {p: _floors(M, K, N, rank, spec, p) for p in PRECISIONS},
            "cublas_ms": {}, "triton_gemm_ms": {}, "variants": [],
        }
    entry = out["shapes"][name]
    if first and over_budget(f"{name} baselines"):
        return
    if first:
        entry["cublas_ms"] = {"fwd": timed(lambda: x @ w.T), "dx": timed(lambda: dy @ w)}
    if not entry["cublas_ms"]:
        return
    base = entry["cublas_ms"]["fwd"] + entry["cublas_ms"]["dx"]
    precisions = list(PRECISIONS)[:1] if first else list(PRECISIONS)[1:]
    for precision, p, variant in itertools.product(precisions, dropouts, VARIANTS):
        if over_budget(f"{name} p={p:g} {variant} {precision}"):
            continue
        with _precision(PRECISIONS[precision]):
            times = _launch_times(timed, x, w, A, B, dy, seed, s, p, **variant)
        entry["variants"].append({
            "dropout": p, **variant, "precision": precision, "ms": times,
            "fused_over_cublas": (times["forward"] + times["backward"]) / base,
        })
    if first:
        return
    if not over_budget(f"{name} triton GEMM"):
        # the GEMM alone: no low-rank term (R = 0)
        entry["triton_gemm_ms"]["fwd"] = timed(lambda: launch_forward_gemm(x, w, None, empty_S, empty_B, s))
        entry["triton_gemm_ms"]["dx"] = timed(lambda: launch_dx_gemm(dy, w, empty_S, A[:0], seed, 0.0))
    if not over_budget(f"{name} errors"):
        out["errors"][name] = _errors(x, w, A, B, dy, seed, s, 0.0)


def run(tokens: list[int], rank: int, dropouts: list[float], budget: float, dry: bool, out: dict) -> None:
    """Measure into ``out`` (filled as it goes: a budget cut or an interrupt keeps what was measured), token
    counts in the order given (the most valuable first)."""
    device = "cpu" if dry else "cuda"
    shapes = DRY_SHAPES if dry else SHAPES
    timed = bench_timer(dry)
    spec = None if dry else find_gpu_spec(torch.cuda.get_device_name(0))
    out.update({"shapes": {}, "skipped": [], "errors": {}})

    def over_budget(what: str) -> bool:
        if time.monotonic() - STARTED > budget:
            out["skipped"].append(what)
            return True
        return False

    # Every token count and shape at the default precision first (the schedule table), then the rest.
    for first in (True, False):
        for M in ([24, 40] if dry else tokens):
            for name, (K, N) in shapes.items():
                _measure_shape(f"{name} M={M}", M, K, N, rank, dropouts, device, timed, spec, out, over_budget,
                               first)
                if not dry:
                    torch.cuda.empty_cache()


def gemm_winners() -> list[dict]:
    """The config each of the fused GEMM's autotuners chose, per autotune key (M bucket, N, K, B's stride along
    K, low-rank term last, then the argument dtypes): whether a Hopper TMA or persistent config won, and where."""
    rows = []
    for fp32, masked, last, tma in itertools.product((False, True), repeat=4):
        tuner = autotuned_gemm(fp32, masked, last, tma)
        for key, cfg in getattr(tuner, "cache", {}).items():
            rows.append({"operands": "fp32" if fp32 else "16-bit", "masked": masked, "tma_readable": tma,
                         "key": [str(k) for k in key], "config": {**cfg.kwargs, "num_warps": cfg.num_warps,
                                                                  "num_stages": cfg.num_stages}})
    return rows


def schedule_table(out: dict, precision: str = "tf32x3") -> list[dict]:
    """The package's schedule table (fastlora/data/kernel_schedules.json) from the measurements: per (N, K) and
    token count, the variants with the least forward + backward time summed over the dropouts measured, at
    torch's default precision; a shape measured at several token counts splits its range at their geometric
    means.  Only shapes with every variant measured at every dropout count."""
    winners: dict[tuple, dict] = {}
    for entry in out.get("shapes", {}).values():
        runs = [v for v in entry["variants"] if v["precision"] == precision]
        dropouts = {v["dropout"] for v in runs}
        totals: dict[tuple, list] = {}
        for v in runs:
            totals.setdefault((v["base"], v["db"], v["low_rank"]), []).append(v["ms"]["forward"] + v["ms"]["backward"])
        complete = {k: sum(t) for k, t in totals.items() if len(t) == len(dropouts)}
        if not dropouts or len(complete) < len(VARIANTS):
            continue
        base, db, low_rank = min(complete, key=complete.get)
        winners[(entry["N"], entry["K"], entry["M"])] = {"base": base, "db": db, "low_rank": low_rank}
    return classes_from_winners(winners)


def classes_from_winners(winners: dict[tuple, dict]) -> list[dict]:
    """Schedule-table classes from the variants that won per (N, K, token count): one class per token count
    measured, a shape measured at several splitting its range at their geometric means."""
    table = []
    for (N, K) in sorted({(n, k) for n, k, _ in winners}):
        counts = sorted(m for n, k, m in winners if (n, k) == (N, K))
        edges = [math.sqrt(a * b) for a, b in zip(counts, counts[1:])]
        for i, M in enumerate(counts):
            lo = counts[0] if i == 0 else math.floor(edges[i - 1]) + 1
            hi = counts[-1] if i == len(counts) - 1 else math.floor(edges[i])
            table.append({"N": N, "K": K, "tokens": [lo, hi], "variants": winners[(N, K, M)]})
    return table


def _decide(out: dict) -> dict:
    """Per dropout and rank-r precision: the schedule with the least forward + backward time summed over the
    shapes where every schedule was measured, against the default schedule; and whether 3×tf32's error is
    within 4× PEFT's (None when not measured)."""
    decision = {}
    combos = {(v["dropout"], v["precision"]) for e in out["shapes"].values() for v in e["variants"]}
    for p, precision in sorted(combos):
        totals: dict[tuple, float] = {}
        shapes = 0
        for entry in out["shapes"].values():
            measured = {(v["base"], v["db"], v["low_rank"]): v["ms"]["forward"] + v["ms"]["backward"]
                        for v in entry["variants"] if v["dropout"] == p and v["precision"] == precision}
            if len(measured) < len(VARIANTS):  # a shape cut short by the budget: not comparable
                continue
            shapes += 1
            for key, t in measured.items():
                totals[key] = totals.get(key, 0.0) + t
        if not totals:
            continue
        best = min(totals, key=totals.get)
        default = (DEFAULT["base"], DEFAULT["db"], DEFAULT["low_rank"])
        decision[f"p={p:g} {precision}"] = {
            "shapes": shapes, "best": {"base": best[0], "db": best[1], "low_rank": best[2], "ms": totals[best]},
            "default_ms": totals[default], "best_is_default": best == default,
            "gain_over_default": 1.0 - totals[best] / totals[default],
        }
    ratios = [e["tf32x3"][k] / max(e["peft_fp32"][k], 1e-30) for e in out["errors"].values() for k in e["tf32x3"]]
    decision["tf32x3_error_within_4x_peft"] = (max(ratios) <= 4.0) if ratios else None
    return decision


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", default="8192", help="comma list of token counts, the most valuable first (default 8192)")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--dropout", default="0.1,0", help="comma list (default 0.1,0)")
    ap.add_argument("--budget", type=float, default=110.0, help="seconds; later measurements are skipped (default 110)")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--package-table", help="also write the schedule table in the package's format here "
                                             "(fastlora/data/kernel_schedules.json)")
    ap.add_argument("--dry-run", action="store_true", help="CPU, Triton's interpreter, tiny shapes: no timing worth reading")
    opts = ap.parse_args()
    if not opts.dry_run and not torch.cuda.is_available():
        print("kernel_variants: needs CUDA (or --dry-run)", file=sys.stderr)
        return 2
    results: dict = {"environment": run_environment(opts.dry_run)}
    try:
        run([int(v) for v in opts.tokens.split(",")], opts.rank, [float(v) for v in opts.dropout.split(",")],
            opts.budget, opts.dry_run, results)
    except KeyboardInterrupt:  # gpu_check's time limit: keep what was measured
        results["interrupted"] = True
    finally:
        results["decision"] = _decide(results)
        results["schedule_table"] = schedule_table(results)
        results["gemm_autotune_winners"] = gemm_winners()
        _report(results)
        write_results(results, opts.json, opts.package_table)
    return 0


def run_environment(dry: bool) -> dict:
    """What a results file records of the run: versions, the device, the date."""
    return {"torch": torch.__version__, "triton": triton.__version__, "dry_run": dry,
            "device": "cpu (interpreter)" if dry else torch.cuda.get_device_name(0),
            "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def write_results(results: dict, json_path: str | None, package_table: str | None) -> None:
    """The results file (``json_path``) and the package's schedule table (``package_table``: its classes
    ``results["schedule_table"]``), each where named."""
    if json_path:
        with open(json_path, "w") as f:
            json.dump(results, f, indent=1)
        print(f"wrote {json_path}", flush=True)
    if package_table:
        write_package_table(package_table, results["schedule_table"], results["environment"], json_path)


def write_package_table(path: str, classes: list[dict], env: dict, source: str | None) -> None:
    """Write ``classes`` as the package's schedule table (fastlora/data/kernel_schedules.json's format) to
    ``path``.  Where ``path`` holds a table already, its classes keep the variants this run did not decide for
    their (N, K) (the dense run's beside the 4-bit run's: either may come first), and the runs are listed."""
    decided: dict[tuple, set] = {}
    for c in classes:
        decided.setdefault((c["N"], c["K"]), set()).update(c["variants"])
    kept, runs, name = [], [], os.path.basename(source) if source else None
    if os.path.exists(path):
        with open(path) as f:
            old = json.load(f)
        for c in old.get("classes", []):
            variants = {k: v for k, v in c["variants"].items() if k not in decided.get((c["N"], c["K"]), ())}
            if variants:
                kept.append(dict(c, variants=variants))
        runs = [r for r in old.get("runs", []) if r.get("source") != name]
    runs.append({"measured_on": env, "source": name})
    with open(path, "w") as f:
        json.dump({"about": "The kernel schedule per shape class on CUDA (fastlora.schedules), chosen by "
                            "bench/kernel_variants.py and bench/qlora_crossover.py on a GPU.",
                   "runs": runs, "classes": kept + classes}, f, indent=1)
        f.write("\n")
    print(f"wrote {path}", flush=True)


def _report(results: dict) -> None:
    for name, entry in results.get("shapes", {}).items():
        cublas, triton_gemm = entry["cublas_ms"], entry["triton_gemm_ms"]
        if cublas and triton_gemm:
            print(f"{name}: cuBLAS fwd+dx {cublas['fwd'] + cublas['dx']:.4f} ms; Triton GEMM / cuBLAS: fwd "
                  f"{triton_gemm['fwd'] / cublas['fwd']:.3f}, dx {triton_gemm['dx'] / cublas['dx']:.3f}")
        for v in entry["variants"]:
            print(f"  p={v['dropout']:g} base={v['base']:<6} db={v['db']:<8} low_rank={v['low_rank']:<8} {v['precision']:<6} "
                  f"fused/cuBLAS {v['fused_over_cublas']:.3f}  " + " ".join(f"{k} {t:.4f}" for k, t in v["ms"].items()))
    print("errors vs float64 (max |err| / max |ref|):", json.dumps(results.get("errors")))
    print("decision:", json.dumps(results["decision"]))
    if results.get("skipped"):
        print(f"skipped (budget): {len(results['skipped'])} measurements")
    if results.get("interrupted"):
        print("interrupted: the results above are partial")


if __name__ == "__main__":
    sys.exit(main())
