"""Real ``confide`` / ``confide-server`` processes for the CLI tests: exit codes and text.

Every child is started through :class:`confide_server.launcher.Launcher` or
:func:`subprocess.run` with a generous timeout and reaped at teardown; waits are on output
or on the server's status endpoint, never on sleeps.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from confide_server.launcher import Launcher, free_port
from confide_server.simulate import JobFiles, SimulationOptions, prepare_job

REPO = Path(__file__).resolve().parents[2]
CONFIDE = [sys.executable, "-m", "confide"]
SERVER = [sys.executable, "-m", "confide_server"]
#: Seconds a command may take on a loaded 2-core machine (a deadline, not a threshold).
DEADLINE = 120.0


@dataclass(frozen=True)
class Result:
    """A finished command: exit status and its two streams."""

    rc: int
    out: str
    err: str

    def short_error(self) -> str:
        """Stderr, checked to be one or two lines without a traceback."""
        lines = self.err.strip().splitlines()
        assert "Traceback" not in self.err, self.err
        assert 1 <= len(lines) <= 2, self.err
        return self.err


def run(cmd: list[str], cwd: Path | None = None, timeout: float = DEADLINE) -> Result:
    """Run a command to completion (no shell) and capture its output."""
    p = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, check=False)
    return Result(p.returncode, p.stdout, p.stderr)


def job_files(tmp: Path, **kw: object) -> JobFiles:
    """A small table job on a free port that keeps serving (no SecAgg, no DP)."""
    opts = SimulationOptions(clients=3, rounds=50, port=free_port(), exit_when_finished=False, **kw)  # type: ignore[arg-type]
    return prepare_job(tmp, opts)


@pytest.fixture
def launcher(tmp_path: Path) -> Iterator[Launcher]:
    """Starts children with logs under ``tmp_path/logs``; kills what is left at teardown."""
    la = Launcher(tmp_path / "logs", cwd=REPO)
    try:
        yield la
    finally:
        la.kill_all()


def start_server(launcher: Launcher, files: JobFiles, name: str = "server") -> None:
    """Start ``confide-server run`` and wait until it answers on its status endpoint."""
    scheme = "https" if "[tls]" in files.config.read_text() else "http"
    proc = launcher.spawn(name, [*SERVER, "run", "--config", str(files.config)])
    if scheme == "http":
        ready = launcher.wait_ready(files.server_url + "/v1/health", timeout=DEADLINE, proc=proc)
        assert ready, launcher.tail(name)
    else:
        # No CA in the poller: wait for the server's own "job ... on https://" line.
        wait_for_line(launcher, name, "on https://")


def wait_for_line(launcher: Launcher, name: str, text: str, timeout: float = DEADLINE) -> None:
    """Wait (polling the child's log, deadline ``timeout``) until it prints ``text``."""
    import time

    end = time.monotonic() + timeout
    while text not in launcher.log(name):
        assert time.monotonic() < end, launcher.log(name)
        time.sleep(0.05)


def tokens(files: JobFiles, n: int = 1) -> list[str]:
    """Fresh enrolment tokens from ``confide-server enroll``."""
    r = run([*SERVER, "enroll", "--config", str(files.config), "-n", str(n)])
    assert r.rc == 0, r.err
    return r.out.split()


def add_tls(files: JobFiles) -> Path:
    """Give the job a self-signed TLS certificate (127.0.0.1); return the CA file."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "confide-test")])
    now = dt.datetime.now(dt.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    pem = files.workdir / "server.pem"
    pem.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (files.workdir / "server.key").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    with files.config.open("a") as fh:
        fh.write('\n[tls]\ncert = "server.pem"\nkey = "server.key"\n')
    return pem
