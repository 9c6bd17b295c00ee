"""``fastlora bench`` / ``python -m fastlora.bench``: argument parsing and the run."""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

import torch

from fastlora.cli import (check_output, comma_list, non_negative_float, non_negative_int, one_of, positive_float,
                          positive_int, probability, share)

from . import report
from .meta import environment, gpu_name
from .presets import GPU_SPECS, MODEL_PRESETS, PROJECTIONS, find_gpu_spec, parse_shape, projections
from .providers import ALL_PROVIDERS, SEED_TARGETS, resolve_providers
from .roofline import Roofline
from .runner import DTYPES, LayerCase, ModelCase, Quiet, add_ratios, run_layers, run_model
from .steps import STEP_CASES, STEPS_SCHEMA, StepSizes, format_step_rows, mixed_batch_rows, run_step_case

__all__ = ["main", "build_parser"]

QUICK_PROJ = ["q_proj", "down_proj"]
# The options of --step mode (argparse dests; --quant chooses step cases too); every other one is refused with it.
STEP_OPTIONS = ("step", "quant", "hidden", "adapters", "layers", "batch", "seq", "vocab", "preset", "compile", "quick",
                "device", "threads", "warmup", "repeats", "json", "no_progress")
STEP_PRESET_CASES = ("mixed-batch", "qlora-nf4", "qlora-int8", "qdora-nf4")  # the cases --preset sizes


def _flags(dests) -> str:
    return ", ".join("--" + dest.replace("_", "-") for dest in dests)


def _shape(text: str) -> tuple[int, int, int]:
    try:
        return parse_shape(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be M,K,N: tokens, in and out features, each ≥ 1; not {text!r}") from None


def _device(text: str) -> torch.device:
    try:
        device = torch.device(text)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"must be cpu, cuda or cuda:INDEX, not {text!r}")
    return device


