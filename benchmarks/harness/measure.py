"""Measurement: wall clock, peak resident memory per phase, software versions and machine description."""

from __future__ import annotations

import contextlib
import datetime as _dt
import os
import platform
import resource
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

try:
    import psutil
except ImportError:  # pragma: no cover - psutil is optional; fall back to ru_maxrss
    psutil = None


def maxrss_mb() -> float:
    """Peak RSS of this process since it started (ru_maxrss), in MiB."""
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb / 1024.0 if sys.platform != "darwin" else kb / 2**20


class RssSampler:
    """Samples this process's current RSS in a background thread, so each phase gets its own peak.

    `ru_maxrss` only ever grows, so it gives the peak of a phase only for the first phase of a process; the
    sampler (every `interval_s`, plus at each phase boundary) gives per-phase peaks also later in a process.
    Without psutil it falls back to ru_maxrss at the end of the phase.
    """

    def __init__(self, interval_s: float = 0.02) -> None:
        self.interval_s = interval_s
        self.peaks: dict[str, float] = {}
        self._current: str | None = None
        self._peak = 0.0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._proc = psutil.Process() if psutil is not None else None
        self._thread: threading.Thread | None = None
        if self._proc is not None:
            self._thread = threading.Thread(target=self._loop, daemon=True)
            self._thread.start()

    def _rss_mb(self) -> float:
        return self._proc.memory_info().rss / 2**20 if self._proc is not None else maxrss_mb()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            rss = self._rss_mb()
            with self._lock:
                if self._current is not None and rss > self._peak:
                    self._peak = rss

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Record the peak RSS (MiB) reached while the block runs under `self.peaks[name]`."""
        with self._lock:
            self._current, self._peak = name, self._rss_mb()
        try:
            yield
        finally:
            rss = self._rss_mb()
            with self._lock:
                self.peaks[name] = max(self._peak, rss)
                self._current = None

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=1.0)


class Timer:
    """`with Timer() as t: ...` then `t.s` is the wall time in seconds."""

    def __enter__(self) -> Timer:
        self.start = time.perf_counter()
        self.s = 0.0
        return self

    def __exit__(self, *exc: Any) -> None:
        self.s = time.perf_counter() - self.start


def versions() -> dict[str, str]:
    """Versions of Python and of the packages the numbers depend on."""
    out = {"python": platform.python_version()}
    for name in ("torch", "transformers", "peft", "accelerate", "gora"):
        try:
            module = __import__(name)
            out[name] = str(getattr(module, "__version__", "?"))
        except ImportError:
            out[name] = "not installed"
    return out


def machine() -> dict[str, Any]:
    """What the numbers were measured on (the CPU is shared with other work: timings are noisy)."""
    import torch

    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as handle:
        for line in handle:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem_gb = None
    if psutil is not None:
        mem_gb = round(psutil.virtual_memory().total / 2**30, 1)
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "memory_gb": mem_gb,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "platform": platform.platform(),
        "load_avg_1m": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
    }


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def stamp() -> dict[str, Any]:
    """What every benchmark record carries: the code ({"commit", "dirty"}), the versions, the machine, the date."""
    from .provenance import git_commit

    return {"git": git_commit(), "versions": versions(), "machine": machine(), "date": now()}
