"""Tables (stdout, markdown), JSON/CSV files and plots from result rows.

``python -m fastlora.bench.report RESULTS.json [...] [--plot-link PATH] [--page [FILE]]`` renders the
performance section (markdown) of docs/performance.md from results files, so no figure is typed by hand.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import sys
from pathlib import Path
from typing import Iterable

from fastlora.cli import check_output

from .providers import COMPILE_SUFFIX

__all__ = [
    "format_table",
    "format_profiles",
    "markdown",
    "write_json",
    "write_csv",
    "read_results",
    "plot",
    "targets",
    "main",
]

SCHEMA = "fastlora-bench/1"
MIB = 2**20
PROVIDER_ORDER = {"frozen": 0, "peft": 1, "peft+patch": 2, "fastlora-torch": 3, "fastlora-torch+inactive": 4,
                  "fastlora-triton": 5, "peft-dora": 6, "fastlora-torch-dora": 7, "fastlora-triton-dora": 8,
                  "frozen+compile": 9, "peft+compile": 10, "fastlora-torch+compile": 11, "fastlora-triton+compile": 12}

# The project's CPU targets for the torch path (tiny model), checked from model rows.
TARGET_SAVED_P_VS_P0 = 1.0
TARGET_SAVED_VS_PEFT = 0.7
TARGET_TIME_VS_PEFT = 0.85
# A PEFT model after patch_peft saves what fastlora saves; an inactive second adapter costs nothing.
TARGET_PATCHED_SAVED_VS_FASTLORA = 1.0
TARGET_INACTIVE_SAVED_VS_ONE = 1.0
TARGET_INACTIVE_TIME_VS_ONE = 1.05
# DoRA (model and layer rows): against PEFT's DoRA with dropout, against fastlora's own LoRA without.
TARGET_DORA_TIME_VS_PEFT_DORA = 0.6
TARGET_DORA_TIME_VS_LORA_P0 = 1.15
TARGET_DORA_PEAK_VS_LORA_P0 = 1.05
TARGET_DORA_SAVED_VS_PEFT_LORA = 1.0

# When a timing is not trusted: other processes used more than this share of the CPUs while it was timed,
# or its rounds' interquartile range is more than this share of its median.
MAX_OTHER_LOAD = 0.10
MAX_SPREAD = 0.25


# ---- formatting helpers ----------------------------------------------------------------------------


def _num(v, fmt="{:.2f}", na="n/a"):
    if v is None or (isinstance(v, float) and (math.isnan(v) or math.isinf(v))):
        return na
    return fmt.format(v)


def _ms(v):
    if v is None:
        return "n/a"
    return f"{v:.3f}" if v < 10 else f"{v:.1f}" if v < 1000 else f"{v:.0f}"


def _mib(v):
    return _num(None if v is None else v / MIB, "{:.2f}")


def _x(v):
    return _num(v, "{:.2f}×", "–")


def _sort_key(row):
    return PROVIDER_ORDER.get(row["provider"], 99)


def _case_name(row) -> str:
    if row["mode"] == "layer":
        name = row["case"] if not row.get("preset") else f"{row['preset']} {row['case']}"
        return f"{name} {row['M']}×{row['K']}→{row['N']}"
    return row["case"]


def _case_label(row) -> str:
    return f"{_case_name(row)} p={row['dropout']:g}"


def _grouped(rows: Iterable[dict]) -> list[tuple[str, list[dict]]]:
    out: dict[str, list[dict]] = {}
    for r in rows:
        out.setdefault((r["mode"], _case_label(r), r.get("dtype")), []).append(r)
    groups = []
    for k, v in out.items():
        label = f"{k[1]} {k[2]}"
        other = v[0].get("other_load")
        if other is not None and other >= 0.05:
            label += f" [other processes: {100 * other:.0f}% of CPUs]"
        groups.append((label, sorted(v, key=_sort_key)))
    return groups


def _compiled_columns(with_compiled: bool):
    """The columns for runs with ``+compile`` providers: the step over compiled PEFT's, and the compile time."""
    if not with_compiled:
        return []
    return [("time ×PEFT+compile", lambda r: _x(r.get("time_vs_peft_compiled"))),
            ("compile s", lambda r: _num(r.get("compile_s"), "{:.1f}", na=""))]