def _gpu(text: str) -> str:
    if find_gpu_spec(text) is None:
        raise argparse.ArgumentTypeError(f"{text!r} is not in the table ({', '.join(s.name for s in GPU_SPECS)})")
    return text


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="fastlora bench",
        description=(
            "Benchmark LoRA layers (and one training step of a small Llama-architecture model with --model): "
            "the frozen base, PEFT, fastlora's torch path and (on CUDA) its triton path, side by side. "
            "Reports forward/backward time, ratios to the frozen base and to PEFT, saved-activation bytes, "
            "peak memory and a roofline floor."
        ),
    )
    g = ap.add_argument_group("what to run")
    g.add_argument("--preset", action="append", choices=sorted(MODEL_PRESETS), help="layer shapes of this model (repeatable; default llama-3-8b)")
    g.add_argument("--proj", type=comma_list(one_of(PROJECTIONS)),
                   help=f"comma list of projections of the preset (default all: {','.join(PROJECTIONS)})")
    g.add_argument("--shape", action="append", type=_shape, metavar="M,K,N", help="an extra layer shape: tokens M, in K, out N (repeatable)")
    g.add_argument("--tokens", type=positive_int, help="tokens M for preset shapes (default 8192 on CUDA, 256 on CPU)")
    g.add_argument(
        "--model",
        nargs="?",
        const="tiny",
        choices=sorted(MODEL_PRESETS),
        help="end-to-end mode: one training step of a Llama-architecture model at this preset's width (default tiny)",
    )
    g.add_argument(
        "--step",
        action="append",
        choices=[*STEP_CASES, "mixed-batch"],
        help="whole-model training step of another base kind, frozen base vs PEFT vs fastlora (repeatable): gpt2 "
        "(Conv1D), moe (experts as parameters), qlora-nf4, qlora-int8 (a 4-bit or 8-bit base), qdora-nf4 (DoRA on a "
        "4-bit base), mixed-batch (k adapters over one batch). The options that apply with it: "
        f"{_flags(STEP_OPTIONS[1:])} (one --preset, for the {', '.join(STEP_PRESET_CASES)} cases); "
        "the others are refused",
    )
    g.add_argument("--quant", action="append", choices=["nf4", "int8"],
                   help="QLoRA: --step qlora-nf4 / qlora-int8 (a 4-bit or 8-bit base; repeatable)")
    g.add_argument("--hidden", type=positive_int, help="hidden width for --step, a multiple of 16 (default 512; "
                   "mixed-batch 64; the QLoRA, QDoRA and mixed-batch cases take --preset's layer shapes)")
    g.add_argument("--adapters", type=comma_list(positive_int),
                   help="adapter counts k for --step mixed-batch (default 1,2,4,8)")
    g.add_argument("--layers", type=positive_int, help="decoder layers for --model (default: the preset's, 2) and "
                   "--step (4; mixed-batch 2)")
    g.add_argument("--batch", type=positive_int, help="batch for --model (default: the preset's) and --step (4)")
    g.add_argument("--seq", type=positive_int, help="sequence length for --model (default: the preset's) and "
                   "--step (256; mixed-batch 64)")
    g.add_argument("--vocab", type=positive_int, help="vocabulary for --model (default: the preset's real one) and "
                   "--step (1024; mixed-batch 256)")
    g.add_argument("--providers", type=comma_list(one_of(ALL_PROVIDERS)),
                   help=f"comma list from {','.join(ALL_PROVIDERS)} (default: all available but "
                   "fastlora-torch+inactive, the DoRA ones and the +compile ones)")
    g.add_argument("--compile", action="store_true",
                   help="also each chosen provider under torch.compile (frozen+compile, peft+compile, "
                        "fastlora-torch+compile, fastlora-triton+compile; with --step: frozen+compile, "
                        "peft+compile, fastlora+compile); the first call, which compiles, is timed apart "
                        "(compile s) and not counted in the step")
    g.add_argument("--quick", action="store_true", help="small cases and few repeats: under a minute on a 2-core CPU")
    g = ap.add_argument_group("LoRA and numerics")
    g.add_argument("--rank", "-r", type=positive_int, default=8, help="LoRA rank (default 8)")
    g.add_argument("--alpha", type=positive_float, help="lora_alpha (default 4 × rank: 32 at rank 8)")
    g.add_argument("--dropout", type=comma_list(probability),
                   help="comma list of dropout p, each in [0, 1) (default 0.1 for layers, 0.1,0 for --model)")
    g.add_argument("--dtype", choices=sorted(DTYPES), help="default float32 on CPU, bfloat16 on CUDA (model mode: the tiny preset is float32)")
    g.add_argument("--device", type=_device, help="cpu or cuda[:i] (default cuda when available)")
    g.add_argument("--threads", type=positive_int, help="torch.set_num_threads for the run")
    g = ap.add_argument_group("timing")
    g.add_argument("--warmup", type=non_negative_int, help="warm-up rounds (default 10 CUDA / 2 CPU)")
    g.add_argument("--repeats", type=positive_int, help="timed rounds, median reported (default 50 CUDA / 10 CPU)")
    g.add_argument("--no-memory", action="store_true", help="skip the peak-memory pass")
    g.add_argument(
        "--max-other-load",
        type=share,
        metavar="F",
        help="CPU: wait for an idle machine before each case and time it again when other processes used "
        "more than this share (0-1) of the CPUs meanwhile (the share is recorded in every row either way)",
    )
    g.add_argument("--retries", type=non_negative_int, default=2, help="re-timings per case for --max-other-load (default 2)")
    g.add_argument("--wait-idle", type=non_negative_float, default=60.0, metavar="S", help="longest wait for an idle machine (default 60 s)")
    g.add_argument("--profile", type=non_negative_int, default=0, metavar="N", help="also profile one step per case and provider (torch.profiler) and print the top N ops by self time")
    g = ap.add_argument_group("roofline")
    g.add_argument("--gpu", type=_gpu, help=f"use this GPU's peak figures ({', '.join(s.name for s in GPU_SPECS)}); default: detected")
    g.add_argument("--peak-tflops", type=positive_float, help="peak matrix rate in TFLOP/s (overrides the table)")
    g.add_argument("--bandwidth-gbs", type=positive_float, help="memory bandwidth in GB/s (overrides the table)")
    g = ap.add_argument_group("output")
    g.add_argument("--json", metavar="FILE", help="write rows (with machine, versions and git commit in each) as JSON")
    g.add_argument("--csv", metavar="FILE", help="write rows as CSV")
    g.add_argument("--plot", metavar="FILE.png", help="grouped bars of time and memory per case and provider")
    g.add_argument("--markdown", metavar="FILE", help="write the markdown table (as in the README) to FILE ('-' for stdout)")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    return ap


