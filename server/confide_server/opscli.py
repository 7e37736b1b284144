"""Operator commands of ``confide-server``: ``abort``, ``revoke`` and ``new-job``.

``abort`` and ``revoke`` act on a **running** server: they send ``POST /v1/operator/abort``
or ``/v1/operator/revoke`` (:mod:`confide_server.operator`) with the operator token read
from the state folder, so they run on the server's machine (or anywhere the token file is
readable). ``new-job`` acts on a **stopped** server's state folder: it takes the state lock
(refused while a server runs), moves the whole folder to
``<state_dir>.archive/<job>-<UTC time>/`` (nothing is deleted) and leaves an empty state
folder, so the next ``confide-server run`` starts a new job. See docs/operations.md.
"""

from __future__ import annotations

import argparse
import json
import os
import ssl
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from confide.errors import ConfigError, ServerError, TransportError
from confide_server.auth import OPERATOR_TOKEN_FILE, operator_token
from confide_server.config import Config, load_config
from confide_server.statelock import StateLock
from confide_server.store import Store

__all__ = ["add_operator_commands", "archive_state", "operator_post"]

#: Job states that ``new-job`` archives without ``--abandon``.
_ENDED = ("finished", "failed")


def _server_url(config: Config, override: str | None) -> str:
    if override:
        return override.rstrip("/")
    host = config.server.host
    if host in ("0.0.0.0", "::", ""):  # noqa: S104 - a listening address, read not bound
        host = "127.0.0.1"
    scheme = "https" if config.tls.cert else "http"
    return f"{scheme}://{host}:{config.server.port}"


def operator_post(
    config: Config,
    path: str,
    body: dict[str, Any],
    *,
    server: str | None = None,
    ca_file: str | None = None,
    timeout: float = 30.0,
) -> dict[str, Any]:
    """POST ``body`` to the running server's operator endpoint ``path``; return its JSON.

    Raises
    ------
    ServerError
        The server refused (its status and message).
    TransportError
        The server cannot be reached.
    """
    token_file = config.server.state_dir / OPERATOR_TOKEN_FILE
    if not token_file.exists():
        raise ConfigError(
            f"no operator token at {token_file}: has this job's server ever run? "
            "Run the command on the server's machine with the job's config"
        )
    url = _server_url(config, server) + path
    ctx = None
    if url.startswith("https://"):
        cafile = ca_file or (str(config.tls.cert) if config.tls.cert else None)
        ctx = ssl.create_default_context(cafile=cafile)
    request = urllib.request.Request(  # noqa: S310 - the job's own server URL
        url,
        data=json.dumps(body).encode(),
        method="POST",
        headers={
            "Authorization": f"Bearer {operator_token(config.server.state_dir)}",
            "Content-Type": "application/json",
        },
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout, context=ctx) as resp:  # noqa: S310
            doc = json.loads(resp.read())
    except urllib.error.HTTPError as err:
        try:
            error = json.loads(err.read())["error"]
            code, message = str(error["code"]), str(error["message"])
        except (ValueError, KeyError, TypeError):
            code, message = "error", str(err.reason)
        raise ServerError(err.code, code, f"{url}: {message}") from None
    except (urllib.error.URLError, OSError) as exc:
        raise TransportError(
            f"{url} cannot be reached ({exc}): is 'confide-server run' serving this job? "
            "(pass --server URL if it listens elsewhere)"
        ) from None
    return doc if isinstance(doc, dict) else {}


