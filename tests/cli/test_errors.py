"""Every user mistake gets one or two lines on stderr and a non-zero exit, never a traceback.

Each test runs the real command in a subprocess and checks its exit status and its message
(what went wrong, naming the file, column, option or URL, and what to do).
"""

from __future__ import annotations

import signal
import socket
import subprocess
from pathlib import Path

import pytest

from confide_server.launcher import Launcher
from tests.cli.conftest import (
    CONFIDE,
    DEADLINE,
    SERVER,
    add_tls,
    job_files,
    run,
    start_server,
    tokens,
    wait_for_line,
)


def _client(files_url: str, data: Path, *extra: str) -> list[str]:
    return [*CONFIDE, "client", "--server", files_url, "--data", str(data), *extra]


def test_port_in_use(tmp_path: Path) -> None:
    files = job_files(tmp_path)
    port = int(files.server_url.rsplit(":", 1)[1])
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", port))
        busy.listen()
        r = run([*SERVER, "run", "--config", str(files.config)])
    assert r.rc == 2
    assert f"port {port} on 127.0.0.1 is already in use" in r.short_error()
    assert "[server] port" in r.err


def test_missing_model_file(tmp_path: Path) -> None:
    files = job_files(tmp_path)
    (files.workdir / "init.safetensors").unlink()
    r = run([*SERVER, "run", "--config", str(files.config)])
    assert r.rc == 2
    assert "init.safetensors" in r.short_error()
    assert "No such file" in r.err


def test_simulate_two_clients_shows_the_config_error(tmp_path: Path) -> None:
    r = run([*SERVER, "simulate", "--clients", "2", "--rounds", "1", "--out", str(tmp_path / "s")])
    assert r.rc == 2
    err = r.short_error()
    assert err.startswith("confide-server simulate: [secagg] is infeasible for a cohort of 2")
    assert "--no-secagg" in err