def _roofline(args, device: torch.device, dtype: torch.dtype) -> Roofline | None:
    spec = find_gpu_spec(args.gpu) if args.gpu else (find_gpu_spec(gpu_name(device)) if device.type == "cuda" else None)
    dname = str(dtype).replace("torch.", "")
    allow_tf32 = bool(torch.backends.cuda.matmul.allow_tf32) if device.type == "cuda" else False
    tflops = args.peak_tflops if args.peak_tflops else (spec.tflops(dname, allow_tf32) if spec else None)
    bw = args.bandwidth_gbs if args.bandwidth_gbs else (spec.bandwidth_gbs if spec else None)
    if tflops is None or bw is None:
        return None
    name = spec.name if spec and not (args.peak_tflops or args.bandwidth_gbs) else (
        f"{spec.name if spec else 'custom'} ({tflops:g} TFLOP/s, {bw:g} GB/s)"
    )
    return Roofline(name, tflops, bw)


class _Progress:
    def __init__(self, total_rounds: int, enabled: bool):
        self.bar = None
        if enabled and total_rounds > 0:
            try:
                from tqdm.auto import tqdm

                self.bar = tqdm(total=total_rounds, desc="fastlora bench", unit="round", file=sys.stderr, leave=False,
                                disable=None)  # None: no bar where stderr is not a terminal
            except ImportError:
                self.bar = None

    def round(self):
        if self.bar is not None:
            self.bar.update(1)

    def describe(self, text: str):
        if self.bar is not None:
            self.bar.set_postfix_str(text, refresh=True)

    def close(self):
        if self.bar is not None:
            self.bar.close()


def _run_steps(args, argv_list: list[str], device: torch.device, warmup: int, repeats: int) -> int:
    """``--step``: each case's whole-model step for the frozen base, PEFT and fastlora (fastlora.bench.steps)."""
    import dataclasses
    import json

    rows = []
    for name in dict.fromkeys(args.step):
        small = name == "mixed-batch"
        sizes = StepSizes(hidden=args.hidden or (64 if small else 512), layers=args.layers or (2 if small else 4),
                          batch=args.batch or 4, seq=args.seq or (64 if small else 256),
                          vocab=args.vocab or (256 if small else 1024))
        if args.preset and name in STEP_PRESET_CASES:  # a real model's layers (--preset llama-3-8b)
            preset = MODEL_PRESETS[args.preset[0]]
            sizes = dataclasses.replace(sizes, hidden=preset.hidden, intermediate=preset.intermediate,
                                        heads=preset.heads, kv_heads=preset.kv_heads)
        if small:
            rows += mixed_batch_rows(sizes, device, warmup, repeats, args.adapters or [1, 2, 4, 8])
        else:
            rows += run_step_case(name, sizes, device, warmup, repeats, compiled=args.compile)
    meta = environment(device)
    print(f"fastlora bench — {report._machine_line(meta)}")
    print(format_step_rows(rows))
    if args.json:
        command = "fastlora bench " + " ".join(shlex.quote(a) for a in argv_list)
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"schema": STEPS_SCHEMA, "meta": meta, "torch_threads": torch.get_num_threads(),
                       "command": command, "rows": rows}, f, indent=2)
            f.write("\n")
        print(f"wrote {args.json}")
    return 0


