"""Measurements: per-iteration forward/backward timing, saved-activation bytes, peak memory.

Saved activations
    Counted with ``torch.autograd.graph.saved_tensors_hooks`` during one forward: every tensor autograd
    saves for backward is seen by the pack hook.  We count each *storage* once (q/k/v saving views of
    one input count it once), by ``untyped_storage().nbytes()`` (the whole storage, as that is what is
    kept alive), and exclude parameters and buffers (frozen weights are kept alive by the model anyway).
    ``saved_new`` also excludes the storages of the inputs the caller hands in (the layer's input, which
    the previous layer keeps anyway): what the layer itself allocates and keeps.

Peak memory
    CUDA: ``torch.cuda.max_memory_allocated`` over one forward+backward, minus the allocation before it
    (so parameters and the input are not counted; activations, temporaries and gradients are).
    CPU: torch's CPU allocator reports each allocation and free to ``torch.profiler`` when
    ``profile_memory=True``; the peak of the running sum over one forward+backward is the same quantity
    (allocations through torch's allocator only: oneDNN/BLAS scratch space is invisible and not counted).
    If the profiler cannot give it, the result is ``None`` (shown "n/a"), never an estimate.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
import time
from contextlib import contextmanager
from typing import Callable, Iterable

import torch

__all__ = [
    "SavedTensorCounter",
    "count_saved",
    "peak_memory",
    "profile_ops",
    "Timer",
    "median",
    "OtherLoad",
    "wait_for_idle",
]


def median(values: Iterable[float]) -> float | None:
    vals = list(values)
    return statistics.median(vals) if vals else None


def _storage_key(t: torch.Tensor) -> tuple[str, int] | None:
    try:
        st = t.untyped_storage()
        return (str(t.device), st.data_ptr())
    except (RuntimeError, NotImplementedError):
        return None


class SavedTensorCounter:
    """Context manager: records the unique storages autograd saves while it is active."""

    def __init__(self, exclude: Iterable[torch.Tensor] = (), inputs: Iterable[torch.Tensor] = ()):
        self._exclude = {k for k in (_storage_key(t) for t in exclude) if k is not None}
        self._inputs = {k for k in (_storage_key(t) for t in inputs) if k is not None}
        self.storages: dict[tuple[str, int], int] = {}
        self.count = 0  # tensors packed (before de-duplication, parameters excluded)
        self._one_element: set[tuple[str, int]] = set()  # storages of a single element (e.g. dropout seeds)
        self._hooks = None

    def _pack(self, t: torch.Tensor):
        key = _storage_key(t)
        if key is not None and key not in self._exclude:
            self.count += 1
            if key not in self.storages:
                self.storages[key] = t.untyped_storage().nbytes()
                if t.numel() == 1 and self.storages[key] == t.element_size():
                    self._one_element.add(key)
        return t

    @staticmethod
    def _unpack(t):
        return t

    def __enter__(self):
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc):
        self._hooks.__exit__(*exc)
        return False

    @property
    def bytes(self) -> int:
        """Bytes of all unique saved storages (parameters and buffers excluded)."""
        return sum(self.storages.values())

    @property
    def new_bytes(self) -> int:
        """As ``bytes`` but without the storages of the declared inputs."""
        return sum(n for k, n in self.storages.items() if k not in self._inputs)

    @property
    def one_element_bytes(self) -> int:
        """The part of ``bytes`` in one-element storages: RNG seeds and scalars, not activations."""
        return sum(self.storages[k] for k in self._one_element)

    def fields(self) -> dict:
        """The counts as result-row fields."""
        return {
            "saved_bytes": self.bytes,
            "saved_new_bytes": self.new_bytes,
            "saved_one_element_bytes": self.one_element_bytes,
            "saved_one_element_tensors": len(self._one_element),
        }


def module_tensors(*modules: torch.nn.Module) -> list[torch.Tensor]:
    out: list[torch.Tensor] = []
    for m in modules:
        out.extend(p.detach() for p in m.parameters())
        out.extend(b for b in m.buffers())
    return out


def count_saved(
    forward: Callable[[], object], exclude: Iterable[torch.Tensor] = (), inputs: Iterable[torch.Tensor] = ()
) -> tuple[int, int, object]:
    """Run ``forward()`` under the counter: ``(saved_bytes, saved_new_bytes, output)``.

    Keep ``output`` alive until you have read the numbers (or backward it), so nothing is freed early.
    """
    with SavedTensorCounter(exclude=exclude, inputs=inputs) as c:
        out = forward()
    return c.bytes, c.new_bytes, out


@contextmanager
def _native_stderr_silenced():
    """Send what native code writes to file descriptor 2 to /dev/null (torch's profiler prints a
    ``USDT ... profiler_start/stop`` line per use); Python's own stderr is flushed first and restored after."""
    sys.stderr.flush()
    try:
        saved = os.dup(2)
    except OSError:  # no descriptor 2 to redirect
        yield
        return
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)


@contextmanager
def _profiled(**kwargs):
    """``torch.profiler.profile(**kwargs)`` whose start and stop (which print a ``USDT ... profiler_start/stop``
    line from native code) are silenced; what runs inside the block, warnings included, is not."""
    from torch.profiler import profile

    prof = profile(**kwargs)
    with _native_stderr_silenced():
        prof.__enter__()
    try:
        yield prof
    finally:
        with _native_stderr_silenced():
            prof.__exit__(None, None, None)


