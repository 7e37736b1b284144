"""Lint of ``docker/``: the Dockerfiles and the 3-site compose federation.

Docker is not needed: each Dockerfile is parsed (base images pinned by tag, a non-root
``USER``, no secret in ``ENV``/``ARG``, the server's ``HEALTHCHECK`` on ``/v1/health``,
every ``COPY`` source present in the repository); the compose file is parsed as YAML and
every option its commands pass is checked against that command's real ``--help``; the job
preparation script runs for real. ``docker build`` itself runs only where ``docker`` is
installed (``slow``).
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

from confide.client.policy import SitePolicy
from confide_server.config import load_config
from confide_server.engine.stagelog import secagg_tolerance
from tests.cli.conftest import REPO

DOCKER = REPO / "docker"
DOCKERFILES = ("server.Dockerfile", "site.Dockerfile")
_SECRET = re.compile(r"TOKEN|SECRET|PASSW|PRIVATE|API_?KEY|CREDENTIAL", re.IGNORECASE)


def _instructions(path: Path) -> list[tuple[str, str]]:
    """``(INSTRUCTION, arguments)`` of a Dockerfile, continuation lines joined."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line = pending + line
        pending = ""
        word, _, rest = line.partition(" ")
        out.append((word.upper(), rest.strip()))
    assert not pending, f"{path.name}: a continuation line at the end"
    return out


def _stages(path: Path) -> list[list[tuple[str, str]]]:
    stages: list[list[tuple[str, str]]] = []
    for ins in _instructions(path):
        if ins[0] == "FROM":
            stages.append([])
        assert stages, f"{path.name}: {ins[0]} before FROM"
        stages[-1].append(ins)
    return stages


@pytest.mark.parametrize("name", DOCKERFILES)
def test_base_images_are_pinned_by_tag(name: str) -> None:
    froms = [a for i, a in _instructions(DOCKER / name) if i == "FROM"]
    assert froms
    stage_names = set()
    for args in froms:
        image = args.split()[0]
        if image in stage_names:
            continue
        ref = image.split("@", 1)[0]
        tag = ref.rsplit(":", 1)[1] if ":" in ref.rsplit("/", 1)[-1] else ""
        assert tag, f"{name}: FROM {image} has no tag"
        assert tag != "latest", f"{name}: FROM {image} is not pinned"
        if " AS " in args.upper():
            stage_names.add(args.split()[-1])


@pytest.mark.parametrize("name", DOCKERFILES)
def test_runs_as_a_non_root_user(name: str) -> None:
    final = _stages(DOCKER / name)[-1]
    users = [a for i, a in final if i == "USER"]
    assert users, f"{name}: the final stage sets no USER (it would run as root)"
    assert users[-1].split(":")[0] not in ("root", "0")
    last_user = max(k for k, (i, _) in enumerate(final) if i == "USER")
    for k, (i, _) in enumerate(final):
        if i in ("CMD", "ENTRYPOINT"):
            assert k > last_user, f"{name}: {i} before USER"


@pytest.mark.parametrize("name", DOCKERFILES)
def test_no_secret_in_env_or_arg(name: str) -> None:
    for ins, args in _instructions(DOCKER / name):
        if ins in ("ENV", "ARG"):
            assert not _SECRET.search(args), f"{name}: {ins} {args} looks like a secret"
    text = (DOCKER / name).read_text()
    assert "operator-token" not in text
    assert "ct_" not in text  # no enrolment token baked into an image


def test_server_healthcheck_probes_v1_health() -> None:
    checks = [a for i, a in _instructions(DOCKER / "server.Dockerfile") if i == "HEALTHCHECK"]
    assert len(checks) == 1
    assert "/v1/health" in checks[0]
    assert "CMD" in checks[0]


@pytest.mark.parametrize("name", DOCKERFILES)
def test_copy_sources_exist_in_the_repository(name: str) -> None:
    for ins, args in _instructions(DOCKER / name):
        if ins not in ("COPY", "ADD"):
            continue
        parts = [p for p in shlex.split(args) if not p.startswith("--")]
        if "--from=" in args:
            continue  # from a build stage, not the repository
        assert ins == "COPY", f"{name}: ADD fetches or unpacks; use COPY"
        for src in parts[:-1]:
            assert (REPO / src).exists(), f"{name}: COPY {src}: not in the repository"
            ignore = (DOCKER / f"{name}.dockerignore").read_text().splitlines()
            top = src.rstrip("/").split("/")[0]
            assert any(line.strip("!/") in (src.rstrip("/"), top) for line in ignore), (
                f"{name}: COPY {src} is excluded by {name}.dockerignore"
            )