def _columns(mode: str, with_floor: bool, with_compiled: bool = False):
    """(header, function of row) pairs; the ratio columns lead.  ``with_compiled``: the run has ``+compile``
    providers (ratios to compiled PEFT, compile seconds)."""
    extra = _compiled_columns(with_compiled)
    if mode == "layer":
        cols = [
            ("provider", lambda r: r["provider"]),
            ("time ×frozen", lambda r: _x(r.get("time_vs_frozen"))),
            ("time ×PEFT", lambda r: _x(r.get("time_vs_peft"))),
            ("saved ×PEFT", lambda r: _x(r.get("saved_vs_peft"))),
            *extra,
            ("fwd+bwd ms", lambda r: _ms(r.get("fwd_bwd_ms"))),
            ("fwd ms", lambda r: _ms(r.get("fwd_ms"))),
            ("bwd ms", lambda r: _ms(r.get("bwd_ms"))),
            ("saved MiB", lambda r: _mib(r.get("saved_bytes"))),
            ("new saved MiB", lambda r: _mib(r.get("saved_new_bytes"))),
            ("peak MiB", lambda r: _mib(r.get("peak_mem_bytes"))),
        ]
        if with_floor:
            cols += [
                ("floor ms", lambda r: _ms(r.get("floor_ms"))),
                ("×floor", lambda r: _x(r.get("of_floor"))),
            ]
        return cols
    return [
        ("provider", lambda r: r["provider"]),
        ("step ×frozen", lambda r: _x(r.get("time_vs_frozen"))),
        ("step ×PEFT", lambda r: _x(r.get("time_vs_peft"))),
        ("saved ×frozen", lambda r: _x(r.get("saved_vs_frozen"))),
        ("saved ×PEFT", lambda r: _x(r.get("saved_vs_peft"))),
        *[(h.replace("time", "step"), f) for h, f in extra],
        ("step ms", lambda r: _ms(r.get("fwd_bwd_ms"))),
        ("tokens/s", lambda r: _num(r.get("tokens_per_s"), "{:,.0f}")),
        ("fwd ms", lambda r: _ms(r.get("fwd_ms"))),
        ("bwd ms", lambda r: _ms(r.get("bwd_ms"))),
        ("saved MiB", lambda r: _mib(r.get("saved_bytes"))),
        ("peak MiB", lambda r: _mib(r.get("peak_mem_bytes"))),
        ("peak ×PEFT", lambda r: _x(r.get("peak_vs_peft"))),
    ]


def _has_compiled(rows: list[dict]) -> bool:
    return any(r["provider"].endswith(COMPILE_SUFFIX) for r in rows)


def _floor_provider(provider: str) -> str:
    """The frozen base a provider's time cannot beat: the compiled frozen base for a compiled provider."""
    return "frozen" + COMPILE_SUFFIX if provider.endswith(COMPILE_SUFFIX) else "frozen"


def _case_key(row: dict) -> tuple:
    return (row["mode"], row.get("case"), row.get("dtype"), row.get("dropout"))


