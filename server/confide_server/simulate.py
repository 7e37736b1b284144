"""``confide-server simulate``: a real federation on loopback, one process per party.

It splits scikit-learn's bundled breast-cancer data into sites (IID or Dirichlet(alpha) label
skew), writes each site's CSV, an initial model and a job config, starts ``confide-server``
and one ``confide client`` process per site over HTTP, prints a live table per round, and at
the end compares the federated model with a centrally trained baseline on the same split and
writes a PNG plot of accuracy per round. It exits non-zero if anything failed, and never leaves
a process behind.

Differential privacy: ``confide-server simulate`` runs with patient-level DP-SGD by default
(``--dp sample``, noise calibrated so that the whole run reaches ``--epsilon`` at
``delta = 1e-5``, or a fixed ``--noise-multiplier``), and prints epsilon per round and at the
end; ``--dp central`` gives client-level DP with server-side noise (SecAgg+ off),
``--dp distributed`` client-level DP with the distributed discrete Gaussian (each site adds
its noise share before SecAgg+ masking; needs SecAgg+), ``--dp none`` turns DP off. (The
library's :class:`SimulationOptions` default is ``dp="none"``.)

Simplification: features are standardised with the pooled training statistics before being
handed to the sites (a deployment would compute them with a federated statistics round).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from confide.client.policy import SitePolicy
from confide.data import (
    Dataset,
    Standardizer,
    load_breast_cancer,
    load_csv,
    partition_dirichlet,
    partition_iid,
    save_csv,
    train_test_split,
)
from confide.errors import ConfigError
from confide.protocol.manifest import Manifest, decode_tensors, encode_tensors
from confide.strategies import available_strategies, get_strategy
from confide.training import NumpyTrainer, SiteData, TrainConfig, Trainer, build_trainer
from confide_server.auth import operator_token
from confide_server.config import Config, load_config, parse_config, render_toml
from confide_server.launcher import Launcher, free_port, get_json
from confide_server.metrics import plot_rounds

__all__ = [
    "JobFiles",
    "SimulationOptions",
    "free_port",
    "job_document",
    "prepare_job",
    "run_simulation",
    "watch_rounds",
]

_MARKER = ".confide-simulate"


@dataclass(frozen=True)
class SimulationOptions:
    """Everything a simulated job is made of (defaults: the ``make demo`` job)."""

    clients: int = 3
    rounds: int = 10
    partition: str = "iid"
    alpha: float = 0.5
    model: str = "logistic"
    hidden: tuple[int, ...] = (16,)
    seed: int = 0
    epochs: int = 1
    batch_size: int = 16
    learning_rate: float = 0.1
    min_clients: int = 0  # 0: two thirds of the clients, at least one
    train_deadline: float = 30.0
    evaluate_deadline: float = 15.0
    port: int = 0  # 0: a free port
    exit_when_finished: bool = True
    extra_server: dict[str, Any] = field(default_factory=dict)
    dp: str = "none"  # "none" | "sample" | "central" | "distributed" | "sample_distributed"
    epsilon: float = 0.0  # target epsilon of the whole run (0: use noise_multiplier)
    noise_multiplier: float = 0.0
    epsilon_budget: float = 0.0
    delta: float = 1e-5
    clip_norm: float = 1.0
    sampling_rate: float = 0.2
    local_steps: int = 0
    secagg: bool = False  # SecAgg+ secure aggregation (`confide-server simulate` turns it on)
    strategy: str = "fedavg"  # a confide.strategies name
    extra_strategy: dict[str, Any] = field(default_factory=dict)  # the strategy's options
    extra_secagg: dict[str, Any] = field(default_factory=dict)  # [secagg] overrides
    data: str = "breast_cancer"  # "breast_cancer" | a CSV file (tables) | "lesions" (images)
    label_column: str = "label"  # a CSV file's label column
    patient_id_column: str | None = None  # a CSV file's patient id column (not a feature)
    image_size: int = 64  # lesions: tile side in pixels
    patients_per_site: int = 6  # lesions: pseudo-patients per site
    tiles_per_patient: int = 5  # lesions: tiles of each pseudo-patient
    release: bool = False  # sign the final model as a release for devices (patient app)
    # sample_distributed: public q * (patients of all sites); 0 = computed from the split
    expected_batch_size: float = 0.0
    # lesions: parameter-name prefixes trained (the rest frozen and pinned in the manifest,
    # confide.training.trainable); () = the whole network
    trainable: tuple[str, ...] = ()
    # lesions: a safetensors file of the full model to start from (e.g. a public-data trunk)
    init_weights: str | None = None


@dataclass(frozen=True)
class JobFiles:
    """What :func:`prepare_job` wrote."""

    workdir: Path
    config: Path
    server_url: str
    site_train: list[Path]
    site_test: list[Path]
    train: SiteData
    test: SiteData
    trainer: Trainer
    job: Config | None = None  # the typed job config written to ``config``


def site_policy_for(job: Config, consortium_root: Path | None = None) -> SitePolicy:
    """Return the simulated sites' policy: the protections the job was configured with.

    In a simulation one operator plays every site, so each site accepts exactly the job's
    secure aggregation (required when ``[secagg]`` is on), privacy mode (required when on)
    and threat model; the cohort minimum is 2. The epsilon cap is not the sites' own choice
    here (the job's accounted epsilon is what the run prints): 1e6. Peers must be certified
    by ``consortium_root`` (from :func:`provision_sites`), as for real sites.
    """
    dp = job.privacy
    return SitePolicy(
        allow_plain=not job.secagg.enabled,
        allow_no_dp=not dp.enabled,
        dp_kinds=(dp.mode,) if dp.enabled else SitePolicy().dp_kinds,
        max_epsilon=1e6,
        max_delta=max(dp.delta, SitePolicy().max_delta),
        min_cohort_size=2,
        adversarial_fraction=job.secagg.adversarial_fraction,
        dropout_fraction=job.secagg.dropout_fraction,
        consortium_root=None if consortium_root is None else str(consortium_root),
        min_certified_sites=2,
        require_consistency_check=job.secagg.enabled and job.secagg.consistency_check,
    )


def provision_sites(work: Path, site_ids: Sequence[str]) -> Path:
    """Provision the simulated sites: one consortium root, a certificate in each state folder.

    The operator plays the provisioner too (``confide provision``): the root is
    ``work/consortium`` (made once), each site's identity and ``certificate.json`` live in
    ``work/clients/<id>``. Returns the ``root.json`` the sites' policy names.
    """
    from confide.protocol.certs import init_root, provision_site

    root = work / "consortium"
    if not (root / "root.json").exists():
        init_root(root, "simulation")
    for cid in site_ids:
        provision_site(root, work / "clients" / cid, cid)
    return root / "root.json"


def clear_output(work: Path) -> None:
    """Make ``work`` ready for a simulation's output (both backends call this first).

    Earlier simulation output in it (the folder carries the marker file) is removed; a
    non-empty folder that ``simulate`` did not write is refused.

    Raises
    ------
    ConfigError
        ``work`` is not empty and was not written by ``confide-server simulate``.
    """
    if work.is_dir() and not (work / _MARKER).exists() and any(work.iterdir()):
        raise ConfigError(
            f"--out {work}: the folder is not empty and was not written by confide-server "
            "simulate; pass a new or empty folder (earlier simulation output is replaced)"
        )
    if (work / _MARKER).exists():
        for sub in ("state", "sites", "clients", "logs"):
            shutil.rmtree(work / sub, ignore_errors=True)


@dataclass(frozen=True)
class StartedJob:
    """A started simulation server: its process, one enrolment token per site, the policy."""

    server: subprocess.Popen[bytes]
    tokens: list[str]
    policy: Path


def start_job(
    launcher: Launcher,
    work: Path,
    config: Path,
    job: Config,
    server_url: str,
    clients: int,
    *,
    ready_timeout: float = 180.0,
) -> StartedJob | None:
    """Start the job's server, make a token per site, provision the sites, write their policy.

    Shared by both backends. The sites are ``hospital-1`` .. ``hospital-<clients>``; their
    identities and certificates go to ``work/clients/<id>`` (:func:`provision_sites`) and
    their policy, the job's protections (:func:`site_policy_for`), to
    ``work/site-policy.toml``. Returns ``None`` when the server did not answer its health
    route within ``ready_timeout`` seconds (its log's tail is ``launcher.tail("server")``).
    """
    server = launcher.spawn("server", _server_cmd("run", "--config", str(config)))
    if not launcher.wait_ready(server_url + "/v1/health", timeout=ready_timeout, proc=server):
        return None
    tokens = subprocess.run(  # noqa: S603
        _server_cmd("enroll", "--config", str(config), "-n", str(clients)),
        check=True,
        capture_output=True,
        text=True,
    ).stdout.split()
    policy = work / "site-policy.toml"
    root = provision_sites(work, [f"hospital-{k}" for k in range(1, len(tokens) + 1)])
    policy.write_text(site_policy_for(job, root).to_toml())
    return StartedJob(server, tokens, policy)


def watch_rounds(
    server: subprocess.Popen[bytes],
    status_url: str,
    token: str,
    on_round: Callable[[dict[str, Any]], None],
    *,
    t0: float,
    timeout: float,
    on_poll: Callable[[], None] | None = None,
    interval: float = 0.1,
) -> tuple[dict[str, Any] | None, bool]:
    """Follow the job's status until its server exits; report each closed round once.

    Shared by both backends: every ``interval`` seconds ``on_poll`` (if given) is called
    and the operator's status page read; ``on_round`` gets each round row the first time
    it is committed or aborted.

    Returns
    -------
    tuple
        ``(status, timed_out)``: the last status read (``None`` if none was) and whether
        ``timeout`` seconds since ``t0`` passed with the server still running.
    """
    shown: set[int] = set()
    status: dict[str, Any] | None = None
    while server.poll() is None:
        if time.monotonic() - t0 > timeout:
            return status, True
        if on_poll is not None:
            on_poll()
        doc = get_json(status_url, token=token)
        if doc is not None:
            status = doc
            for r in doc["rounds"]:
                if r["status"] in ("committed", "aborted") and r["round"] not in shown:
                    shown.add(r["round"])
                    on_round(r)
        time.sleep(interval)
    return status, False


def prepare_job(workdir: str | Path, opts: SimulationOptions) -> JobFiles:
    """Write site data, the initial model and the job config under ``workdir``.

    Parameters
    ----------
    workdir : str or Path
        Output folder (created).
    opts : SimulationOptions
        The job.

    Returns
    -------
    JobFiles
        Paths and the pooled train/test data.
    """
    if opts.clients < 1 or opts.rounds < 1:
        raise ConfigError("clients and rounds must be >= 1")
    work = Path(workdir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    (work / _MARKER).touch()
    if opts.data == "lesions":
        return _prepare_image_job(work, opts)
    if opts.partition not in ("iid", "dirichlet"):
        raise ConfigError(f"partition must be 'iid' or 'dirichlet', got {opts.partition!r}")
    full = load_breast_cancer() if opts.data == "breast_cancer" else _load_table(opts)
    n_classes = max(2, int(full.y.max()) + 1)
    if opts.model == "logistic" and n_classes > 2:
        raise ConfigError(
            f"{opts.data} has {n_classes} classes and logistic regression is binary: "
            "pass --model softmax or --model mlp"
        )
    train, test, parts, test_parts = _split(full, opts)
    sites = work / "sites"
    sites.mkdir(exist_ok=True)
    site_train, site_test = [], []
    for k, (tr, te) in enumerate(zip(parts, test_parts, strict=True), start=1):
        site_train.append(sites / f"site-{k}-train.csv")
        site_test.append(sites / f"site-{k}-test.csv")
        for ds, path in ((train.subset(tr), site_train[-1]), (test.subset(te), site_test[-1])):
            save_csv(ds, path, opts.label_column, opts.patient_id_column)
    hidden = opts.hidden if opts.model == "mlp" else ()
    created = NumpyTrainer.create(opts.model, train.n_features, n_classes, hidden, seed=opts.seed)
    # The manifest records the feature columns: a site whose table differs is refused
    # before it spends its enrolment token.
    named = Manifest(
        created.manifest.tensors,
        {**created.manifest.spec, "feature_names": list(train.feature_names)},
    )
    trainer = NumpyTrainer(named, created.get_weights())
    trainer.manifest.save(work / "model.json")
    (work / "init.safetensors").write_bytes(encode_tensors(trainer.manifest, trainer.get_weights()))
    port = opts.port or free_port()
    opts = _with_expected_batch(opts, len(train))  # breast cancer: a record per patient
    doc = job_document(opts, port)
    job = parse_config(doc, work)  # typed and validated before any process starts
    config = work / "job.toml"
    config.write_text(render_toml(doc, header="Written by `confide-server simulate`."))
    return JobFiles(
        work,
        config,
        f"http://127.0.0.1:{port}",
        site_train,
        site_test,
        train,
        test,
        trainer,
        job,
    )


def _load_table(opts: SimulationOptions) -> Dataset:
    """Read ``opts.data`` as a CSV table and warn about id-like feature columns."""
    from confide.cli import warn_id_like

    path = Path(opts.data)
    if not path.is_file():
        raise ConfigError(
            f"--data {opts.data}: no such file (pass breast_cancer, lesions or a CSV table "
            "with a header row)"
        )
    table = load_csv(path, opts.label_column, opts.patient_id_column)
    warn_id_like(table, path, opts.patient_id_column)
    return table


def _split(full: Dataset, opts: SimulationOptions) -> tuple[Dataset, Dataset, list[Any], list[Any]]:
    """Train/test split, standardised, and each side's rows per site.

    With patient ids every patient's rows stay together: in one site, on one side.
    """
    if full.patient_ids is None:
        train, test = train_test_split(full, 0.2, seed=opts.seed)
    else:
        patients = np.unique(full.patient_ids)
        if len(patients) < 2 * opts.clients:
            raise ConfigError(
                f"{opts.data} has {len(patients)} patients: too few for {opts.clients} sites "
                "with a train and a test part each"
            )
        order = np.random.default_rng(opts.seed).permutation(patients)
        held_out = np.isin(full.patient_ids, order[: max(opts.clients, len(order) // 5)])
        train = full.subset(np.flatnonzero(~held_out))
        test = full.subset(np.flatnonzero(held_out))
    scaler = Standardizer.fit(train.x)
    train, test = scaler.apply(train), scaler.apply(test)
    if full.patient_ids is None:
        if opts.partition == "iid":
            parts = partition_iid(len(train), opts.clients, seed=opts.seed)
        else:
            parts = partition_dirichlet(train.y, opts.clients, opts.alpha, seed=opts.seed)
        test_parts = partition_iid(len(test), opts.clients, seed=opts.seed + 1)
        return train, test, parts, test_parts
    if opts.partition != "iid":
        raise ConfigError(
            "--partition dirichlet splits rows by label; with --patient-id-column pass "
            "--partition iid (patients are then spread over sites at random)"
        )
    return (
        train,
        test,
        _patient_parts(train, opts.clients, opts.seed),
        _patient_parts(test, opts.clients, opts.seed + 1),
    )


def _patient_parts(ds: Dataset, n: int, seed: int) -> list[Any]:
    """Row indices per site, each patient's rows in one site (patients split IID)."""
    ids = ds.patient_ids
    if ids is None:
        raise ConfigError("a patient-level split needs patient ids")
    patients = np.unique(ids)
    groups = partition_iid(len(patients), n, seed=seed)
    return [np.flatnonzero(np.isin(ids, patients[g])) for g in groups]


def _prepare_image_job(work: Path, opts: SimulationOptions) -> JobFiles:
    """Write the lesion task for torch models (:mod:`confide_server.simulate_images`)."""
    from confide.data.images import ImageDataset, ImageTransform
    from confide.protocol.manifest import Manifest
    from confide_server.simulate_images import write_image_job_data

    job_data = write_image_job_data(
        work,
        model=opts.model,
        sites=opts.clients,
        image_size=opts.image_size,
        patients_per_site=opts.patients_per_site,
        tiles_per_patient=opts.tiles_per_patient,
        partition=opts.partition,
        alpha=opts.alpha,
        seed=opts.seed,
    )
    if opts.trainable or opts.init_weights is not None:
        _pin_trainable(job_data.manifest_path, job_data.weights_path, opts)
    manifest = Manifest.load(job_data.manifest_path)
    trainer = build_trainer(manifest)
    trainer.set_weights(decode_tensors(manifest, job_data.weights_path.read_bytes())[0])
    transform = ImageTransform(size=(opts.image_size, opts.image_size), channels=3)
    classes = list(manifest.spec["classes"])
    train = ImageDataset.from_csv(job_data.train_csv, classes=classes, transform=transform)
    test = ImageDataset.from_csv(job_data.test_csv, classes=classes, transform=transform)
    port = opts.port or free_port()
    opts = _with_expected_batch(opts, len(set(np.asarray(train.patient_ids).tolist())))
    doc = job_document(opts, port)
    job = parse_config(doc, work)
    config = work / "job.toml"
    config.write_text(render_toml(doc, header="Written by `confide-server simulate`."))
    return JobFiles(
        work,
        config,
        f"http://127.0.0.1:{port}",
        job_data.site_train,
        job_data.site_test,
        train,
        test,
        trainer,
        job,
    )


def _pin_trainable(manifest_path: Path, weights_path: Path, opts: SimulationOptions) -> None:
    """Rewrite the job's model: start from ``init_weights``; train only ``trainable``.

    The manifest then pins the frozen part's SHA-256 (``frozen_sha256``), which every site
    checks the announced model against in every round.
    """
    from confide.training.trainable import with_trainable

    manifest = Manifest.load(manifest_path)
    weights = decode_tensors(manifest, weights_path.read_bytes())[0]
    if opts.init_weights is not None:
        weights = decode_tensors(manifest, Path(opts.init_weights).read_bytes())[0]
    if opts.trainable:
        manifest = with_trainable(manifest, opts.trainable, weights)
    manifest.save(manifest_path)
    weights_path.write_bytes(encode_tensors(manifest, weights))


def _with_expected_batch(opts: SimulationOptions, patients: int) -> SimulationOptions:
    """Fill in the public expected batch ``q * patients`` of a distributed DP-SGD job.

    The simulator plays the consortium, which agrees on its patient count before the job
    (a public number, as in Dopamine); it is not computed by the server from any round.
    """
    if opts.dp != "sample_distributed" or opts.expected_batch_size > 0:
        return opts
    return replace(opts, expected_batch_size=opts.sampling_rate * patients)


def job_document(opts: SimulationOptions, port: int) -> dict[str, dict[str, Any]]:
    """Return the job config of a simulation as a document (``{section: {key: value}}``).

    :func:`~confide_server.config.parse_config` turns it into the typed
    :class:`~confide_server.config.Config`; :func:`~confide_server.config.render_toml`
    writes it as the ``job.toml`` the server reads.

    Raises
    ------
    ValueError
        An unknown ``dp`` mode, or ``dp="distributed"`` without SecAgg+.
    """
    min_clients = opts.min_clients or max(1, math.ceil(2 * opts.clients / 3))
    doc: dict[str, dict[str, Any]] = {
        "job": {
            "name": f"breast-cancer-{opts.partition}"
            if opts.data == "breast_cancer"
            else f"{opts.data}-{opts.model}-{opts.partition}"
            if opts.data == "lesions"
            else f"{Path(opts.data).stem}-{opts.partition}",
            "rounds": opts.rounds,
            "seed": opts.seed,
            "cohort_size": opts.clients,
            "min_clients": min_clients,
            "wait_for_clients": opts.clients,
        },
        "model": {"manifest": "model.json", "weights": "init.safetensors"},
        "strategy": {
            "name": opts.strategy,
            "epochs": opts.epochs,
            "batch_size": opts.batch_size,
            "learning_rate": opts.learning_rate,
            **opts.extra_strategy,
        },
        "deadlines": {"train": opts.train_deadline, "evaluate": opts.evaluate_deadline},
        "server": {
            "host": "127.0.0.1",
            "port": port,
            "state_dir": "state",
            "exit_when_finished": opts.exit_when_finished,
            "linger_s": 1.0,
            **opts.extra_server,
        },
    }
    privacy = _privacy_section(opts)
    if privacy:
        doc["privacy"] = privacy
    if opts.secagg:
        # The masked update is sent after local training: the mask stage gets the train
        # deadline.
        secagg: dict[str, Any] = {"enabled": True, "mask": opts.train_deadline}
        if opts.data == "lesions":
            # Torch sites start slowly (importing torch, the first vmap) and a secure round
            # that aborts still spends its patient-level budget: give every stage the train
            # deadline; each stage still closes as soon as the whole cohort has answered.
            secagg.update(advertise=opts.train_deadline, share=opts.train_deadline)
        doc["secagg"] = {**secagg, **opts.extra_secagg}
    return doc


def _secagg_line(job: Config, n: int) -> str:
    """One line saying whether secure aggregation is on, with its k, t and ring bits."""
    cfg = job.secagg
    if not cfg.enabled:
        return "secure aggregation: off (plain FedAvg: the server sees each update)"
    p = cfg.params(n)
    graph = "complete graph" if p.complete else "Harary graph"
    privacy = job.privacy
    if privacy.mode == "distributed":
        encoding = (
            f"ring 2^{privacy.ring_bits}, distributed discrete Gaussian encoding "
            f"(noise for {p.min_survivors - p.corrupt} honest shares)"
        )
    elif privacy.mode == "sample_distributed":
        encoding = (
            f"ring 2^{privacy.ring_bits}, distributed DP-SGD: each site noises its clipped "
            f"patient sum (noise for {p.min_survivors - p.corrupt} honest shares)"
        )
    else:
        encoding = f"ring 2^{p.modulus_bits}, {p.quant_bits}-bit quantization"
    return (
        f"secure aggregation: SecAgg+ on, n={p.n}, k={p.k} neighbours ({graph}), "
        f"threshold t={p.t}, {encoding} "
        f"(adversarial {cfg.adversarial_fraction:g}, dropout {cfg.dropout_fraction:g}); "
        + (f"survives {p.n - p.t} dropped site(s)" if p.t < p.n else "no site may drop")
    )


def _privacy_section(opts: SimulationOptions) -> dict[str, Any]:
    if opts.dp not in ("none", "sample", "central", "distributed", "sample_distributed"):
        raise ConfigError(
            "dp must be 'none', 'sample', 'central', 'distributed' or 'sample_distributed', "
            f"got {opts.dp!r}"
        )
    if opts.dp in ("distributed", "sample_distributed") and not opts.secagg:
        raise ConfigError(f"dp {opts.dp!r} needs secure aggregation (secagg=True)")
    if opts.dp == "none":
        return {}
    sec: dict[str, Any] = {"mode": opts.dp, "delta": opts.delta}
    if opts.noise_multiplier > 0:
        sec["noise_multiplier"] = opts.noise_multiplier
    else:
        sec["target_epsilon"] = opts.epsilon or 4.0
    if opts.epsilon_budget > 0:
        sec["epsilon_budget"] = opts.epsilon_budget
    sec["clip_norm"] = opts.clip_norm
    if opts.dp == "sample":
        sec["sampling_rate"] = opts.sampling_rate
        sec["local_steps"] = opts.local_steps
    if opts.dp == "sample_distributed":
        sec["sampling_rate"] = opts.sampling_rate
        sec["expected_batch_size"] = opts.expected_batch_size
    return sec


def _eps(doc: dict[str, Any] | None, key: str) -> str:
    value = None if doc is None else doc.get(key)
    return "-" if value is None else f"{value:.3f}"


def central_baseline(files: JobFiles, opts: SimulationOptions) -> float:
    """Accuracy of the same model trained centrally on the pooled training data.

    Same initial weights and SGD settings; ``rounds * epochs`` epochs.
    """
    trainer = build_trainer(files.trainer.manifest)
    trainer.set_weights(files.trainer.get_weights())
    cfg = TrainConfig(opts.epochs * opts.rounds, opts.batch_size, opts.learning_rate)
    trainer.fit(files.train, cfg, seed=opts.seed)
    return trainer.evaluate(files.test)["accuracy"]


def _strategy_options(parser: argparse.ArgumentParser, items: list[str]) -> dict[str, Any]:
    """Parse ``--strategy-option KEY=VALUE`` items (numbers, true/false, else strings)."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key:
            parser.error(f"--strategy-option expects KEY=VALUE, got {item!r}")
        value: Any = text
        if text.lower() in ("true", "false"):
            value = text.lower() == "true"
        else:
            for conv in (int, float):
                try:
                    value = conv(text)
                    break
                except ValueError:
                    continue
        out[key] = value
    return out


def _server_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "confide_server", *args]


def _plot(rows: list[dict[str, Any]], baseline: float, path: Path) -> bool:
    """Write the accuracy plot; ``False`` when matplotlib (``[demo]``) is not installed."""
    try:
        import matplotlib
    except ModuleNotFoundError:
        return False

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    xs = [r["round"] for r in rows if r["status"] == "committed"]
    ys = [
        (r["metrics"] or {}).get("eval_accuracy", float("nan"))
        for r in rows
        if r["status"] == "committed"
    ]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(xs, ys, marker="o", label="federated (FedAvg), eval accuracy")
    ax.axhline(baseline, color="gray", linestyle="--", label=f"central baseline {baseline:.3f}")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("round")
    ax.set_ylabel("accuracy")
    ax.set_title("confide: breast-cancer federation")
    ax.legend(loc="lower right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def run_simulation(
    workdir: str | Path,
    opts: SimulationOptions,
    *,
    plot: str | Path | None = None,
    timeout: float = 300.0,
    central: bool = True,
) -> int:
    """Run a whole federation on loopback; return the process exit code (0 = success).

    Parameters
    ----------
    workdir : str or Path
        Output folder; earlier simulation output in it is replaced.
    opts : SimulationOptions
        The job.
    plot : str or Path, optional
        PNG file for accuracy per round (default ``workdir/accuracy.png``).
    timeout : float
        Seconds before the run is declared failed.
    central : bool, default True
        Also train the central baseline and plot accuracy per round (the Dopamine
        experiment, :mod:`confide_server.dopamine`, runs its own baseline and plot).

    Returns
    -------
    int
        0 when the job finished and every process exited cleanly.
    """
    t0 = time.monotonic()
    work = Path(workdir).resolve()
    clear_output(work)
    files = prepare_job(work, opts)
    logs = work / "logs"
    launcher = Launcher(logs)
    status_url = files.server_url + "/v1/status"
    job_cfg = files.job or load_config(files.config)
    print(
        f"confide-server simulate: {opts.clients} sites ({opts.partition}"
        f"{f', alpha={opts.alpha}' if opts.partition == 'dirichlet' else ''}), "
        f"{opts.rounds} rounds, model {opts.model}, server {files.server_url}",
        flush=True,
    )
    print(_secagg_line(files.job or load_config(files.config), opts.clients), flush=True)
    try:
        # A loaded machine can take minutes to start a server; a healthy start returns at once.
        started = start_job(
            launcher,
            work,
            files.config,
            job_cfg,
            files.server_url,
            opts.clients,
            ready_timeout=600.0,
        )
        if started is None:
            print(f"server did not start:\n{launcher.tail('server')}", file=sys.stderr)
            return 1
        server, tokens, policy = started.server, started.tokens, started.policy
        # More torch sites than cores: one intra-op thread each, or they oversubscribe.
        many = opts.data == "lesions" and opts.clients > (os.cpu_count() or 1)
        site_env = {"OMP_NUM_THREADS": "1"} if many else None
        # The status page is the operator's: this process is the operator.
        token = operator_token(job_cfg.server.state_dir)
        for k, enrolment in enumerate(tokens, start=1):
            cmd = [
                sys.executable,
                "-m",
                "confide",
                "client",
                "--server",
                files.server_url,
                "--policy",
                str(policy),
                "--client-id",
                f"hospital-{k}",
                "--data",
                str(files.site_train[k - 1]),
                "--test-data",
                str(files.site_test[k - 1]),
                "--state",
                str(work / "clients" / f"hospital-{k}"),
                "--label-column",
                opts.label_column,
            ]
            if opts.patient_id_column is not None:
                cmd += ["--patient-id-column", opts.patient_id_column]
            # The token travels in the environment, not on argv (visible in `ps`).
            launcher.spawn(
                f"hospital-{k}", cmd, env={**(site_env or {}), "CONFIDE_TOKEN": enrolment}
            )
        print(
            f"{'round':>5}  {'status':<9}  {'clients':>7}  {'train loss':>10}  "
            f"{'accuracy':>8}  {'eps(round)':>10}  {'eps(total)':>10}  {'elapsed':>7}",
            flush=True,
        )

        def show(r: dict[str, Any]) -> None:
            m = r["metrics"] or {}
            loss = m.get("train_loss")
            acc = m.get("eval_accuracy")
            print(
                f"{r['round']:>5}  {r['status']:<9}  "
                f"{m.get('train_clients', 0):>3}/{len(r['cohort']):<3}  "
                f"{'-' if loss is None else f'{loss:.4f}':>10}  "
                f"{'-' if acc is None else f'{acc:.4f}':>8}  "
                f"{_eps(r.get('privacy'), 'epsilon_round'):>10}  "
                f"{_eps(r.get('privacy'), 'epsilon'):>10}  "
                f"{time.monotonic() - t0:>6.1f}s",
                flush=True,
            )

        status, timed_out = watch_rounds(server, status_url, token, show, t0=t0, timeout=timeout)
        if timed_out:
            print(f"timed out after {timeout} s", file=sys.stderr)
            return 1
        server_rc = server.wait()
        final = subprocess.run(  # noqa: S603
            _server_cmd("status", "--config", str(files.config), "--json"),
            check=True,
            capture_output=True,
            text=True,
        )
        status = json.loads(final.stdout)
        client_rcs = []
        for p in launcher.children[1:]:
            try:
                client_rcs.append(p.wait(timeout=30))
            except subprocess.TimeoutExpired:
                client_rcs.append(-1)
        ok = (
            server_rc == 0
            and all(rc == 0 for rc in client_rcs)
            and status is not None
            and status["status"] == "finished"
        )
        if not ok:
            print(
                f"federation failed: server rc={server_rc}, client rcs={client_rcs}, "
                f"status={None if status is None else status['status']}",
                file=sys.stderr,
            )
            for log in sorted(logs.glob("*.log")):
                print(f"--- {log.name}\n{launcher.tail(log.stem)}", file=sys.stderr)
            return 1
        model_sha = status["current_model"]
        blob = (work / "state" / "models" / f"{model_sha}.safetensors").read_bytes()
        vec, _ = decode_tensors(files.trainer.manifest, blob)
        fed = build_trainer(files.trainer.manifest)
        fed.set_weights(vec)
        fed_acc = fed.evaluate(files.test)["accuracy"]
        base_acc = central_baseline(files, opts) if central else None
        plot_path = Path(plot) if plot is not None else work / "accuracy.png"
        plotted = base_acc is not None and _plot(status["rounds"], base_acc, plot_path)
        rounds_png = work / "rounds.png"  # accuracy and epsilon per round (+ rounds.json)
        rounds_plotted = plot_rounds(status["rounds"], rounds_png)
        print(
            f"federated accuracy (final model, pooled test set of {len(files.test)}): {fed_acc:.4f}"
        )
        if base_acc is not None:
            print(f"central baseline   (same split, same model and SGD):   {base_acc:.4f}")
        priv = status.get("privacy")
        if priv is None:
            print(
                "privacy: none (no differential privacy; pass --dp sample, central or distributed)"
            )
        else:
            unit = {
                "sample": "patient-level DP-SGD",
                "distributed": "client-level DP (distributed discrete Gaussian)",
                "sample_distributed": "patient-level DP-SGD distributed under SecAgg+",
            }.get(priv["mode"], "client-level DP")
            budget = priv.get("epsilon_budget")
            print(
                f"privacy: {unit}, epsilon = {priv['epsilon']:.3f} at delta = {priv['delta']:g} "
                f"after {status['rounds_completed']} rounds (noise multiplier "
                f"{priv['noise_multiplier']:.3f}, clip {priv['clip_norm']:g}"
                f"{'' if budget is None else f', budget {budget:g}'})"
            )
        if status.get("reason"):
            print(f"job stopped early: {status['reason']}")
        if opts.release:
            _release(files)
        if plotted:
            print(f"plot: {plot_path}")
        if rounds_plotted:
            print(f"plot: {rounds_png} (accuracy and epsilon per round)")
        elif central:
            print("plot: skipped (matplotlib is not installed: pip install 'confide-server[demo]')")
        print(f"done in {time.monotonic() - t0:.1f} s; logs in {logs}", flush=True)
        return 0
    finally:
        launcher.stop_all()


def _release(files: JobFiles) -> None:
    """Sign the final model as a device release and say how to open the patient app on it."""
    from confide_server.releases import release_current_model

    classes = [str(c) for c in files.trainer.manifest.spec.get("classes", ["0", "1"])]
    release = release_current_model(files.config, classes)
    state = files.workdir / "state"
    print(
        f"released model version {release.record.version} for devices "
        f"(ONNX, {release.record.model_sha256[:12]}..., signed with {state / 'release_key.pem'})"
    )
    print("open the patient app on it:  make app")


def build_simulate_parser() -> Any:
    """Build the ``confide-server simulate`` argument parser."""
    import argparse

    from confide.cli import HelpFormatter
    from confide_server.cli import version_string

    parser = argparse.ArgumentParser(
        prog="confide-server simulate",
        description="Run a real federation on loopback: one confide-server and one confide "
        "client process per site, over HTTP, on scikit-learn's breast-cancer table, your own "
        "CSV table (--data FILE.csv) or the lesion images; then compare with central "
        "training and plot accuracy per round.",
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--version", action="version", version=version_string())
    parser.add_argument("--clients", type=int, default=3, help="number of sites (processes)")
    parser.add_argument("--rounds", type=int, default=10, help="federated rounds")
    parser.add_argument(
        "--partition",
        choices=["iid", "dirichlet"],
        default="iid",
        help="how rows are spread over sites: at random, or with Dirichlet label skew",
    )
    parser.add_argument(
        "--alpha", type=float, default=0.5, help="Dirichlet concentration (small: more skew)"
    )
    parser.add_argument(
        "--data",
        default="breast_cancer",
        help="breast_cancer (scikit-learn's table), a CSV file of your own (header row, a "
        "label column, numeric features), or lesions (synthetic lesions on real scans "
        "shipped by pydicom/scikit-image; torch models)",
    )
    parser.add_argument(
        "--label-column", default="label", help="with --data FILE.csv: the label column"
    )
    parser.add_argument(
        "--patient-id-column",
        default=None,
        help="with --data FILE.csv: the column naming each row's patient (not a feature; "
        "a patient's rows stay on one site, and DP protects the patient)",
    )
    parser.add_argument(
        "--model",
        choices=["logistic", "softmax", "mlp", "squeezenet", "small_cnn"],
        default=None,
        help="logistic (table default), softmax, mlp; squeezenet (images default), small_cnn",
    )
    parser.add_argument("--image-size", type=int, default=64, help="lesions: tile side")
    parser.add_argument(
        "--patients-per-site", type=int, default=6, help="lesions: pseudo-patients per site"
    )
    parser.add_argument(
        "--release",
        action="store_true",
        help="sign the final model as a release for devices (the patient app)",
    )
    parser.add_argument(
        "--hidden", type=int, nargs="*", default=[16], help="mlp: hidden layer widths"
    )
    parser.add_argument("--epochs", type=int, default=1, help="local epochs per round")
    parser.add_argument("--batch-size", type=int, default=16, help="local batch size")
    parser.add_argument(
        "--lr", type=float, default=None, help="learning rate (default 0.1; 0.5 with --dp sample)"
    )
    parser.add_argument(
        "--min-clients",
        type=int,
        default=0,
        help="quorum per round (0: two thirds of the sites, at least one)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the split and the model")
    parser.add_argument(
        "--strategy",
        choices=available_strategies(),
        default="fedavg",
        help="aggregation strategy ([strategy] name of the job config; docs/strategies.md)",
    )
    parser.add_argument(
        "--strategy-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a [strategy] option, e.g. mu=0.01, momentum=0.9, trim_fraction=0.2, "
        "max_norm=1.0, server_learning_rate=0.1 (repeatable)",
    )
    parser.add_argument(
        "--out",
        default="simulation",
        help="output folder: new, empty, or an earlier simulation's (replaced)",
    )
    parser.add_argument("--plot", default=None, help="PNG path (default: OUT/accuracy.png)")
    parser.add_argument(
        "--timeout", type=float, default=300.0, help="seconds before the run is declared failed"
    )
    parser.add_argument(
        "--dp",
        choices=["none", "sample", "central", "distributed", "sample_distributed"],
        default="sample",
        help="differential privacy: patient-level DP-SGD (sample), client-level with "
        "server noise (central), client-level with noise shares under SecAgg+ "
        "(distributed), or none",
    )
    parser.add_argument(
        "--epsilon",
        type=float,
        default=0.0,
        help="target epsilon of the whole run at delta 1e-5 (calibrates the noise; slower; "
        "0: use --noise-multiplier)",
    )
    parser.add_argument(
        "--noise-multiplier",
        type=float,
        default=None,
        help="fixed noise multiplier (default for --dp sample: 1.82, epsilon just under 4)",
    )
    parser.add_argument(
        "--epsilon-budget",
        type=float,
        default=0.0,
        help="stop the job before its epsilon exceeds this (0: no budget)",
    )
    parser.add_argument(
        "--clip-norm", type=float, default=1.0, help="DP clip norm (per patient or per update)"
    )
    parser.add_argument(
        "--sampling-rate",
        type=float,
        default=0.2,
        help="--dp sample: Poisson rate of a patient per DP-SGD step",
    )
    parser.add_argument(
        "--no-secagg",
        action="store_true",
        help="turn SecAgg+ secure aggregation off (on by default; off with --dp central, "
        "whose server-side clipping needs the individual updates)",
    )
    from confide_server.simulate_ray import add_ray_arguments

    add_ray_arguments(parser)  # --backend, --ray-*: confide_server.simulate_ray
    return parser


def main_simulate(argv: Sequence[str]) -> int:
    """Parse ``confide-server simulate`` arguments and run it."""
    parser = build_simulate_parser()
    args = parser.parse_args(argv)
    images = args.data == "lesions"
    model = args.model or ("squeezenet" if images else "logistic")
    if images != (model in ("squeezenet", "small_cnn")):
        parser.error(f"--model {model} does not fit --data {args.data}")
    if args.dp in ("distributed", "sample_distributed") and args.no_secagg:
        parser.error(f"--dp {args.dp} needs SecAgg+ (drop --no-secagg)")
    strategy_options = _strategy_options(parser, args.strategy_option)
    # Median and trimmed mean need the individual updates: SecAgg+ is off for them.
    try:
        clear_only = not get_strategy(args.strategy, **strategy_options).secure_compatible
    except ConfigError as exc:
        parser.error(str(exc))
    if clear_only and args.dp in ("central", "distributed", "sample_distributed"):
        parser.error(
            f"--strategy {args.strategy} needs every update in the clear; --dp {args.dp} "
            "only shows the server their sum (use --dp sample or none)"
        )
    table = args.data not in ("breast_cancer", "lesions")
    if not table and (args.label_column != "label" or args.patient_id_column is not None):
        parser.error("--label-column and --patient-id-column go with --data FILE.csv")
    noise = args.noise_multiplier
    if noise is None:
        # Precomputed so the demo starts at once: z = 1.82 with q = 0.2 and 5 steps per
        # round gives epsilon 3.97 at delta 1e-5 after 10 rounds (the server reports it).
        noise = 0.0 if args.epsilon > 0 or args.dp != "sample" else 1.82
    lr = args.lr
    if args.dp == "sample" and lr is None:
        lr = 0.5
    opts = SimulationOptions(
        # Torch sites start slowly; stages still close as soon as every site has answered.
        train_deadline=300.0 if images else 30.0,
        evaluate_deadline=120.0 if images else 15.0,
        clients=args.clients,
        rounds=args.rounds,
        partition=args.partition,
        alpha=args.alpha,
        model=model,
        hidden=tuple(args.hidden),
        seed=args.seed,
        epochs=args.epochs,
        batch_size=args.batch_size,
        learning_rate=0.1 if lr is None else lr,
        min_clients=args.min_clients,
        dp=args.dp,
        epsilon=args.epsilon,
        noise_multiplier=noise,
        epsilon_budget=args.epsilon_budget,
        clip_norm=args.clip_norm,
        sampling_rate=args.sampling_rate,
        secagg=not args.no_secagg and args.dp != "central" and not clear_only,
        strategy=args.strategy,
        extra_strategy=strategy_options,
        data=args.data,
        image_size=args.image_size,
        patients_per_site=args.patients_per_site,
        release=args.release,
        label_column=args.label_column,
        patient_id_column=args.patient_id_column,
    )
    try:
        if args.backend == "ray":
            from confide_server.simulate_ray import run_from_args

            return run_from_args(args, opts)
        return run_simulation(args.out, opts, plot=args.plot, timeout=args.timeout)
    except ConfigError as exc:
        if opts.secagg and "[secagg] is infeasible" in str(exc):
            raise ConfigError(f"{exc}; here: pass --clients 3 or more, or --no-secagg") from None
        raise
