"""Prepare the 3-site demo federation of ``docker/compose.yaml`` (run once, idempotent).

Writes, under ``--out`` (the ``federation`` volume): ``job.toml`` (breast-cancer table,
SecAgg+ with one dropout tolerated among three sites, patient-level DP-SGD), the model,
each site's train/test CSV and policy file, and one enrolment token per site in
``tokens/site-N`` (mode 0600, bound to that site id). The server's state goes to
``--state`` (the ``server-state`` volume), which no site mounts. A second run with the
job already prepared changes nothing.

Demo only: every site container mounts the whole ``federation`` volume and so could read
the other sites' tokens. In a real federation each hospital gets its token over a trusted
channel and keeps its data on its own machine (README, "Docker").
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

from confide_server.simulate import SimulationOptions, prepare_job, site_policy_for


def build_parser() -> argparse.ArgumentParser:
    """Return the script's parser (the compose file passes its options)."""
    p = argparse.ArgumentParser(
        prog="prepare_federation.py",
        description="Prepare the docker compose demo federation (job, site data, tokens).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--out", required=True, help="folder of the job and the sites' files")
    p.add_argument("--state", required=True, help="the server's state folder")
    p.add_argument("--sites", type=int, default=3, help="number of sites")
    p.add_argument("--rounds", type=int, default=5, help="rounds of the job")
    p.add_argument("--port", type=int, default=8765, help="the server's port")
    return p


def main(argv: list[str] | None = None) -> int:
    """Prepare the federation; return the exit status."""
    args = build_parser().parse_args(argv)
    out, state = Path(args.out), Path(args.state)
    if (out / "job.toml").exists():
        print(f"federation already prepared in {out}: nothing to do")
        return 0
    opts = SimulationOptions(
        clients=args.sites,
        rounds=args.rounds,
        port=args.port,
        secagg=True,
        dp="sample",
        noise_multiplier=1.82,  # epsilon about 4 at delta 1e-5 after 10 rounds
        learning_rate=0.5,
        # Containers start in any order: generous deadlines; stages close early anyway.
        train_deadline=120.0,
        evaluate_deadline=60.0,
        extra_server={"host": "0.0.0.0", "state_dir": str(state)},  # noqa: S104 - in a container
        # One of three sites may drop out of a round (t = 2). With three sites that needs
        # adversarial_fraction = 0: no site colludes with the server (docs/operations.md).
        extra_secagg={"adversarial_fraction": 0.0, "dropout_fraction": 0.34},
    )
    files = prepare_job(out, opts)
    if files.job is None:  # pragma: no cover - prepare_job always returns the typed config
        raise SystemExit("prepare_job returned no job config")
    policy = site_policy_for(files.job).to_toml()
    tokens = out / "tokens"
    tokens.mkdir(mode=0o700, exist_ok=True)
    enroll = [sys.executable, "-m", "confide_server", "enroll", "--config", str(files.config)]
    for k in range(1, args.sites + 1):
        (out / "sites" / f"site-{k}-policy.toml").write_text(policy)
        made = subprocess.run(  # noqa: S603 - our own command
            [*enroll, "--client-id", f"site-{k}"],
            check=True,
            capture_output=True,
            text=True,
        )
        fd = os.open(tokens / f"site-{k}", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(made.stdout.strip() + "\n")
    print(f"prepared {args.sites} sites in {out}; server state in {state}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