def _cpu_peak_from_profiler(step: Callable[[], None]) -> int | None:
    from torch.profiler import ProfilerActivity

    fd, path = tempfile.mkstemp(suffix=".json", prefix="fastlora-bench-")
    os.close(fd)
    try:
        with _profiled(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=False) as prof:
            step()
        prof.export_chrome_trace(path)
        with open(path) as f:
            trace = json.load(f)
    except Exception:  # noqa: BLE001 - "n/a" rather than a made-up number
        return None
    finally:
        try:
            os.unlink(path)
        except OSError:
            pass
    events = [
        e
        for e in trace.get("traceEvents", [])
        if e.get("name") == "[memory]" and int(e.get("args", {}).get("Device Type", 0)) == 0
    ]
    if not events:
        return 0  # the profiler ran with memory tracking and saw no allocation through torch's allocator
    events.sort(key=lambda e: e.get("ts", 0))
    cur = peak = 0
    for e in events:
        cur += int(e["args"].get("Bytes", 0))
        peak = max(peak, cur)
    return peak


def peak_memory(step: Callable[[], None], device: torch.device) -> tuple[int | None, str]:
    """Peak bytes allocated above the start while ``step()`` runs, and how it was measured."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base, "cuda max_memory_allocated"
    if device.type == "cpu":
        peak = _cpu_peak_from_profiler(step)
        return peak, ("cpu allocator via torch.profiler" if peak is not None else "n/a")
    return None, "n/a"


def profile_ops(step: Callable[[], None], device: torch.device, top: int = 12) -> list[dict]:
    """Where one ``step()`` spends its time: the ``top`` ops by self time (torch.profiler), as dicts."""
    from torch.profiler import ProfilerActivity

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with _profiled(activities=acts) as prof:
        step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    dev_attr = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    events = sorted(prof.key_averages(), key=lambda e: getattr(e, dev_attr, 0), reverse=True)
    total = sum(getattr(e, dev_attr, 0) for e in events) or 1
    return [
        {
            "op": e.key,
            "self_ms": getattr(e, dev_attr, 0) / 1e3,
            "share": getattr(e, dev_attr, 0) / total,
            "calls": e.count,
        }
        for e in events[:top]
    ]


class Timer:
    """Marks points in one iteration and returns the intervals in milliseconds.

    CPU: ``time.perf_counter`` (ops are synchronous).  CUDA: CUDA events, read after one synchronize at
    the end of the iteration so that timing does not stall the stream between the marks.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self._marks: list = []

    def mark(self) -> None:
        if self.device.type == "cuda":
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            self._marks.append(ev)
        else:
            self._marks.append(time.perf_counter())

    def intervals_ms(self) -> list[float]:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            out = [a.elapsed_time(b) for a, b in zip(self._marks, self._marks[1:])]
        else:
            out = [(b - a) * 1e3 for a, b in zip(self._marks, self._marks[1:])]
        self._marks = []
        return out


@contextmanager
def num_threads(n: int | None):
    if n is None:
        yield
        return
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


# ---- other processes ---------------------------------------------------------------------------------
#
# CPU timings on a shared machine move with whatever else runs: with 2 threads on 2 cores, one busy
# core can make a parallel op wait a whole scheduler slice.  ``OtherLoad`` measures, over a window, the
# share of the machine's CPU time that *other* processes used: (busy jiffies of the whole machine from
# /proc/stat − this process's own CPU time) / (wall time × CPUs).  Linux only (None elsewhere).


def _proc_stat() -> tuple[float, float] | None:
    try:
        with open("/proc/stat") as f:
            parts = f.readline().split()
    except OSError:
        return None
    if not parts or parts[0] != "cpu":
        return None
    vals = [float(v) for v in parts[1:]]
    idle = vals[3] + (vals[4] if len(vals) > 4 else 0.0)  # idle + iowait
    return sum(vals[:8]), idle  # user nice system idle iowait irq softirq steal


_HZ = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


class OtherLoad:
    """``with OtherLoad() as o: ...`` then ``o.value``: the share (0-1) of all CPUs other processes used."""

    def __init__(self):
        self.value: float | None = None

    def __enter__(self):
        self._stat = _proc_stat()
        self._self = os.times()
        self._t = time.perf_counter()
        return self

    def __exit__(self, *exc):
        end = _proc_stat()
        if self._stat is None or end is None:
            return False
        wall = time.perf_counter() - self._t
        ncpu = os.cpu_count() or 1
        busy = ((end[0] - end[1]) - (self._stat[0] - self._stat[1])) / _HZ
        t1 = os.times()
        own = (t1.user - self._self.user) + (t1.system - self._self.system)
        if wall > 0:
            self.value = max(0.0, min(1.0, (busy - own) / (wall * ncpu)))
        return False


def wait_for_idle(max_busy: float, timeout_s: float, sample_s: float = 1.0) -> float | None:
    """Wait (at most ``timeout_s``) until the machine's CPUs are busy less than ``max_busy`` (0-1) over a
    ``sample_s`` window; returns the last busy share seen (None where /proc/stat is not there)."""
    deadline = time.monotonic() + timeout_s
    while True:
        with OtherLoad() as o:
            time.sleep(sample_s)
        if o.value is None or o.value <= max_busy or time.monotonic() >= deadline:
            return o.value