def unreliable(rows: list[dict]) -> dict[int, str]:
    """``id(row)`` → why the row's timing is not to be trusted: measured while other processes used a large
    share of the CPUs, rounds spread too wide, or a LoRA provider faster than the frozen base of its case
    (the compiled frozen base for a compiled provider; impossible: the measurement was disturbed).  Rows absent from the result are trusted."""
    floors = ("frozen", "frozen" + COMPILE_SUFFIX)
    floor = {(_case_key(r), r["provider"]): r.get("fwd_bwd_ms") for r in rows if r["provider"] in floors}
    out = {}
    for r in rows:
        reasons = []
        load = r.get("other_load")
        if load is not None and load > MAX_OTHER_LOAD:
            reasons.append(f"other processes used {100 * load:.0f}% of the CPUs while it was timed")
        q1, q3, med = r.get("fwd_bwd_ms_q1"), r.get("fwd_bwd_ms_q3"), r.get("fwd_bwd_ms")
        if q1 is not None and q3 is not None and med and (q3 - q1) / med > MAX_SPREAD:
            reasons.append(f"its rounds spread {100 * (q3 - q1) / med:.0f}% of the median (quartiles)")
        base = floor.get((_case_key(r), _floor_provider(r["provider"])))
        if r["provider"] != _floor_provider(r["provider"]) and base and med is not None and med < base:
            which = "compiled frozen base" if r["provider"].endswith(COMPILE_SUFFIX) else "frozen base"
            reasons.append(f"faster than the {which} ({_ms(med)} < {_ms(base)} ms): impossible, the measurement "
                           f"was disturbed")
        if reasons:
            out[id(r)] = "; ".join(reasons)
    return out


def _warnings(group: list[dict], doubts: dict[int, str]) -> list[str]:
    return [f"{r['provider']}: not reliable: {doubts[id(r)]}" for r in group if id(r) in doubts]


# Printed under each table of format_table and under its targets: what the columns and the brackets mean.
LEGEND = {
    "layer": [
        "time / saved ×frozen, ×PEFT: the row's figure over the frozen base's / PEFT's in the same case",
        "saved MiB: every storage autograd keeps for backward (parameters excluded; views counted once); "
        "new saved MiB: the same without the layer's input, which the previous layer keeps alive anyway",
        "peak MiB: most memory allocated above the start of one forward+backward",
    ],
    "model": [
        "step: forward + loss + backward (no optimizer step); ×frozen, ×PEFT: over the frozen model's / PEFT's",
        "saved MiB: every storage autograd keeps for backward (parameters excluded; views counted once)",
        "peak MiB: most memory allocated above the start of one step",
    ],
    "compiled": [
        "+compile: the provider under torch.compile (default options); ×PEFT+compile: over compiled PEFT's time; "
        "compile s: its first forward+backward (tracing and compiling), timed apart and not in its step time",
    ],
    "targets": [
        "saved activations: saved storages other than one-element ones (the layers' dropout seeds, 8 bytes "
        "each); the bracket gives what p adds over p=0 counting every storage, seeds included, and how many "
        "one-element tensors it adds",
        "each line: the measured ratio, then the goal it should stay within and whether it is reached",
    ],
}


def _legend(kind: str) -> list[str]:
    return [f"  · {line}" for line in LEGEND[kind]]


