"""The kernels release the GIL: another Python thread keeps running while one executes.

No wall-clock threshold: the main thread samples the CPU time consumed by *other* threads
(process CPU time minus its own) while a worker thread sits in a long kernel. With the GIL
released, the main thread runs throughout and sees that CPU time grow in many small steps.
With the GIL held, the main thread cannot run during the kernel at all, so it would see the
whole kernel's CPU time appear in a single jump between two of its samples.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import numpy as np
import pytest

import confide


def _observe(kernel: Callable[[], object]) -> tuple[float, float, int]:
    started = threading.Event()

    def work() -> None:
        started.set()
        kernel()

    t = threading.Thread(target=work)
    samples = [time.process_time() - time.thread_time()]
    t.start()
    started.wait()
    while t.is_alive():
        samples.append(time.process_time() - time.thread_time())
    t.join()
    samples.append(time.process_time() - time.thread_time())
    steps = np.diff(samples)
    total = samples[-1] - samples[0]
    return total, float(steps.max(initial=0.0)), len(samples)


@pytest.mark.parametrize(
    "name",
    ["discrete_gaussian", "gaussian", "clip_rows"],
)
def test_long_kernel_runs_while_python_keeps_going(name: str) -> None:
    rng = confide.SecureRng(bytes(32))
    m = np.ones((64, 1_000_000), dtype=np.float32)
    kernels: dict[str, Callable[[], object]] = {
        "discrete_gaussian": lambda: confide.discrete_gaussian(2_000_000, 1e4, rng=rng),
        "gaussian": lambda: [confide.gaussian(4_000_000, 1.0, rng=rng) for _ in range(4)],
        "clip_rows": lambda: [confide.clip_rows(m, 0.5) for _ in range(6)],
    }
    total, largest_step, n = _observe(kernels[name])
    assert total > 0.05, f"kernel too short to observe ({total:.3f} s CPU)"
    # Tolerance: the main thread may be descheduled briefly by the OS on a busy machine, but
    # not for half of the kernel's CPU time; a held GIL gives largest_step ~= total.
    assert largest_step < 0.5 * total, (total, largest_step, n)


def test_the_probe_detects_a_held_gil() -> None:
    # Control: sorting a list of floats runs in C *holding* the GIL, and the probe sees it.
    data = [((i * 2654435761) % 1000003) / 7.0 for i in range(2_000_000)]
    total, largest_step, _ = _observe(lambda: sorted(data))
    assert largest_step >= 0.5 * total