def _check_options(parser: argparse.ArgumentParser, args) -> None:
    """Usage errors for options that do not go together; sets ``args.step`` to the step cases (--step, --quant)."""
    args.step = list(dict.fromkeys((args.step or []) + [f"qlora-{q}" for q in args.quant or []]))
    given = {dest for dest, value in vars(args).items() if value != parser.get_default(dest)}
    if not args.step:
        for dest in sorted(given & {"hidden", "adapters"}):
            parser.error(f"--{dest} applies only with --step")
        if args.model is None and not (args.quick and not (args.preset or args.shape)):  # the layer benchmark alone
            for dest in sorted(given & {"layers", "batch", "seq", "vocab"}):
                parser.error(f"--{dest} sizes the model benchmark (--model, --quick) or --step; the layer benchmark "
                             f"takes --tokens")
        return
    refused = sorted(given - set(STEP_OPTIONS))
    if refused:
        parser.error(f"{_flags(refused)}: not used with --step (see --help for the options that apply)")
    sized = [name for name in args.step if name in STEP_PRESET_CASES]
    if args.preset and (len(args.preset) > 1 or not sized):
        parser.error(f"--step takes one --preset, for its {', '.join(STEP_PRESET_CASES)} cases")
    if args.preset and args.hidden and len(sized) == len(args.step):
        parser.error("--hidden and --preset both set the width: give one")
    if args.hidden and args.hidden % 16:
        parser.error("--hidden must be a multiple of 16 with --step (the models' attention heads)")
    if args.adapters and "mixed-batch" not in args.step:
        parser.error("--adapters applies only with --step mixed-batch")