def format_table(rows: list[dict]) -> str:
    """A plain-text table per mode, one block per case, each with a legend under it; rows whose timing is not
    reliable are named under their table."""
    out = []
    doubts = unreliable(rows)
    for mode in ("layer", "model"):
        mrows = [r for r in rows if r["mode"] == mode]
        if not mrows:
            continue
        with_floor = any(r.get("floor_ms") for r in mrows)
        cols = _columns(mode, with_floor, _has_compiled(mrows))
        for label, group in _grouped(mrows):
            cells = [[h for h, _ in cols]] + [[f(r) for _, f in cols] for r in group]
            widths = [max(len(c[i]) for c in cells) for i in range(len(cols))]
            out.append(label)
            for j, line in enumerate(cells):
                out.append("  " + "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(line, widths))))
                if j == 0:
                    out.append("  " + "  ".join("-" * w for w in widths))
            out.extend(f"  ! {line}" for line in _warnings(group, doubts))
            out.extend(_legend(mode))
            if _has_compiled(group):
                out.extend(_legend("compiled"))
            out.append("")
    tl = targets(rows)
    if tl:
        out.append("goals (fastlora's torch path vs PEFT; model mode, and DoRA per layer too):")
        out.extend("  " + line for line in tl)
        out.extend(_legend("targets"))
        out.append("")
    return "\n".join(out)


def format_profiles(rows: list[dict]) -> str:
    """The ``--profile`` tables: top ops by self time per case and provider."""
    out = []
    for r in rows:
        prof = r.get("profile")
        if not prof:
            continue
        out.append(f"profile: {_case_label(r)} {r.get('dtype')} — {r['provider']} (one fwd+bwd, under the profiler)")
        w = max(len(e["op"]) for e in prof)
        for e in prof:
            out.append(f"  {e['op'].ljust(w)}  {e['self_ms']:9.3f} ms  {100 * e['share']:5.1f}%  {e['calls']:5d} calls")
        out.append("")
    return "\n".join(out)


def _md_table(header: list[str], body: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" if i == 0 else "---:" for i in range(len(header))) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in body]
    return lines


def _machine_line(meta: dict) -> str:
    hw = meta.get("gpu") or meta.get("cpu") or "?"
    parts = [f"{hw} ({meta.get('device')}, {meta.get('threads')} threads)" if not meta.get("gpu") else f"{hw}"]
    for k in ("torch", "triton", "peft", "transformers"):
        if meta.get(k):
            parts.append(f"{k} {meta[k]}")
    if meta.get("git_commit"):
        parts.append(f"fastlora @ {meta['git_commit'][:12]}")
    if meta.get("date"):
        parts.append(meta["date"][:10])
    return ", ".join(parts)


DORA_PROVIDERS = ("peft-dora", "fastlora-torch-dora", "fastlora-triton-dora")
_FASTLORA_DORA_VS_LORA = {"fastlora-torch-dora": "fastlora-torch", "fastlora-triton-dora": "fastlora-triton"}


def targets(rows: list[dict], provider: str = "fastlora-torch") -> list[str]:
    """Lines checking the project's targets from model rows (empty if the rows do not have them).  A timing
    target whose rows are not reliable (see :func:`unreliable`) is "not judged", with the reason.

    The LoRA targets are judged on runs without DoRA providers, the DoRA targets on runs with them: a
    provider that allocates as much as PEFT's DoRA changes the allocator's state for every other provider
    of the run (on CPU, glibc raises its mmap and trim thresholds after large frees), so LoRA figures
    from such a run are not those of LoRA alone."""
    lines = []
    doubts = unreliable(rows)
    by = {}
    with_dora = any(r["provider"] in DORA_PROVIDERS for r in rows)
    for r in rows:
        if r["mode"] == "model" and not with_dora:
            by[(r["case"], r["dtype"], r["dropout"], r["provider"])] = r
    cases = sorted({(k[0], k[1]) for k in by})
    for case, dtype in cases:
        drops = sorted({k[2] for k in by if k[0] == case and k[1] == dtype})
        p_pos = [d for d in drops if d > 0]
        for p in p_pos:
            fl, pe = by.get((case, dtype, p, provider)), by.get((case, dtype, p, "peft"))
            fl0 = by.get((case, dtype, 0.0, provider))
            if fl is None:
                continue
            head = f"{case} {dtype} p={p:g}:"
            checks = []
            if fl0 is not None and fl0.get("saved_bytes"):
                # Activations: the saved storages other than one-element ones (the layers' dropout seeds).
                # The seeds' bytes are shown beside the ratio, never hidden.
                act, act0 = (r["saved_bytes"] - r.get("saved_one_element_bytes", 0) for r in (fl, fl0))
                delta = fl["saved_bytes"] - fl0["saved_bytes"]
                seeds = fl.get("saved_one_element_tensors", 0) - fl0.get("saved_one_element_tensors", 0)
                name = (f"saved activations(p) / saved activations(p=0) [all saved storages {delta:+,d} bytes, "
                        f"{seeds:+d} one-element tensors]")
                checks.append((name, act / act0, TARGET_SAVED_P_VS_P0))
            if pe is not None:
                if pe.get("saved_bytes"):
                    checks.append(("saved / PEFT saved", fl["saved_bytes"] / pe["saved_bytes"], TARGET_SAVED_VS_PEFT))
                if pe.get("fwd_bwd_ms"):
                    checks.append(("step time / PEFT step time", fl["fwd_bwd_ms"] / pe["fwd_bwd_ms"], TARGET_TIME_VS_PEFT))
            doubt = _doubt(doubts, fl, pe)
            for name, v, tgt in checks:
                timed = "time" in name
                lines.append(_target_line(f"{head} {provider} {name}", v, tgt, doubt if timed else None))
            lines += _companion_targets(head, by, case, dtype, p, fl, doubts)
    return lines + _dora_targets(rows, doubts)


def _dora_targets(rows: list[dict], doubts: dict[int, str]) -> list[str]:
    """fastlora's DoRA against PEFT's DoRA (step time, with dropout), against fastlora's LoRA (step time and
    peak memory, without dropout) and against PEFT's LoRA (saved bytes), per model or layer case."""
    by = {(r["mode"], _case_name(r), r["dtype"], r["dropout"], r["provider"]): r for r in rows}
    lines = []
    for mode, case, dtype, p, provider in sorted(k for k in by if k[4] in _FASTLORA_DORA_VS_LORA):
        ours = by[(mode, case, dtype, p, provider)]
        head = f"{case} {dtype} p={p:g}: {provider}"
        lora = _FASTLORA_DORA_VS_LORA[provider]
        against = [("peft-dora", "step time / peft-dora step time", "fwd_bwd_ms", TARGET_DORA_TIME_VS_PEFT_DORA)] if p else [
            (lora, f"step time / {lora} step time", "fwd_bwd_ms", TARGET_DORA_TIME_VS_LORA_P0),
            (lora, f"peak / {lora} peak", "peak_mem_bytes", TARGET_DORA_PEAK_VS_LORA_P0)]
        against.append(("peft", "saved / PEFT (LoRA) saved", "saved_bytes", TARGET_DORA_SAVED_VS_PEFT_LORA))
        for other_name, label, key, target in against:
            other = by.get((mode, case, dtype, p, other_name))
            if other is None or not other.get(key) or ours.get(key) is None:
                continue
            doubt = _doubt(doubts, ours, other) if key == "fwd_bwd_ms" else None
            lines.append(_target_line(f"{head} {label}", ours[key] / other[key], target, doubt))
    return lines


def _doubt(doubts: dict[int, str], *rows) -> str | None:
    reasons = [f"{r['provider']}: {doubts[id(r)]}" for r in rows if r is not None and id(r) in doubts]
    return "; ".join(reasons) or None


def _target_line(label: str, value: float, target: float, doubt: str | None = None) -> str:
    shown = f"{value:.6f}" if value > target + 1e-9 and round(value, 2) <= target else f"{value:.2f}"
    if doubt:
        return f"{label} = {shown} (goal ≤ {target:g}): not judged ({doubt})"
    reached = "reached" if value <= target + 1e-9 else "not reached"
    return f"{label} = {shown} (goal ≤ {target:g}): {reached}"


def _companion_targets(head: str, by: dict, case, dtype, p, fl: dict, doubts: dict[int, str]) -> list[str]:
    """peft+patch against fastlora (saved bytes), and fastlora with an inactive second adapter against
    fastlora with one (saved bytes and step time), where the rows are there."""
    lines = []
    patched = by.get((case, dtype, p, "peft+patch"))
    if patched is not None and fl.get("saved_bytes"):
        lines.append(_target_line(f"{head} peft+patch saved / {fl['provider']} saved",
                                  patched["saved_bytes"] / fl["saved_bytes"], TARGET_PATCHED_SAVED_VS_FASTLORA))
    inactive = by.get((case, dtype, p, "fastlora-torch+inactive"))
    if inactive is not None and fl.get("saved_bytes") and fl.get("fwd_bwd_ms"):
        lines.append(_target_line(f"{head} fastlora-torch+inactive saved / one adapter's",
                                  inactive["saved_bytes"] / fl["saved_bytes"], TARGET_INACTIVE_SAVED_VS_ONE))
        lines.append(_target_line(f"{head} fastlora-torch+inactive step time / one adapter's",
                                  inactive["fwd_bwd_ms"] / fl["fwd_bwd_ms"], TARGET_INACTIVE_TIME_VS_ONE,
                                  _doubt(doubts, inactive, fl)))
    return lines


def markdown(results: list[dict], plot_links: Iterable[str] = (), from_results_dir: bool = True) -> str:
    """The performance section for one or more results documents (``read_results`` output): the performance
    page's (``from_results_dir``: the documents are the committed files of ``bench/results/``) or an ad-hoc run's."""
    out = ["## Performance", ""]
    origin = ("Generated by `python -m fastlora.bench.report` from the files in `bench/results/`; every figure "
              "below is in one of them." if from_results_dir else "Measured by the command below, on this machine.")
    out.append(
        f"{origin} Ratios are per case, measured in one run with the providers interleaved "
        "(median of the timed rounds after warm-up). *frozen* is the base layer/model with every weight "
        "frozen and the input requiring grad (the floor); *saved* is the bytes autograd keeps for backward "
        "(unique storages, parameters excluded), measured with `saved_tensors_hooks`; *peak* is the most "
        "memory allocated above the start of one forward+backward (CPU: torch's allocator via "
        "`torch.profiler`)."
    )
    out.append("")
    # End-to-end (model) results first: they carry the headline numbers and the targets.
    def has_dora(doc):
        return any(r["provider"] in DORA_PROVIDERS for r in doc["rows"])

    results = sorted(results, key=lambda d: (0 if all(r["mode"] == "model" for r in d["rows"]) else 1, has_dora(d)))
    for doc in results:
        rows = doc["rows"]
        meta = doc.get("meta") or (rows[0] if rows else {})
        src = doc.get("_path")
        mode = "model" if all(r["mode"] == "model" for r in rows) else "layer"
        title = "One training step, Llama-architecture model" if mode == "model" else "Single layers"
        if mode == "model" and has_dora(doc):
            title += ", DoRA beside LoRA"
        out.append(f"### {title} — {_machine_line(meta)}")
        out.append("")
        if src:
            out.append(f"Source: `{src}`" + (f"; command: `{doc['command']}`" if doc.get("command") else ""))
            out.append("")
        elif doc.get("command"):
            out += [f"Command: `{doc['command']}`", ""]
        for m in ("layer", "model"):
            mrows = [r for r in rows if r["mode"] == m]
            if not mrows:
                continue
            with_floor = any(r.get("floor_ms") for r in mrows)
            cols = _columns(m, with_floor, _has_compiled(mrows))
            header = ["case"] + [h for h, _ in cols]
            body, notes = [], []
            doubts = unreliable(mrows)
            for label, group in _grouped(mrows):
                for i, r in enumerate(group):
                    body.append([label if i == 0 else ""] + [f(r) for _, f in cols])
                notes += [f"- {label}, {line}" for line in _warnings(group, doubts)]
            out.extend(_md_table(header, body))
            out.append("")
            if _has_compiled(mrows):
                out += ["`" + LEGEND["compiled"][0].replace(":", "`:", 1) + ".", ""]
            if notes:
                out += ["Timings not to be trusted (their ratios are not judged):", "", *notes, ""]
        tl = targets(rows)
        if tl:
            out.append("Goals (fastlora's torch path; a PEFT model after patch_peft; an inactive second adapter; "
                       "DoRA):")
            out.append("")
            out.extend(f"- {line}" for line in tl)
            out.append("")
        if not any(r.get("floor_ms") for r in rows if r["mode"] == "layer") and any(r["mode"] == "layer" for r in rows):
            out.append("Roofline: n/a on CPU (no peak rate/bandwidth table entry; pass `--peak-tflops` and `--bandwidth-gbs`).")
            out.append("")
    for link in plot_links:
        out.append(f"![fastlora benchmark]({link})")
        out.append("")
    if not from_results_dir:
        return "\n".join(out).rstrip() + "\n"
    out += [
        "Reproduce on your hardware:",
        "",
        "```bash",
        "fastlora bench --quick                      # layers + the tiny model, under a minute on 2 CPU cores",
        "fastlora bench --preset llama-3-8b --json layers.json --plot layers.png",
        "fastlora bench --model tiny --json model.json      # one training step, dropout 0.1 and 0",
        "bash bench/gpu_check.sh                     # the GPU results files (layers, kernel variants, model)",
        "pytest bench/ --benchmark-only              # the pytest-benchmark suite (compare runs with --benchmark-compare)",
        "python -m fastlora.bench.report bench/results/*.json   # this section",
        "```",
        "",
    ]
    return "\n".join(out).rstrip() + "\n"


# ---- files -----------------------------------------------------------------------------------------


def write_json(path: str | Path, rows: list[dict], meta: dict, extra: dict | None = None) -> None:
    doc = {"schema": SCHEMA, "meta": meta, **(extra or {}), "rows": [{**meta, **r} for r in rows]}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(doc, indent=1, default=str) + "\n")


def write_csv(path: str | Path, rows: list[dict], meta: dict) -> None:
    full = [{**meta, **r} for r in rows]
    fields: list[str] = []
    for r in full:
        for k in r:
            if k not in fields:
                fields.append(k)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        for r in full:
            w.writerow({k: _csv_cell(r.get(k)) for k in fields})


def _csv_cell(v):
    if v is None:
        return ""
    if isinstance(v, (list, dict)):
        return json.dumps(v)
    return v


def read_results(path: str | Path) -> dict:
    doc = json.loads(Path(path).read_text())
    if doc.get("schema") != SCHEMA:
        raise ValueError(f"{path}: not a fastlora bench results file (schema {doc.get('schema')!r})")
    doc["_path"] = str(path)
    return doc


def _plot_label(row: dict) -> str:
    """A short two-line tick label: what the case is, then its shape / size and dropout."""
    if row["mode"] == "layer":
        first = row["case"] if row["case"] != "shape" else "shape"
        second = f"{row['M']}×{row['K']}→{row['N']}"
    else:
        first = f"{row['preset']} {row['layers']}L"
        second = f"{row['batch']}×{row['seq']} tok"
    other = row.get("other_load")
    mark = "*" if other is not None and other >= 0.05 else ""
    return f"{first}\n{second} p={row['dropout']:g}{mark}"


def plot(rows: list[dict], path: str | Path, title: str | None = None) -> None:
    """Grouped bars per case and provider: fwd+bwd time, saved activations and (if measured) peak memory."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = [(_plot_label(g[0]), g) for _, g in _grouped(rows)]
    provs = sorted({r["provider"] for r in rows}, key=lambda p: PROVIDER_ORDER.get(p, 99))
    panels = [("fwd_bwd_ms", "forward+backward (ms)", 1.0), ("saved_bytes", "saved activations (MiB)", 1 / MIB)]
    if any(r.get("peak_mem_bytes") for r in rows):
        panels.append(("peak_mem_bytes", "peak memory (MiB)", 1 / MIB))
    n = len(groups)
    fig, axes = plt.subplots(
        len(panels), 1, figsize=(max(8.0, 0.45 * n * len(provs) + 2), 2.6 * len(panels) + 1.2), squeeze=False
    )
    width = 0.8 / max(1, len(provs))
    colors = {"frozen": "#999999", "peft": "#d62728", "fastlora-torch": "#1f77b4", "fastlora-triton": "#2ca02c"}
    for ax, (metric, ylabel, scale) in zip(axes[:, 0], panels):
        for j, p in enumerate(provs):
            vals = []
            for _, g in groups:
                r = next((r for r in g if r["provider"] == p), None)
                v = None if r is None else r.get(metric)
                vals.append(float("nan") if v is None else v * scale)
            xs = [i + (j - (len(provs) - 1) / 2) * width for i in range(n)]
            ax.bar(xs, vals, width, label=p, color=colors.get(p))
        ax.set_ylabel(ylabel)
        ax.set_xticks(range(n))
        ax.set_xticklabels([lbl for lbl, _ in groups], fontsize=7)
        ax.grid(axis="y", alpha=0.3)
    axes[0, 0].legend(fontsize=8, ncol=len(provs))
    if any(r.get("other_load") is not None and r["other_load"] >= 0.05 for r in rows):
        fig.text(0.01, 0.003, "* other processes used ≥ 5% of the CPUs while this case was timed", fontsize=7)
    if title:
        import textwrap

        fig.suptitle("\n".join(textwrap.wrap(title, 110)), fontsize=8)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


# The generated section sits between these two markers, in the performance page unless told another file.
README_START, README_END = "<!-- bench:start -->", "<!-- bench:end -->"
PERFORMANCE_PAGE = "docs/performance.md"


def embed_in_readme(readme: Path, section: str) -> None:
    """Put ``section`` (its own '## Performance' heading dropped) between the two markers of the Markdown file
    ``readme`` (any file that has them; the project's is ``PERFORMANCE_PAGE``)."""
    text = readme.read_text()
    if README_START not in text or README_END not in text:
        raise SystemExit(f"{readme} has no {README_START} ... {README_END} markers")
    body = section.split("\n", 1)[1].strip() if section.startswith("## ") else section.strip()
    head, rest = text.split(README_START, 1)
    _, tail = rest.split(README_END, 1)
    readme.write_text(f"{head}{README_START}\n{body}\n{README_END}{tail}")


def links_from_page(page: str | Path, links: Iterable[str]) -> list[str]:
    """``links`` (paths from the working directory, the repository root) as the Markdown file ``page`` needs
    them: relative to its own folder.  URLs and absolute paths are kept."""
    base = Path(page).parent
    return [link if "://" in link or Path(link).is_absolute() else Path(os.path.relpath(link, base)).as_posix()
            for link in links]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m fastlora.bench.report",
        description="Render the performance section (markdown) from fastlora bench results files.",
    )
    ap.add_argument("results", nargs="+", help="results JSON files written by `fastlora bench --json`")
    ap.add_argument("--plot-link", action="append", default=[], help="image path to show under the tables")
    ap.add_argument("--plot", help="also (re)draw a plot of all rows to this PNG")
    ap.add_argument("-o", "--output", help="write the markdown here instead of stdout")
    ap.add_argument("--page", "--readme", dest="page", nargs="?", const=PERFORMANCE_PAGE, metavar="FILE",
                    help=f"replace the text between {README_START} and {README_END} in FILE ({PERFORMANCE_PAGE} "
                         "when FILE is left out); plot links are then written relative to FILE's folder")
    args = ap.parse_args(argv)
    if args.page and not Path(args.page).is_file():
        ap.error(f"--page {args.page}: no such file")
    for option, path in (("--plot", args.plot), ("--output", args.output)):
        if path:
            check_output(ap, option, path)
    docs = []
    for path in args.results:  # a glob of a results folder also holds other files: steps, kernel variants
        try:
            doc = json.loads(Path(path).read_text())
        except (OSError, ValueError) as e:
            ap.error(f"{path}: {e.strerror if isinstance(e, OSError) else 'not a JSON file'}")
        schema = doc.get("schema") if isinstance(doc, dict) else None
        if schema != SCHEMA:
            print(f"skipping {path}: {schema or 'another format'}, not layer / model rows", file=sys.stderr)
            continue
        docs.append(read_results(path))
    if not docs:
        ap.error("none of the files holds layer / model rows (fastlora bench --json without --step)")
    if args.plot:
        plot([r for d in docs for r in d["rows"]], args.plot)
    links = links_from_page(args.page, args.plot_link) if args.page else args.plot_link
    text = markdown(docs, links)
    if args.page:
        embed_in_readme(Path(args.page), text)
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(text)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
