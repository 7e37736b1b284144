"""``simulate --backend ray`` on a two-node Ray cluster, built on this machine.

Two Linux network namespaces joined by a veth pair are the two hosts (``10.77.0.1`` the
head, ``10.77.0.2`` the worker): each Ray node has its own address, its own ``--temp-dir``
and its own PID namespace, and the nodes reach each other only over the veth link. The
commands are docs/simulation.md's "A two-node cluster", with these addresses: ``ray start
--head`` in the head namespace, ``ray start --address=10.77.0.1:6379`` in the worker's, then
``confide-server simulate --backend ray --ray-address 10.77.0.1:6379 --ray-server-host
10.77.0.1`` on the head. The rounds must commit, and virtual clients must have run and sent
updates on *both* nodes (the run's per-node report lines).

The namespaces share this machine's file system, as the docs' shared ``--out`` folder
requires. Ray's token authentication is on, with a fresh token for this cluster. Needs root,
``ip`` (iproute2) and ``unshare`` (util-linux): skipped, with the reason, without them or
when the kernel refuses network namespaces (some containers).

No broad ``ray stop`` here: it would end every Ray process on the machine (other test runs'
included). Each node is stopped through its own process (SIGTERM to its ``ray start
--block``, which stops that node's Ray processes), and its PID namespace takes whatever is
left with it.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from confide_server.launcher import Launcher
from confide_server.simulate_ray import RayReport

HEAD_IP = "10.77.0.1"
WORKER_IP = "10.77.0.2"
RAY_PORT = 6379
CLIENTS = 20
ROUNDS = 2
#: CPUs each node declares (Ray's count, not this machine's cores), and actors asked for.
NODE_CPUS = 4
ACTORS = 2
#: Generous: Ray's processes and the actors start slowly on a busy 2-core machine.
START_TIMEOUT = 240.0
BIN = Path(sys.executable).parent


def _missing() -> str | None:
    """Why this machine cannot build the two hosts (``None``: it can try)."""
    if not sys.platform.startswith("linux"):
        return "network namespaces are Linux only"
    if os.geteuid() != 0:
        return "needs root (ip netns, veth pairs)"
    for tool in ("ip", "unshare"):
        if shutil.which(tool) is None:
            return f"needs {tool!r} (iproute2 / util-linux)"
    if not (BIN / "ray").exists():
        return f"no ray command next to {sys.executable} (pip install 'confide[ray]')"
    return None


def _run(cmd: list[str], *, check: bool = True, timeout: float = 120.0) -> str:
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if check and out.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {out.returncode}: {out.stderr.strip()}")
    return out.stdout


@dataclass
class TwoNodes:
    """The cluster: the head's namespace, the environment Ray's commands need, logs."""

    head_ns: str
    worker_ns: str
    env: dict[str, str]
    launcher: Launcher

    def in_ns(self, ns: str, *cmd: str) -> list[str]:
        return ["ip", "netns", "exec", ns, *cmd]

    def active_nodes(self) -> int:
        """Nodes ``ray status`` lists as active (on the head)."""
        out = subprocess.run(
            self.in_ns(self.head_ns, str(BIN / "ray"), "status", f"--address={HEAD_IP}:{RAY_PORT}"),
            capture_output=True,
            text=True,
            env=self.env,
            timeout=120,
        )
        active = out.stdout.split("Active:", 1)[-1].split("Pending:", 1)[0]
        return len(re.findall(r"^\s*\d+ node_[0-9a-f]+", active, flags=re.MULTILINE))


def _or_skip(cmd: list[str], what: str) -> None:
    """Run ``cmd``; skip the tests if it fails (a container without CAP_SYS_ADMIN, say)."""
    try:
        _run(cmd)
    except RuntimeError as exc:
        pytest.skip(f"cannot {what} here: {exc}")


def _add_netns(stack: ExitStack, name: str) -> None:
    _or_skip(["ip", "netns", "add", name], "create a network namespace")
    stack.callback(_run, ["ip", "netns", "delete", name], check=False)


def _stop_node(proc: subprocess.Popen[bytes]) -> None:
    """Stop one node: SIGTERM its ``ray start --block``; SIGKILL its namespace if need be.

    ``proc`` is ``unshare``, whose child (PID 1 of the node's PID namespace) is ``ray start
    --block``: on SIGTERM it stops that node's Ray processes. Killing ``unshare`` kills its
    child (``--kill-child``), and with it every process left in the namespace.
    """
    if proc.poll() is None:
        try:
            children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
        except OSError:
            children = []
        for pid in children:
            os.kill(int(pid), signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TwoNodes]:
    reason = _missing()
    if reason is not None:
        pytest.skip(reason)
    base = tmp_path_factory.mktemp("ray-two-node")
    tag = f"{os.getpid()}"
    head_ns, worker_ns = f"confide-head-{tag}", f"confide-worker-{tag}"
    veth_head, veth_worker = f"cfh{tag}"[:15], f"cfw{tag}"[:15]
    # A fresh Ray token for this cluster, in the environment of every Ray process (the
    # docs: copy the head's token to each node).
    token = base / "ray-auth-token"
    with os.fdopen(os.open(token, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as f:
        f.write(secrets.token_hex(32))
    env = {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN_PATH": str(token),
    }
    launcher = Launcher(base / "logs", env=env)
    with ExitStack() as stack:
        short = Path(tempfile.mkdtemp(prefix="cfray-"))
        stack.callback(shutil.rmtree, short, ignore_errors=True)
        _add_netns(stack, head_ns)
        _add_netns(stack, worker_ns)
        _or_skip(["unshare", "--pid", "--fork", "--mount-proc", "true"], "make a PID namespace")
        # The pair goes away with the namespaces; the links: private addresses, loopback up.
        link = ["ip", "link", "add", veth_head, "type", "veth", "peer", "name", veth_worker]
        _or_skip(link, "create a veth pair")
        stack.callback(_run, ["ip", "link", "delete", veth_head], check=False)  # if not moved
        for ns, dev, ip in ((head_ns, veth_head, HEAD_IP), (worker_ns, veth_worker, WORKER_IP)):
            _run(["ip", "link", "set", dev, "netns", ns])
            _run(["ip", "-n", ns, "addr", "add", f"{ip}/24", "dev", dev])
            _run(["ip", "-n", ns, "link", "set", "lo", "up"])
            _run(["ip", "-n", ns, "link", "set", dev, "up"])
        cluster = TwoNodes(head_ns, worker_ns, env, launcher)
        common = [
            f"--num-cpus={NODE_CPUS}",
            "--disable-usage-stats",
            # Plasma files in /dev/shm, which both namespaces share: keep each store small.
            "--object-store-memory=100000000",
            "--block",
        ]
        nodes = []
        for name, ns, args in (
            (
                "head",
                head_ns,
                [
                    "--head",
                    f"--node-ip-address={HEAD_IP}",
                    f"--port={RAY_PORT}",
                    "--include-dashboard=false",
                ],
            ),
            ("worker", worker_ns, [f"--address={HEAD_IP}:{RAY_PORT}"]),
        ):
            # One --temp-dir per node (they share /tmp), short: Ray's Unix sockets live
            # there, and a socket path has at most 107 bytes.
            temp = short / name
            cmd = ["unshare", "--pid", "--fork", "--mount-proc", "--kill-child"]
            proc = launcher.spawn(
                name,
                cluster.in_ns(
                    ns, *cmd, str(BIN / "ray"), "start", *args, f"--temp-dir={temp}", *common
                ),
            )
            stack.callback(_stop_node, proc)
            nodes.append(proc)
        if not Launcher.wait_for(
            lambda: cluster.active_nodes() == 2, timeout=START_TIMEOUT, proc=nodes[0], interval=1.0
        ):
            raise AssertionError(f"the cluster never showed 2 nodes:\n{launcher.all_logs()}")
        yield cluster


def _simulate(cluster: TwoNodes, out: Path, *job: str) -> tuple[str, dict[str, Any]]:
    """Run the documented ``simulate`` command on the head; return its output and status."""
    server = BIN / "confide-server"
    exe = [str(server)] if server.exists() else [sys.executable, "-m", "confide_server"]
    cmd = cluster.in_ns(
        cluster.head_ns,
        *exe,
        "simulate",
        "--backend",
        "ray",
        f"--ray-address={HEAD_IP}:{RAY_PORT}",
        f"--ray-server-host={HEAD_IP}",
        f"--clients={CLIENTS}",
        f"--rounds={ROUNDS}",
        # Two actors on two 4-CPU nodes: Ray's default placement would put both on the
        # head (the driver's node); the simulator spreads them, one per node.
        f"--ray-num-cpus={ACTORS}",
        *job,
        f"--out={out}",
        "--timeout=400",
    )
    run = subprocess.run(cmd, capture_output=True, text=True, env=cluster.env, timeout=480)
    text = run.stdout + run.stderr
    print(text)  # the run's report (pytest -rP shows it)
    assert run.returncode == 0, f"{text}\n{cluster.launcher.all_logs()}"
    status = json.loads(
        _run([*exe, "status", "--config", str(out / "job.toml"), "--json"], timeout=120)
    )
    return text, status


def _per_node(text: str) -> dict[str, tuple[int, int, int]]:
    """The run's ``node IP: A actors, C virtual clients, U updates sent`` lines."""
    pat = r"^node (\S+): (\d+) actors?, (\d+) virtual clients, (\d+) updates sent$"
    return {m[1]: (int(m[2]), int(m[3]), int(m[4])) for m in re.finditer(pat, text, re.MULTILINE)}


def _check(text: str, status: dict[str, Any]) -> None:
    assert status["status"] == "finished"
    rows = status["rounds"]
    committed = [r for r in rows if r["status"] == "committed"]
    assert len(committed) == ROUNDS, rows
    nodes = _per_node(text)
    # One actor per node, each running half the sites, and both nodes' sites sent updates.
    assert set(nodes) == {HEAD_IP, WORKER_IP}, text
    assert sum(c for _, c, _ in nodes.values()) == CLIENTS
    for ip, (actors, clients, updates) in nodes.items():
        assert actors == 1, (ip, text)
        assert clients == CLIENTS // 2, (ip, text)
        assert updates >= 1, (ip, text)
    assert sum(u for _, _, u in nodes.values()) >= sum(
        r["metrics"]["train_clients"] for r in committed
    )
    for r in committed:
        assert 2 <= r["metrics"]["train_clients"] <= CLIENTS


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_plain_federation_on_two_nodes(two_nodes: TwoNodes, tmp_path: Path) -> None:
    text, status = _simulate(two_nodes, tmp_path / "plain", "--dp=none", "--no-secagg")
    _check(text, status)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_secagg_dp_federation_on_two_nodes(two_nodes: TwoNodes, tmp_path: Path) -> None:
    # SecAgg+ (on by default) with patient-level DP-SGD: each site's masks are shared with
    # sites on the other node, so the sums only unmask if both nodes' sites took part.
    text, status = _simulate(two_nodes, tmp_path / "secagg", "--dp=sample")
    _check(text, status)
    assert all(r["privacy"]["epsilon"] > 0 for r in status["rounds"] if r["privacy"])
    assert status["privacy"]["epsilon"] > 0


def test_report_counts_actors_clients_and_updates_per_node() -> None:
    def actor(node_ip: str, node_id: str, trained: list[int]) -> dict[str, Any]:
        outcomes = [{"client_id": f"c{k}", "trained": t} for k, t in enumerate(trained)]
        mib = 1 << 20
        info = {"clients": len(trained), "rss_base": mib, "rss_peak": 2 * mib, "rss_end": mib}
        return {**info, "outcomes": outcomes, "node_id": node_id, "node_ip": node_ip}

    actors = [
        actor(HEAD_IP, "aa", [2, 2, 1]),
        actor(HEAD_IP, "aa", [2]),
        actor(WORKER_IP, "bb", [0, 2]),
        actor("", "cc", [1]),  # a node Ray no longer lists: named by its id
    ]
    report = RayReport(0, 7, 4, None, 1.0, [], actors, 0, {}, [])
    assert report.nodes() == {
        HEAD_IP: {"actors": 2, "clients": 4, "updates": 7},
        WORKER_IP: {"actors": 1, "clients": 2, "updates": 2},
        "cc": {"actors": 1, "clients": 1, "updates": 1},
    }
    assert _per_node("\n".join(report.lines())) == {
        HEAD_IP: (2, 4, 7),
        WORKER_IP: (1, 2, 2),
        "cc": (1, 1, 1),
    }