def main(argv: list[str] | None = None) -> int:
    argv_list = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv_list)
    _check_options(parser, args)
    if args.plot:
        try:  # before any measuring: a missing plotting library must not cost the user the run
            import matplotlib  # noqa: F401
        except ImportError:
            parser.error("--plot needs matplotlib: pip install 'fastlora-kernels[bench]' (or pip install matplotlib)")
    device = args.device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {device}: CUDA is not available here")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        parser.error(f"--device {device}: there are {torch.cuda.device_count()} CUDA devices")
    for option in ("json", "csv", "plot", "markdown"):  # before any measuring, as every other check
        path = getattr(args, option)
        if path and not (option == "markdown" and path == "-"):
            check_output(parser, f"--{option}", path)
    if args.threads:
        torch.set_num_threads(args.threads)
    on_gpu = device.type == "cuda"
    dtype = DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if on_gpu else torch.float32)
    alpha = args.alpha if args.alpha is not None else 4.0 * args.rank
    warmup = args.warmup if args.warmup is not None else ((3 if on_gpu else 1) if args.quick else (10 if on_gpu else 2))
    repeats = args.repeats if args.repeats is not None else ((10 if on_gpu else 3) if args.quick else (50 if on_gpu else 10))

    if args.step:
        if args.compile:
            from .providers import compile_unavailable

            why = ("the mixed-batch case has no compiled providers" if "mixed-batch" in args.step
                   else compile_unavailable(device))
            if why:
                print(f"fastlora bench: --compile with --step: {why}", file=sys.stderr)
                return 2
        return _run_steps(args, argv_list, device, warmup, repeats)
    providers, skipped = resolve_providers(args.providers, device, with_compiled=args.compile)
    if not providers:
        print("fastlora bench: no provider available: " + "; ".join(f"{k}: {v}" for k, v in skipped.items()), file=sys.stderr)
        return 2

    # ---- cases
    want_layers = bool(args.preset or args.shape) or args.model is None
    want_model = args.model is not None or (args.quick and not (args.preset or args.shape))
    layer_cases: list[LayerCase] = []
    if want_layers:
        presets = args.preset or (["tiny"] if args.quick and not on_gpu and not args.shape else ([] if args.shape else ["llama-3-8b"]))
        only = args.proj or (QUICK_PROJ if args.quick else None)
        tokens = args.tokens or ((4096 if on_gpu else 1024) if args.quick else (8192 if on_gpu else 256))
        if args.quick and not on_gpu and "tiny" in presets and not args.tokens:
            tokens = 1024
        drops = args.dropout or [0.1]
        for p in drops:
            for pname in presets:
                for proj, K, N, bias in projections(MODEL_PRESETS[pname], only):
                    layer_cases.append(LayerCase(proj, pname, tokens, K, N, bias, args.rank, alpha, p, dtype))
            for M, K, N in args.shape or []:
                layer_cases.append(LayerCase("shape", None, M, K, N, False, args.rank, alpha, p, dtype))
    model_cases: list[ModelCase] = []
    if want_model:
        pr = MODEL_PRESETS[args.model or "tiny"]
        mdtype = DTYPES[args.dtype] if args.dtype else (torch.float32 if pr.name == "tiny" or not on_gpu else torch.bfloat16)
        batch, seq = args.batch or pr.batch, args.seq or pr.seq
        if not on_gpu and pr.name != "tiny":  # an 8B-width step at 4×2048 tokens takes minutes on a CPU
            batch, seq = args.batch or 1, args.seq or 256
        for p in args.dropout or [0.1, 0.0]:
            model_cases.append(
                ModelCase(
                    pr,
                    args.layers or pr.layers,
                    batch,
                    seq,
                    args.vocab or pr.vocab,
                    args.rank,
                    alpha,
                    p,
                    mdtype,
                    list(SEED_TARGETS),
                )
            )

    roof = _roofline(args, device, dtype)
    meta = environment(device)
    for name, why in skipped.items():
        print(f"fastlora bench: skipping {name}: {why}", file=sys.stderr)

    quiet = Quiet(args.max_other_load, args.retries, args.wait_idle)
    progress = _Progress((len(layer_cases) + len(model_cases)) * (warmup + repeats), not args.no_progress)
    rows: list[dict] = []
    try:
        if layer_cases:
            progress.describe("layers")
            rows += run_layers(
                layer_cases, providers, device, warmup=warmup, repeats=repeats, roofline=roof,
                memory=not args.no_memory, profile=args.profile, quiet=quiet, on_round=progress.round,
            )
        if model_cases:
            progress.describe("model")
            rows += run_model(
                model_cases, providers, device, warmup=warmup, repeats=repeats,
                memory=not args.no_memory, profile=args.profile, quiet=quiet, on_round=progress.round,
            )
    finally:
        progress.close()
    add_ratios(rows)

    header = report._machine_line(meta)
    print(f"fastlora bench — {header}")
    if roof is None:
        print("roofline: n/a (no GPU table entry for this device; pass --peak-tflops and --bandwidth-gbs)")
    else:
        print(f"roofline: {roof.name}: {roof.tflops:g} TFLOP/s, {roof.bandwidth_gbs:g} GB/s")
    print()
    print(report.format_table(rows))
    if args.profile:
        print(report.format_profiles(rows))
    command = "fastlora bench " + " ".join(shlex.quote(a) for a in argv_list)
    extra = {"command": command.strip(), "skipped": skipped}
    if args.json:
        report.write_json(args.json, rows, meta, extra)
        print(f"wrote {args.json}")
    if args.csv:
        report.write_csv(args.csv, rows, meta)
        print(f"wrote {args.csv}")
    if args.plot:
        report.plot(rows, args.plot, title=header)
        print(f"wrote {args.plot}")
    if args.markdown:
        doc = {"schema": report.SCHEMA, "meta": meta, "rows": [{**meta, **r} for r in rows], **extra}
        text = report.markdown([doc], from_results_dir=False)
        if args.markdown == "-":
            print(text)
        else:
            Path(args.markdown).parent.mkdir(parents=True, exist_ok=True)
            with open(args.markdown, "w") as f:
                f.write(text)
            print(f"wrote {args.markdown}")
    return 0
