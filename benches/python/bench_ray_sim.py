"""Large simulated federations: confide on Ray vs Flower's simulation engine (issue 16).

confide: ``confide_server.simulate_ray.run_ray_simulation`` (a real confide-server, virtual
clients that are the real ``confide.Client`` in Ray actors, real HTTP), breast-cancer MLP,
cohort 100 per round, plain FedAvg and SecAgg+ with 10 % dropout per stage. Flower:
``flwr.simulation.run_simulation`` with the same MLP in numpy, the same sites, cohort and
rounds (``--flower-python`` names the peers environment's interpreter; this script re-runs
itself there with ``--flower-worker``).

Reported per configuration: wall time per round (confide: the server's round timestamps;
Flower: the wall time of the run less its start-up, per round), and the peak RSS of the whole
process tree (driver, server, Ray's processes and actors), sampled every 0.2 s. confide's arms
also report each round's stage durations (``stages_s``, from the server's
``metrics/stages.jsonl``: a stage lasts from the previous stage's close, or the round's
start, to its own close), the CPU seconds the process tree used during the arm (``cpu_s``,
split into ``server``, ``actors`` and ``other``: raylet, GCS, this driver) and the ratios
to the plain arm of the same run (``ratio_to_plain``, over all rounds and rounds 2-3).

    PYTHONPATH=python:server .venv/bin/python benches/python/bench_ray_sim.py \\
        --clients 100 1000 --rounds 3 --json benches/results/ray-sim.json \\
        --flower-python .venv-peers/bin/python
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

MIB = 1024.0 * 1024.0


def _tree(root: int) -> list[int]:
    """``root`` and all its descendants (Linux ``/proc``)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, []))
    return out