def test_copied_workspace_is_the_whole_cargo_workspace() -> None:
    members = tomllib.loads((REPO / "Cargo.toml").read_text())["workspace"]["members"]
    for name in DOCKERFILES:
        copied = {
            shlex.split(a)[0]
            for i, a in _instructions(DOCKER / name)
            if i == "COPY" and "--from" not in a
        }
        assert set(members) <= copied, f"{name}: workspace members {members} not all copied"


# -- compose --------------------------------------------------------------------------


def _compose() -> dict[str, Any]:
    doc = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    assert isinstance(doc, dict)
    return doc


def _help(command: list[str]) -> str:
    """The ``--help`` text of a command the compose file runs."""
    if command[:1] == ["confide-server"]:
        argv = [sys.executable, "-m", "confide_server", command[1]]
    elif command[:1] == ["confide"]:
        argv = [sys.executable, "-m", "confide", command[1]]
    elif command[:2] == ["python", "/opt/confide/prepare_federation.py"]:
        argv = [sys.executable, str(DOCKER / "prepare_federation.py")]
    else:
        raise AssertionError(f"compose runs an unknown command {command[:2]}")
    r = subprocess.run(
        [*argv, "--help"], capture_output=True, text=True, timeout=120, cwd=REPO, check=False
    )
    assert r.returncode == 0, r.stderr
    return r.stdout


def test_compose_runs_a_three_site_federation_with_real_options() -> None:
    doc = _compose()
    services: dict[str, Any] = doc["services"]
    assert {"prepare", "server", "site-1", "site-2", "site-3"} <= set(services)
    declared = set(doc["volumes"])
    for name, svc in services.items():
        command = svc["command"]
        assert isinstance(command, list), f"{name}: command must be an exec list"
        text = _help(command)
        for opt in (c for c in command if c.startswith("--")):
            assert re.search(rf"(^|[\s,\[]){re.escape(opt)}([\s=,\]]|$)", text, re.M), (
                f"{name}: {opt} is not an option of {' '.join(command[:2])}"
            )
        for volume in svc.get("volumes", []):
            source = volume.split(":")[0]
            assert source in declared, f"{name}: volume {source} not declared"
        build = svc.get("build")
        if build is not None:
            assert (DOCKER / build["context"] / build["dockerfile"]).is_file()
    # Sites never see the server's state (its database and operator token).
    for k in (1, 2, 3):
        site = services[f"site-{k}"]
        assert not any(v.startswith("server-state") for v in site["volumes"])
        assert f"/federation/tokens/site-{k}" in site["command"]
        assert site["depends_on"]["server"]["condition"] == "service_healthy"
    assert services["server"]["depends_on"]["prepare"]["condition"] == (
        "service_completed_successfully"
    )


def test_prepare_script_writes_a_job_the_server_accepts(tmp_path: Path) -> None:
    out, state = tmp_path / "federation", tmp_path / "server-state"
    cmd = [sys.executable, str(DOCKER / "prepare_federation.py")]
    cmd += ["--out", str(out), "--state", str(state), "--rounds", "2"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO, check=False)
    assert r.returncode == 0, r.stderr
    job = load_config(out / "job.toml")
    assert job.server.host == "0.0.0.0"  # reachable from the site containers
    assert job.server.state_dir == state
    assert job.secagg.enabled
    assert job.privacy.enabled
    assert (job.job.cohort_size, job.job.min_clients) == (3, 2)
    params = job.secagg.params(3)
    assert (params.n, params.t) == (3, 2)  # SecAgg+ survives one dropped site
    tolerance = secagg_tolerance(job)
    assert tolerance is not None
    assert tolerance[0]
    for k in (1, 2, 3):
        token = out / "tokens" / f"site-{k}"
        assert token.stat().st_mode & 0o077 == 0
        assert token.read_text().strip().endswith(f".site-{k}")  # bound to its site
        SitePolicy.load(out / "sites" / f"site-{k}-policy.toml")
        assert (out / "sites" / f"site-{k}-train.csv").exists()
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)
    assert again.returncode == 0
    assert "nothing to do" in again.stdout


def _docker_daemon() -> bool:
    """Whether a docker daemon answers here (a client alone cannot build)."""
    if shutil.which("docker") is None:
        return False
    try:
        r = subprocess.run(["docker", "info"], capture_output=True, timeout=60, check=False)
    except subprocess.TimeoutExpired:
        return False
    return r.returncode == 0


@pytest.mark.slow
@pytest.mark.skipif(not _docker_daemon(), reason="no docker daemon here (lint only)")
@pytest.mark.parametrize("name", DOCKERFILES)
def test_docker_build(name: str) -> None:
    tag = "confide-test-" + name.split(".")[0]
    r = subprocess.run(
        ["docker", "build", "-f", str(DOCKER / name), "-t", tag, str(REPO)],
        capture_output=True,
        text=True,
        timeout=3600,
        check=False,
    )
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