def test_simulate_refuses_a_non_empty_folder_it_did_not_create(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    r = run([*SERVER, "simulate", "--out", str(tmp_path)])
    assert r.rc == 2
    assert "not empty and was not written by confide-server simulate" in r.short_error()
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_missing_ca_file(tmp_path: Path) -> None:
    data = tmp_path / "d.csv"
    data.write_text("x,label\n1,0\n")
    r = run(_client("https://127.0.0.1:9", data, "--ca-file", str(tmp_path / "ca.pem")))
    assert r.rc == 2
    err = r.short_error()
    assert f"--ca-file {tmp_path / 'ca.pem'}: no such file" in err
    assert "CA certificate (PEM)" in err


def test_non_pem_ca_file(tmp_path: Path) -> None:
    data = tmp_path / "d.csv"
    data.write_text("x,label\n1,0\n")
    ca = tmp_path / "ca.der"
    ca.write_bytes(b"\x30\x82\x01\x0a not pem")
    r = run(_client("https://127.0.0.1:9", data, "--ca-file", str(ca)))
    assert r.rc == 2
    assert "not a PEM certificate" in r.short_error()
    assert "openssl x509 -inform der" in r.err


def test_missing_data_file(tmp_path: Path) -> None:
    r = run(_client("http://127.0.0.1:9", tmp_path / "train.csv"))
    assert r.rc == 2
    assert f"--data {tmp_path / 'train.csv'}: no such file" in r.short_error()


def test_non_numeric_column_is_named_and_patient_id_column_suggested(
    tmp_path: Path, launcher: Launcher
) -> None:
    files = job_files(tmp_path)
    start_server(launcher, files)
    header = files.site_train[0].read_text().splitlines()[0]
    data = tmp_path / "site.csv"
    values = ["0.5"] * header.count(",") + ["1"]  # the features, then the label
    data.write_text(f"mrn,{header}\nA-17,{','.join(values)}\n")
    r = run(_client(files.server_url, data, "--token", "t", "--client-id", "h1"))
    assert r.rc == 2
    err = r.short_error()
    assert "column 'mrn' holds 'A-17', not a number" in err
    assert "--patient-id-column mrn" in err


def test_wrong_token_says_to_ask_the_operator(tmp_path: Path, launcher: Launcher) -> None:
    files = job_files(tmp_path)
    start_server(launcher, files)
    state = tmp_path / "site"
    cmd = _client(files.server_url, files.site_train[0], "--token", "nope", "--client-id", "h1")
    r = run([*cmd, "--state", str(state)])
    assert r.rc == 2
    err = r.short_error()
    assert "refused the enrolment token" in err
    assert "confide-server enroll" in err
    assert not (state / "client.json").exists()


def test_https_against_a_plain_server_fails_fast(tmp_path: Path, launcher: Launcher) -> None:
    files = job_files(tmp_path)
    start_server(launcher, files)
    url = files.server_url.replace("http://", "https://")
    r = run(_client(url, files.site_train[0], "--retry-timeout", "600"), timeout=60)
    assert r.rc == 2
    assert f"{url} answers plain HTTP, not TLS" in r.short_error()
    assert f"--server {files.server_url}" in r.err


def test_http_against_a_tls_server_fails_fast(tmp_path: Path, launcher: Launcher) -> None:
    files = job_files(tmp_path)
    add_tls(files)
    start_server(launcher, files)
    r = run(_client(files.server_url, files.site_train[0], "--retry-timeout", "600"), timeout=60)
    assert r.rc == 2
    err = r.short_error()
    assert f"{files.server_url} does not answer plain HTTP" in err
    assert "--server https://127.0.0.1:" in err


def test_status_into_a_closed_pipe_is_quiet(tmp_path: Path, launcher: Launcher) -> None:
    files = job_files(tmp_path)
    start_server(launcher, files)
    p = subprocess.Popen(
        [*SERVER, "status", "--config", str(files.config)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert p.stdout is not None
    assert p.stderr is not None
    p.stdout.close()  # the reader is gone before the first line is written (like `| head`)
    with p.stderr:
        err = p.stderr.read().decode()
    assert p.wait(DEADLINE) == 1
    assert err == ""


def test_ctrl_c_on_serve_records_a_clean_stop(tmp_path: Path, launcher: Launcher) -> None:
    files = job_files(tmp_path)
    start_server(launcher, files)
    server = launcher.children[0]
    server.send_signal(signal.SIGINT)
    assert server.wait(DEADLINE) == 130
    log = launcher.log("server")
    assert "Traceback" not in log
    assert "stopped cleanly" in log
    r = run([*SERVER, "status", "--config", str(files.config)])
    assert r.rc == 0
    assert ": stopped, 0/50 rounds" in r.out
    # Run again: the job resumes and says running.
    start_server(launcher, files, name="server-again")
    assert ": running," in run([*SERVER, "status", "--config", str(files.config)]).out


def test_ctrl_c_on_client(tmp_path: Path, launcher: Launcher) -> None:
    files = job_files(tmp_path)
    start_server(launcher, files)
    (token,) = tokens(files)
    cmd = _client(files.server_url, files.site_train[0], "--token", token, "--client-id", "h1")
    client = launcher.spawn("client", [*cmd, "--state", str(tmp_path / "site")])
    wait_for_line(launcher, "client", "h1: enrolled")
    client.send_signal(signal.SIGINT)
    assert client.wait(DEADLINE) == 130
    log = launcher.log("client")
    assert "Traceback" not in log
    assert log.strip().splitlines()[-1] == "confide client: interrupted"


def test_ctrl_c_on_simulate(tmp_path: Path, launcher: Launcher) -> None:
    sim = launcher.spawn(
        "simulate",
        [*SERVER, "simulate", "--rounds", "500", "--dp", "none", "--out", str(tmp_path / "s")],
    )
    wait_for_line(launcher, "simulate", "eps(total)")
    sim.send_signal(signal.SIGINT)
    assert sim.wait(DEADLINE) == 130
    log = launcher.log("simulate")
    assert "Traceback" not in log
    assert log.strip().splitlines()[-1] == "confide-server simulate: interrupted"
    # Every process simulate started is gone: the server no longer answers.
    port = int(
        next(line for line in log.splitlines() if "server http://" in line).rsplit(":", 1)[1]
    )
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", port)) != 0


def test_a_server_that_is_not_running_is_said_before_retrying(tmp_path: Path) -> None:
    data = tmp_path / "d.csv"
    data.write_text("x,label\n1,0\n")
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    r = run(_client(f"http://127.0.0.1:{port}", data, "--retry-timeout", "1"))
    assert r.rc == 2
    assert (
        f"http://127.0.0.1:{port} cannot be reached yet (connection refused: is confide-server "
        "running on that port?); retrying for up to 1 s (--retry-timeout)"
    ) in r.out
    assert "server unreachable for 1.0 s" in r.short_error()


def test_simulate_with_a_missing_csv(tmp_path: Path) -> None:
    r = run([*SERVER, "simulate", "--data", str(tmp_path / "my.csv"), "--out", str(tmp_path / "s")])
    assert r.rc == 2
    assert f"--data {tmp_path / 'my.csv'}: no such file" in r.short_error()


def test_both_commands_report_an_oserror_without_a_file_the_same_way(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # A disk that fills while a command runs raises an OSError that names no file: both
    # CLIs print the one line of confide.cli.describe_error and exit 2, never a traceback.
    import confide_server.cli as server_cli
    import confide_server.opscli as opscli
    from confide.cli import describe_error

    full = OSError(28, "No space left on device")

    def disk_full(args: object) -> int:
        raise full

    monkeypatch.setattr(opscli, "_cmd_new_job", disk_full)
    files = job_files(tmp_path)
    assert server_cli.main(["new-job", "--config", str(files.config)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"confide-server new-job: {describe_error(full)}"
    assert err.endswith("OSError: [Errno 28] No space left on device")