def _pid_rss(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def _pid_cpu_ticks(pid: int) -> int | None:
    """User + system CPU time of ``pid`` in clock ticks (``/proc/PID/stat``), or ``None``."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return int(fields[11]) + int(fields[12])
    except (OSError, ValueError, IndexError):
        return None


def _pid_role(pid: int) -> str:
    """``server`` (confide-server), ``actors`` (Ray workers) or ``other`` (raylet, GCS...)."""
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
    except OSError:
        return "other"
    if b"confide_server" in cmd:
        return "server"
    if cmd.startswith(b"ray::"):
        return "actors"
    return "other"


def _pid_fds(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return 0


class PeakRss:
    """Sample this process tree in a thread: ``peak`` RSS in bytes, ``peak_fds`` open files
    (all processes together) and ``peak_fds_one`` (the most any one process held)."""

    def __init__(self, interval: float = 0.2) -> None:
        self.peak = 0
        self.peak_fds = 0
        self.peak_fds_one = 0
        # CPU ticks per process: at the start (processes already running) and last seen.
        self._cpu_base: dict[int, int] = {}
        self._cpu_last: dict[int, int] = {}
        self._role: dict[int, str] = {}
        #: The 1-minute load average, once a second (the machine is shared).
        self.load_1m: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(interval,), daemon=True)
        for pid in _tree(os.getpid()):
            ticks = _pid_cpu_ticks(pid)
            if ticks is not None:
                self._cpu_base[pid] = ticks

    def cpu_s(self) -> dict[str, float]:
        """CPU seconds the tree used since the start, by role (``total`` included).

        A process is counted up to its last sample (0.2 s apart), so one that exits
        between two samples loses at most that slice.
        """
        hz = os.sysconf("SC_CLK_TCK")
        out = {"server": 0.0, "actors": 0.0, "other": 0.0}
        for pid, last in self._cpu_last.items():
            out[self._role.get(pid, "other")] += (last - self._cpu_base.get(pid, 0)) / hz
        out["total"] = sum(out.values())
        return {k: round(v, 2) for k, v in out.items()}

    def _cpu_sample(self, pids: list[int]) -> None:
        for pid in pids:
            ticks = _pid_cpu_ticks(pid)
            if ticks is None:
                continue
            if self._role.get(pid, "other") == "other":  # a Ray worker renames itself late
                self._role[pid] = _pid_role(pid)
            self._cpu_last[pid] = ticks

    def _run(self, interval: float) -> None:
        tick = 0
        while not self._stop.is_set():
            pids = _tree(os.getpid())
            self.peak = max(self.peak, sum(_pid_rss(pid) for pid in pids))
            self._cpu_sample(pids)
            if tick % 5 == 0:  # listing 10,000 descriptors costs: once a second
                self.load_1m.append(os.getloadavg()[0])
                fds = [_pid_fds(pid) for pid in pids]
                self.peak_fds = max(self.peak_fds, sum(fds))
                self.peak_fds_one = max(self.peak_fds_one, max(fds, default=0))
            tick += 1
            self._stop.wait(interval)

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def run_confide(
    clients: int,
    cohort: int,
    rounds: int,
    secure: bool,
    cpus: int,
    dropout: float = 0.1,
    grace: float = 0.0,
    deadline: float = 30.0,
    grace_factor: float = 0.0,
    grace_floor: float = 0.5,
) -> dict[str, Any]:
    import confide_server.simulate_ray as sim_ray
    from confide_server.launcher import Launcher
    from confide_server.simulate import SimulationOptions
    from confide_server.simulate_ray import FaultOptions, RayOptions, run_ray_simulation

    class _PatientLauncher(Launcher):
        """The bench's launcher: on a shared box under load (load average 20-30) the
        server's start-up (imports, state checks) can take longer than the 60 s the
        simulation waits, so the bench waits up to 240 s (nothing else changes)."""

        def wait_ready(self, url: str, *, timeout: float = 30.0, proc: Any = None) -> bool:
            return super().wait_ready(url, timeout=max(timeout, 240.0), proc=proc)

    sim_ray.Launcher = _PatientLauncher  # type: ignore[misc]

    opts = SimulationOptions(
        clients=clients,
        rounds=rounds,
        model="mlp",
        hidden=(16,),
        secagg=secure,
        dp="none",
        train_deadline=deadline,
        evaluate_deadline=deadline,
        extra_secagg=(
            # Generous deadlines: at load average 30 on 2 cores, 100 sites' share uploads
            # took more than 15 s; a dropout run with grace 0 waits out all four (240 s).
            {"advertise": 60.0, "share": 60.0, "mask": 60.0, "unmask": 60.0}
            | {"stage_grace_s": grace}
            | (
                {"stage_grace_factor": grace_factor, "stage_grace_floor_s": grace_floor}
                if grace_factor
                else {}
            )
            if secure
            else {}
        ),
    )
    faults = FaultOptions(dropout=dropout if secure else 0.0)
    with tempfile.TemporaryDirectory() as tmp, PeakRss() as peak:
        for _attempt in range(2):  # a loaded machine may start the server past its wait
            t0 = time.monotonic()
            report = run_ray_simulation(
                Path(tmp) / "sim",
                opts,
                RayOptions(num_cpus=cpus, cohort=cohort),
                faults,
                timeout=600.0 + 120.0 * rounds,
                quiet=True,
            )
            wall = time.monotonic() - t0
            if not any(e.startswith("server did not start") for e in report.errors):
                break
        state = _disk_use(Path(tmp) / "sim" / "clients")
        server_state = _disk_use(Path(tmp) / "sim" / "state")
        stages = _stage_seconds(
            Path(tmp) / "sim" / "state" / "metrics" / "stages.jsonl",
            [] if report.status is None else report.status["rounds"],
        )
    mem = report.memory()
    per_round = report.rounds_s
    return {
        "engine": "confide-ray",
        "clients": clients,
        "cohort": cohort,
        "rounds": rounds,
        "mode": _mode_name(secure, dropout, grace, grace_factor, grace_floor),
        "ok": report.rc == 0,
        "committed": len(report.committed),
        "updates_per_round": [(r["metrics"] or {}).get("train_clients") for r in report.committed],
        "s_per_round": sum(per_round) / len(per_round) if per_round else None,
        "rounds_s": per_round,
        "r23_s": round(sum(per_round[1:3]) / 2, 3) if len(per_round) >= 3 else None,
        "stages_s": stages,
        "cpu_s": peak.cpu_s(),
        "load_1m_range": [round(min(peak.load_1m), 2), round(max(peak.load_1m), 2)]
        if peak.load_1m
        else None,
        "wall_s": wall,
        "peak_rss_mib": peak.peak / MIB,
        "per_client_mib": mem["per_client_mib"],
        "actors_peak_mib": mem["actors_peak_mib"],
        "server_peak_mib": mem["server_peak_mib"],
        "idle_per_client_mib": mem["idle_per_client_mib"],
        "max_materialised": mem["max_materialised"],
        "materialised_per_client_mib": mem["materialised_per_client_mib"],
        "peak_fds": peak.peak_fds,
        "peak_fds_one_process": peak.peak_fds_one,
        "setup_s": report.setup_s,
        "to_first_round_s": report.to_first_round_s,
        "client_state_kib_per_client": state / 1024.0 / clients,
        "server_state_mib": server_state / MIB,
        "errors": report.errors[:3],
    }


def _mode_name(secure: bool, dropout: float, grace: float, factor: float, floor: float) -> str:
    if not secure:
        return "plain"
    name = f"secagg+ {dropout:.0%} dropout"
    if grace:
        name += f", grace {grace:g} s"
    if factor:
        name += f", adaptive grace factor {factor:g} floor {floor:g} s"
    return name


def _stage_seconds(path: Path, rounds: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Per committed round, each stage's seconds (from the previous close or the start)."""
    closes: dict[int, list[tuple[float, str]]] = {}
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return {}
    for line in lines:
        try:
            doc = json.loads(line)
            closes.setdefault(int(doc["round"]), []).append(
                (float(doc["closed_at"]), str(doc["stage"]))
            )
        except (ValueError, KeyError, TypeError):
            continue
    out: dict[str, dict[str, float]] = {}
    for r in rounds:
        if r.get("status") != "committed" or not r.get("started_at"):
            continue
        prev = float(r["started_at"])
        row: dict[str, float] = {}
        for at, stage in sorted(closes.get(int(r["round"]), [])):
            if stage not in row:  # the first close of each stage
                row[stage] = round(at - prev, 3)
                prev = at
        out[str(r["round"])] = row
    return out


def flower_worker(
    clients: int, cohort: int, rounds: int, cpus: int, data: str, secure: bool = False
) -> dict[str, Any]:
    """Run in the peers environment: Flower's simulation engine on the same task.

    ``secure``: Flower's SecAgg+ (``SecAggPlusWorkflow`` in the ``ServerApp``'s
    ``DefaultWorkflow``, ``secaggplus_mod`` on the ``ClientApp``) with confide's parameters
    for a cohort of 100 (32 shares, reconstruction threshold 22, clipping range 1, max weight
    1000); the sum of the quantized updates is what the server sees, as in confide.
    ``data``: an ``.npz`` with the breast-cancer table (``x``, ``y``), written by the driver
    from ``confide.data.load_breast_cancer`` (the peers environment has no scikit-learn).
    """
    import numpy as np
    from flwr.client import ClientApp, NumPyClient
    from flwr.client.mod import secaggplus_mod
    from flwr.common import Context, ndarrays_to_parameters
    from flwr.server import (
        Grid,
        LegacyContext,
        ServerApp,
        ServerAppComponents,
        ServerConfig,
    )
    from flwr.server.strategy import FedAvg
    from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow
    from flwr.simulation import run_simulation

    with np.load(data) as table:
        x, y = table["x"].astype(np.float64), table["y"].astype(np.int64)
    x = ((x - x.mean(0)) / x.std(0)).astype(np.float32)
    rng = np.random.default_rng(0)
    rows = [rng.integers(0, len(x), size=max(4, len(x) // clients)) for _ in range(clients)]
    w_init = [
        (rng.standard_normal((30, 16)) * 0.1).astype(np.float32),
        np.zeros(16, np.float32),
        (rng.standard_normal((16, 2)) * 0.1).astype(np.float32),
        np.zeros(2, np.float32),
    ]

    def sgd(w: list[Any], xs: Any, ys: Any, lr: float = 0.1, bs: int = 16) -> list[Any]:
        w = [a.copy() for a in w]
        for i in range(0, len(xs), bs):
            xb, yb = xs[i : i + bs], ys[i : i + bs]
            h = np.tanh(xb @ w[0] + w[1])
            z = h @ w[2] + w[3]
            p = np.exp(z - z.max(1, keepdims=True))
            p /= p.sum(1, keepdims=True)
            p[np.arange(len(yb)), yb] -= 1.0
            p /= len(yb)
            dh = (p @ w[2].T) * (1 - h * h)
            grads = [xb.T @ dh, dh.sum(0), h.T @ p, p.sum(0)]
            w = [a - lr * g for a, g in zip(w, grads, strict=True)]
        return w

    class Site(NumPyClient):  # type: ignore[misc]
        def __init__(self, k: int) -> None:
            self.x, self.y = x[rows[k]], y[rows[k]]

        def fit(self, parameters: Any, config: Any) -> Any:
            return sgd(parameters, self.x, self.y), len(self.y), {}

        def evaluate(self, parameters: Any, config: Any) -> Any:
            return 0.0, len(self.y), {}

    def client_fn(context: Context) -> Any:
        return Site(int(context.node_config["partition-id"])).to_client()

    frac = cohort / clients

    def strategy() -> Any:
        return FedAvg(
            fraction_fit=frac,
            fraction_evaluate=frac,
            min_fit_clients=cohort,
            min_evaluate_clients=cohort,
            min_available_clients=clients,
            initial_parameters=ndarrays_to_parameters(w_init),
        )

    def server_fn(context: Context) -> Any:
        return ServerAppComponents(strategy=strategy(), config=ServerConfig(num_rounds=rounds))

    if secure:
        server_app = ServerApp()

        @server_app.main()  # type: ignore[misc]
        def _main(grid: Grid, context: Context) -> None:
            legacy = LegacyContext(
                context=context, config=ServerConfig(num_rounds=rounds), strategy=strategy()
            )
            fit = SecAggPlusWorkflow(
                num_shares=min(32, cohort - 1),
                reconstruction_threshold=min(22, cohort - 1),
                clipping_range=1.0,
                max_weight=1000.0,
            )
            DefaultWorkflow(fit_workflow=fit)(grid, legacy)

        client_app = ClientApp(client_fn=client_fn, mods=[secaggplus_mod])
    else:
        server_app = ServerApp(server_fn=server_fn)
        client_app = ClientApp(client_fn=client_fn)

    import logging
    import re

    said: list[str] = []

    class _Grab(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            said.append(record.getMessage())

    logging.getLogger("flwr").addHandler(_Grab())
    with PeakRss() as peak:
        t0 = time.monotonic()
        run_simulation(
            server_app=server_app,
            client_app=client_app,
            num_supernodes=clients,
            backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}},
        )
        wall = time.monotonic() - t0
    import flwr

    m = [g for line in said for g in re.findall(r"Run finished \d+ round\(s\) in ([0-9.]+)s", line)]
    return {
        "engine": f"flower-sim {flwr.__version__}",
        "clients": clients,
        "cohort": cohort,
        "rounds": rounds,
        "mode": "secagg+ no dropout" if secure else "plain",
        "ok": bool(m),
        # Flower's own "Run finished N round(s) in X s" (its rounds, without Ray's start-up).
        "s_per_round": (float(m[0]) if m else wall) / rounds,
        "wall_s": wall,
        "peak_rss_mib": peak.peak / MIB,
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--clients", type=int, nargs="+", default=[100, 1000])
    p.add_argument("--cohort", type=int, default=100)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--cpus", type=int, default=2)
    p.add_argument(
        "--modes",
        nargs="*",
        choices=["plain", "secagg", "secagg-nodrop", "secagg-grace", "secagg-adaptive"],
        default=["plain", "secagg-nodrop", "secagg-grace"],
        help="secagg: 10 %% dropout per stage; secagg-grace: the same with "
        "[secagg] stage_grace_s (--grace); secagg-adaptive: the same with the adaptive "
        "grace (--grace-factor, --grace-floor; no fixed grace); secagg-nodrop: SecAgg+ "
        "without dropouts",
    )
    p.add_argument("--grace", type=float, default=5.0, help="stage_grace_s of secagg-grace")
    p.add_argument(
        "--grace-factor",
        type=float,
        default=0.5,
        help="stage_grace_factor of secagg-adaptive",
    )
    p.add_argument(
        "--grace-floor",
        type=float,
        default=0.25,
        help="stage_grace_floor_s of secagg-adaptive (s)",
    )
    p.add_argument(
        "--deadline", type=float, default=30.0, help="confide's train and evaluate deadlines (s)"
    )
    p.add_argument(
        "--worker-niceness",
        type=int,
        default=None,
        help="Ray's worker_niceness for confide's actors (Ray's default: 15, which on a "
        "machine shared with other jobs starves them; Flower's arm keeps Ray's default)",
    )
    p.add_argument(
        "--flower-modes",
        nargs="*",
        choices=["plain", "secagg"],
        default=["plain", "secagg"],
        help="Flower arms (secagg: its SecAggPlusWorkflow, no dropouts)",
    )
    p.add_argument("--flower-secure", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--json", default=None)
    p.add_argument("--flower-python", default=None, help="the peers venv's python (flwr)")
    p.add_argument("--flower-worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--flower-data", default="", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.flower_worker:
        out = flower_worker(
            a.clients[0], a.cohort, a.rounds, a.cpus, a.flower_data, a.flower_secure
        )
        print("RESULT " + json.dumps(out), flush=True)
        return 0
    with tempfile.TemporaryDirectory(prefix="bench-ray-sim-") as scratch:
        return _run_arms(a, _write_table(Path(scratch)) if a.flower_python else "")


def _run_arms(a: argparse.Namespace, data: str) -> int:
    """Run the Flower and confide arms ``a`` asks for (``data``: the Flower worker's table)."""
    rows: list[dict[str, Any]] = []
    if a.modes:
        _start_ray(
            a.cpus, a.worker_niceness
        )  # once for every confide arm (Ray's start-up is not a round)
    for n in a.clients:
        cohort = min(a.cohort, n)
        for fmode in a.flower_modes if a.flower_python else []:
            cmd = [a.flower_python, __file__, "--flower-worker", "--clients", str(n)]
            cmd += ["--cohort", str(cohort), "--rounds", str(a.rounds), "--cpus", str(a.cpus)]
            cmd += ["--flower-data", data]
            cmd += ["--flower-secure"] if fmode == "secagg" else []
            try:
                proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
                out, err = proc.stdout, proc.stderr
            except subprocess.TimeoutExpired as exc:
                out, err = str(exc.stdout or ""), f"timed out after {exc.timeout} s"
            found = [ln for ln in out.splitlines() if ln.startswith("RESULT ")]
            if found:
                rows.append(json.loads(found[-1][7:]))
            else:
                tail = (err or out)[-400:]
                rows.append(
                    {
                        "engine": "flower-sim",
                        "clients": n,
                        "mode": fmode,
                        "ok": False,
                        "error": tail,
                    }
                )
            print(json.dumps(rows[-1]), flush=True)
            _save(a.json, rows)
        plain: dict[str, Any] | None = None
        for mode in a.modes:
            secure = mode.startswith("secagg")
            drop = 0.1 if mode in ("secagg", "secagg-grace", "secagg-adaptive") else 0.0
            grace = a.grace if mode == "secagg-grace" else 0.0
            factor = a.grace_factor if mode == "secagg-adaptive" else 0.0
            row = run_confide(
                n, cohort, a.rounds, secure, a.cpus, drop, grace, a.deadline, factor, a.grace_floor
            )
            row |= {"arm": mode, "worker_niceness": a.worker_niceness, "deadline_s": a.deadline}
            if mode == "plain":
                plain = row
            elif plain is not None:
                row["ratio_to_plain"] = _ratios(row, plain)
            rows.append(row)
            print(json.dumps(rows[-1]), flush=True)
            _save(a.json, rows)
    for row in rows:
        if row.get("engine") == "confide-ray":
            print(_summary(row), flush=True)
    return 0


def _ratios(row: dict[str, Any], plain: dict[str, Any]) -> dict[str, float | None]:
    """This arm's seconds per round over the plain arm's (all rounds, rounds 2-3)."""

    def ratio(key: str) -> float | None:
        a, b = row.get(key), plain.get(key)
        return round(a / b, 2) if a and b else None

    return {"all_rounds": ratio("s_per_round"), "rounds_2_3": ratio("r23_s")}


def _summary(row: dict[str, Any]) -> str:
    """One line per arm: s/round, rounds, r2-3, ratios, CPU, stage means over rounds 2-3."""
    rounds = " / ".join(f"{x:.2f}" for x in row["rounds_s"])
    later = [v for k, v in row.get("stages_s", {}).items() if k != "1"]
    names = list(dict.fromkeys(st for r in later for st in r))
    stages = ", ".join(
        f"{st} {sum(r.get(st, 0.0) for r in later) / len(later):.2f}" for st in names
    )
    ratio = row.get("ratio_to_plain") or {}
    spr = row["s_per_round"]
    return (
        f"{row['clients']}/{row['cohort']} {row['mode']}: "
        f"{spr if spr is None else round(spr, 2)} s/round ({rounds}), r2-3 {row['r23_s']}, "
        f"ratio {ratio.get('all_rounds')} / {ratio.get('rounds_2_3')}, "
        f"updates {row['updates_per_round']}, cpu_s {row['cpu_s']}, "
        f"stages r2+ [{stages}], load 1 min {row['load_1m_range']}"
    )


def _disk_use(folder: Path) -> int:
    """Bytes of the files under ``folder`` (0 when it is missing)."""
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def _write_table(folder: Path) -> str:
    """Write the breast-cancer table for the Flower worker; return the ``.npz`` path."""
    import numpy as np

    from confide.data import load_breast_cancer

    table = load_breast_cancer()
    path = folder / "breast-cancer.npz"
    np.savez(path, x=table.x, y=table.y)
    return str(path)


def _start_ray(cpus: int, niceness: int | None = None) -> None:
    """Start the local Ray the confide arms share, retrying a start that timed out (load)."""
    import ray

    system = {} if niceness is None else {"worker_niceness": niceness}
    for attempt in range(3):
        try:
            ray.init(
                num_cpus=cpus,
                include_dashboard=False,
                log_to_driver=False,
                _system_config=system or None,
            )
            return
        except Exception:  # "The current node timed out during startup" on a loaded box
            if attempt == 2:
                raise
            ray.shutdown()


def _save(path: str | None, rows: list[dict[str, Any]]) -> None:
    """Write the rows so far (a long run keeps what it measured if stopped)."""
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    sys.exit(main())