def _cmd_abort(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    doc = operator_post(
        config,
        "/v1/operator/abort",
        {"reason": args.reason},
        server=args.server,
        ca_file=args.ca_file,
    )
    print(f"round {doc['aborted_round']} aborted ({doc['reason']})")
    return 0


def _cmd_revoke(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    doc = operator_post(
        config,
        "/v1/operator/revoke",
        {"client_id": args.client_id, "reason": args.reason},
        server=args.server,
        ca_file=args.ca_file,
    )
    aborted = doc.get("aborted_round")
    tail = "" if aborted is None else f"; round {aborted} (its cohort held the site) aborted"
    print(f"site {doc['revoked']!r} revoked: its key is no longer accepted{tail}")
    return 0


def archive_state(config: Config, *, abandon: bool = False) -> Path | None:
    """Move the job's state folder into ``<state_dir>.archive/``; return where it went.

    ``None`` when there is no job state to archive. Refused (:class:`ConfigError`) while a
    server holds the state lock, and for a job that has not ended unless ``abandon``.
    """
    state = config.server.state_dir
    if not config.server.database.exists():
        return None
    with StateLock(state, "confide-server new-job"):
        store = Store(config.server.database)
        try:
            status = store.get_meta("status") or "running"
            name = store.get_meta("job_name") or config.job.name
        finally:
            store.close()
        if status not in _ENDED and not abandon:
            raise ConfigError(
                f"job {name!r} in {state} has not ended (status {status!r}): finish it, or "
                "pass --abandon to archive it unfinished"
            )
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in name) or "job"
        archive_root = state.parent / f"{state.name}.archive"
        archive_root.mkdir(mode=0o700, exist_ok=True)
        target = archive_root / f"{safe}-{stamp}"
        n = 1
        while target.exists():
            n += 1
            target = archive_root / f"{safe}-{stamp}-{n}"
        # One rename (same file system): the old job is whole either here or there.
        os.rename(state, target)
    state.mkdir(mode=0o700)
    return target


def _cmd_new_job(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    target = archive_state(config, abandon=args.abandon)
    if target is None:
        print(f"no job state at {config.server.state_dir}: 'confide-server run' starts a new job")
        return 0
    print(
        f"archived the previous job's state to {target}\n"
        f"'confide-server run --config {args.config}' now starts job {config.job.name!r} anew: "
        "make new enrolment tokens (confide-server enroll) and start each site with a new "
        "--state folder (site identities belong to the archived job)"
    )
    return 0


def add_operator_commands(sub: Any, version: str) -> None:
    """Add ``abort``, ``revoke`` and ``new-job`` to ``confide-server``'s subparsers."""
    from confide.cli import add_command

    def online(p: argparse.ArgumentParser) -> None:
        p.add_argument("--config", required=True, help="the job config (job.toml)")
        p.add_argument("--server", help="the server's URL (default: from [server] host and port)")
        p.add_argument("--ca-file", help="CA bundle for an https server (default: [tls] cert)")

    abort = add_command(
        sub,
        "abort",
        help="abort the running server's open round",
        description="Abort the open round of the running server (POST /v1/operator/abort "
        "with the operator token). Nothing new is charged to the privacy budget; the next "
        "round starts as usual.",
        version=version,
    )
    online(abort)
    abort.add_argument("--reason", default="no reason given", help="recorded with the abort")
    abort.set_defaults(func=_cmd_abort)
    revoke = add_command(
        sub,
        "revoke",
        help="revoke a site: its key is no longer accepted",
        description="Revoke an enrolled site on the running server (POST "
        "/v1/operator/revoke): its requests are refused (403), it is never drawn again, and "
        "the open round is aborted if the site is in its cohort.",
        version=version,
    )
    online(revoke)
    revoke.add_argument("--client-id", required=True, help="the site's id, e.g. hospital-2")
    revoke.add_argument("--reason", default="revoked by the operator", help="recorded")
    revoke.set_defaults(func=_cmd_revoke)
    new_job = add_command(
        sub,
        "new-job",
        help="archive the job's state so that 'run' starts a new job",
        description="With the server stopped: move the state folder to "
        "<state_dir>.archive/<job>-<UTC time>/ (nothing is deleted) and leave an empty one; "
        "the next 'confide-server run' starts the job in job.toml anew.",
        version=version,
    )
    new_job.add_argument("--config", required=True, help="the job config (job.toml)")
    new_job.add_argument(
        "--abandon",
        action="store_true",
        help="also archive a job that has not finished (it cannot be resumed from here)",
    )
    new_job.set_defaults(func=_cmd_new_job)
