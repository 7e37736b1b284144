"""The torch DP-SGD bench on CUDA: ``bench_torch_dpsgd`` with GPU defaults.

Same model, batch, data and methods as ``benches/python/bench_torch_dpsgd.py`` (plain step,
confide DP step with Rust-core noise generated on the host and moved to the device, Opacus
1.6), on ``cuda``, all host threads, 10 repeats, plus the 300-image round at 64x64 and
``torch.cuda.max_memory_allocated``. Exits 0 with a message when no CUDA device is present.

Run::

    python benches/gpu/bench_gpu.py [--json OUT] [extra bench_torch_dpsgd options]
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "python"))

import bench_torch_dpsgd


def main() -> int:
    import torch

    if not torch.cuda.is_available():
        print("bench_gpu.py: no CUDA device; nothing to run")
        return 0
    defaults = ["--device", "cuda", "--threads", "all", "--repeat", "10", "--no-rss"]
    bench_torch_dpsgd.main(defaults + sys.argv[1:])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
