"""The site policy: what a site insists on, whatever the server's task says.

The server decides nothing about a site's protection. A site owns a small TOML file
(``site-policy.toml``) that it passes to ``confide client --policy FILE`` or to
``Client(policy=SitePolicy.load(path))``; every task is checked against it *before* anything
is trained or uploaded, and a task outside it is refused with a
:class:`~confide.errors.PolicyViolation` (logged; the client stops taking part in the job).

The defaults are strict: secure aggregation and differential privacy are required unless the
site opts out explicitly (``allow_plain = true``, ``allow_no_dp = true``). A policy file::

    # site-policy.toml: owned by the site, never by the server
    allow_plain = false              # require SecAgg+ secure aggregation
    allow_no_dp = false              # require differential privacy ...
    dp_kinds = ["sample", "sample_distributed", "distributed"]   # ... of one of these kinds
    max_epsilon = 10.0               # over the whole job, at delta <= max_delta
    max_delta = 1e-5
    min_cohort_size = 3              # smallest secure cohort the site joins
    adversarial_fraction = 0.1       # the threat model the site assumes (SecAgg+ must be
    dropout_fraction = 0.1           #   private against it at 2^-security_bits)
    security_bits = 40
    architectures = ["logistic", "mlp"]   # manifest spec "arch" (torch) or "kind" (numpy);
                                          # omit to accept any architecture
    peer_trust = "consortium"        # peers must hold a certificate from this root ...
    consortium_root = "root.json"    # ... (relative paths: from this file's folder)
    min_certified_sites = 3          # distinct certified sites per secure cohort
    revocation_list = "revoked.json" # the root's list of revoked certificates (optional)
    require_consistency_check = false   # true: join only malicious-server-mode rounds

**Certified peers.** With ``peer_trust = "consortium"`` (the default) every cohort member of a
secure round must present a site certificate (:mod:`confide.protocol.certs`) signed by the
consortium root the site was provisioned with (``consortium_root``), for its own id and the
identity key the server announces, and the cohort must hold at least ``min_certified_sites``
distinct certified sites; otherwise the round is refused before anything is signed or
uploaded. A server that enrols ids whose keys it holds cannot get them certified.

**Revoked certificates.** ``revocation_list`` names the consortium's ``revoked.json``
(``confide provision revoke``; relative paths from the policy file's folder). The list must
be signed by the site's root, and not be older than the newest the site has seen (the
version is kept in ``revocation-seen.json`` in the state folder: rollback protection); a
cohort holding a revoked certificate is refused like an uncertified one, before anything is
signed. A list that cannot be read or verified refuses the round (fail closed). The operator
distributes each new list to every site (docs/operations.md).
``peer_trust = "tofu"`` (trust on first use: keys pinned in ``peers.json``, no certificate)
is for development only: it lets the server place Sybils in the cohort.

**Malicious-server mode.** ``require_consistency_check = true`` makes the site join only
secure rounds with SecAgg+'s consistency check (``[secagg] consistency_check = true`` on the
server), whose signature quorum ``floor((n + C) / 2) + 1`` makes the unmask roster unique
(docs/security.md, section 5); a server that turns the check off (semi-honest mode, where a
split view at unmask is possible) is refused. Off by default: without it SecAgg+ holds
against a semi-honest server, and the DP the default policy requires is what protects the
site's data against a malicious one.

**Epsilon over the job.** A task carries the DP parameters of its round and the job's
planned rounds (``PrivacyTask.rounds``); the site recomputes the epsilon itself from what it
can check (for ``sample``: ``q``, ``z`` and the steps of the task; for the distributed modes:
the noise parameters it re-derives from the round's public SecAgg+ parameters) and composes
it with its own ledger of the rounds it already contributed to (``privacy-ledger.json`` in
its state folder). A task is refused when ``epsilon(ledger + this round x max(1, planned
rounds - rounds done))`` exceeds ``max_epsilon``: a server that announces fewer rounds than it
runs still cannot take the site past its budget, because every round is checked against
what the site has already released.

**``central`` mode gives no protection from the server**: the server adds the noise, so a
server that skips it sees the clipped update in clear. It is refused unless the site lists
it in ``dp_kinds`` (and, since it runs without secure aggregation, sets ``allow_plain``);
its epsilon cannot be checked by the site (the task carries no noise multiplier).

**SecAgg+ parameters.** For a secure round the site takes the announced cohort size ``n``
and dropout budget ``D`` and checks, with its *own* threat model: ``n >= min_cohort_size``;
``D <= floor(dropout_fraction * n)``; and the announced ``(k, t)`` meets
``2^-security_bits`` privacy against ``C = ceil(adversarial_fraction * n)`` colluders and
``D`` dropouts with the same bound the server's derivation uses
(:func:`confide.secagg.params.assess`). It also derives its own ``(k, t)``
(:func:`confide.secagg.params.derive_params`, the server's ``[secagg]`` derivation) and
names it in the refusal. A ring graph with ``k = 2`` at ``n = 10`` or a cohort of 2 is
refused.
"""

from __future__ import annotations

import json
import math
import sys
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from confide._fsio import write_atomic
from confide.errors import (
    ConfigError,
    InfeasibleConfigError,
    PolicyViolation,
    PrivacyStateError,
)
from confide.protocol.tasks import PRIVACY_MODES, PrivacyTask, TrainConfig

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

if TYPE_CHECKING:
    from confide.privacy.accountant import PrivacyEvent
    from confide.privacy.client_dp import DDGParams
    from confide.privacy.distributed_dpsgd import SampleDDGParams
    from confide.protocol.certs import ConsortiumRoot, RevocationList
    from confide.protocol.manifest import Manifest
    from confide.secagg import SecAggParams

__all__ = ["PrivacyLedger", "SitePolicy", "architecture_of"]

_DEFAULT_KINDS = ("sample", "sample_distributed", "distributed")
_PEER_TRUST = ("consortium", "tofu")
_LEDGER_FILE = "privacy-ledger.json"
#: Serialises SitePolicy.warm_up within a process (the accountant caches its answer).
_WARM_UP_LOCK = threading.Lock()


def architecture_of(manifest: Manifest) -> str:
    """Return a manifest's architecture name: ``spec["arch"]`` (torch) or ``spec["kind"]``.

    Examples
    --------
    >>> from confide.protocol.manifest import Manifest, TensorSpec
    >>> architecture_of(Manifest((TensorSpec("w", (2,)),), {"kind": "logistic"}))
    'logistic'
    """
    spec = manifest.spec
    name = spec.get("arch", spec.get("kind"))
    return str(name) if name is not None else "unknown"


@dataclass(frozen=True)
class SitePolicy:
    """What a site requires of every task (strict by default).

    Parameters
    ----------
    allow_plain : bool, default False
        Accept rounds without secure aggregation (the server then sees this site's update).
    allow_no_dp : bool, default False
        Accept rounds without differential privacy.
    dp_kinds : tuple of str, default ("sample", "sample_distributed", "distributed")
        Privacy modes accepted; ``"central"`` (server-side noise: no protection from the
        server) only when listed.
    max_epsilon : float, default 10.0
        Largest epsilon over the whole job (at ``max_delta``) the site accepts.
    max_delta : float, default 1e-5
        Largest delta accepted.
    min_cohort_size : int, default 3
        Smallest SecAgg+ cohort the site joins.
    adversarial_fraction, dropout_fraction : float, default 0.1
        The threat model the site assumes; SecAgg+ parameters must be private against it.
    security_bits : int, default 40
        Privacy target ``2^-security_bits`` of the SecAgg+ parameters.
    architectures : tuple of str, optional
        Model architectures (:func:`architecture_of`) the site trains; ``None``: any.
    peer_trust : str, default "consortium"
        ``"consortium"``: peers need a certificate from ``consortium_root``; ``"tofu"``:
        pin peers' keys on first use (development only: no defence against Sybils).
    consortium_root : str, optional
        Path of the consortium's ``root.json`` (required for secure rounds with
        ``peer_trust = "consortium"``).
    min_certified_sites : int, default 3
        Fewest distinct certified sites (this one included) in a secure cohort.
    revocation_list : str, optional
        Path of the consortium's signed revocation list (``revoked.json``); peers it
        revokes are refused. Needs ``peer_trust = "consortium"``.
    require_consistency_check : bool, default False
        Join only secure rounds with the consistency check (malicious-server mode: a unique
        unmask roster); refuse semi-honest-mode rounds.

    Examples
    --------
    >>> SitePolicy().allow_plain, SitePolicy().max_epsilon
    (False, 10.0)
    >>> SitePolicy.from_dict({"allow_plain": True, "allow_no_dp": True}).allow_no_dp
    True
    """

    allow_plain: bool = False
    allow_no_dp: bool = False
    dp_kinds: tuple[str, ...] = _DEFAULT_KINDS
    max_epsilon: float = 10.0
    max_delta: float = 1e-5
    min_cohort_size: int = 3
    adversarial_fraction: float = 0.1
    dropout_fraction: float = 0.1
    security_bits: int = 40
    architectures: tuple[str, ...] | None = None
    peer_trust: str = "consortium"
    consortium_root: str | None = None
    min_certified_sites: int = 3
    require_consistency_check: bool = False
    revocation_list: str | None = None

    def __post_init__(self) -> None:
        if self.peer_trust not in _PEER_TRUST:
            raise ConfigError(
                f"policy.peer_trust must be one of {list(_PEER_TRUST)}, got {self.peer_trust!r}"
            )
        if self.consortium_root is not None and (
            not isinstance(self.consortium_root, str) or not self.consortium_root
        ):
            raise ConfigError("policy.consortium_root must be the path of a root.json")
        if self.revocation_list is not None:
            if not isinstance(self.revocation_list, str) or not self.revocation_list:
                raise ConfigError("policy.revocation_list must be the path of a revoked.json")
            if self.peer_trust != "consortium":
                raise ConfigError(
                    'policy.revocation_list needs peer_trust = "consortium" (it revokes '
                    "consortium certificates)"
                )
        mc = self.min_certified_sites
        if not isinstance(mc, int) or isinstance(mc, bool) or mc < 1:
            raise ConfigError(f"policy.min_certified_sites must be an int >= 1, got {mc!r}")
        for name in ("allow_plain", "allow_no_dp", "require_consistency_check"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"policy.{name} must be true or false")
        kinds = self.dp_kinds
        if isinstance(kinds, list):
            object.__setattr__(self, "dp_kinds", tuple(kinds))
        if not all(k in PRIVACY_MODES for k in self.dp_kinds):
            raise ConfigError(
                f"policy.dp_kinds must be a list of {list(PRIVACY_MODES)}, got {kinds!r}"
            )
        if isinstance(self.architectures, list):
            object.__setattr__(self, "architectures", tuple(self.architectures))
        if self.architectures is not None and not all(
            isinstance(a, str) and a for a in self.architectures
        ):
            raise ConfigError(f"policy.architectures must be a list of names: {kinds!r}")
        eps, delta = self.max_epsilon, self.max_delta
        if not _number(eps) or eps <= 0.0:
            raise ConfigError(f"policy.max_epsilon must be a finite number > 0, got {eps!r}")
        if not _number(delta) or not 0.0 <= delta < 1.0:
            raise ConfigError(f"policy.max_delta must be in [0, 1), got {delta!r}")
        m = self.min_cohort_size
        if not isinstance(m, int) or isinstance(m, bool) or m < 2:
            raise ConfigError(f"policy.min_cohort_size must be an int >= 2, got {m!r}")
        for name in ("adversarial_fraction", "dropout_fraction"):
            v = getattr(self, name)
            if not _number(v) or not 0.0 <= v < 1.0:
                raise ConfigError(f"policy.{name} must be in [0, 1), got {v!r}")
        b = self.security_bits
        if not isinstance(b, int) or isinstance(b, bool) or not 1 <= b <= 128:
            raise ConfigError(f"policy.security_bits must be an int in [1, 128], got {b!r}")

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any]) -> SitePolicy:
        """Build a policy from a mapping (strict: unknown keys are an error).

        Raises
        ------
        ConfigError
            Unknown keys or invalid values.
        """
        names = {f.name for f in fields(cls)}
        unknown = set(doc) - names
        if unknown:
            raise ConfigError(
                f"unknown site-policy keys {sorted(unknown)}; expected some of {sorted(names)}"
            )
        kw = dict(doc)
        for name in ("max_epsilon", "max_delta", "adversarial_fraction", "dropout_fraction"):
            if isinstance(kw.get(name), int) and not isinstance(kw.get(name), bool):
                kw[name] = float(kw[name])
        return cls(**kw)

    @classmethod
    def load(cls, path: str | Path) -> SitePolicy:
        """Read a ``site-policy.toml`` (strictly; see the module docstring).

        Raises
        ------
        ConfigError
            The file cannot be read or parsed, or holds unknown keys or invalid values.
        """
        p = Path(path)
        try:
            doc = tomllib.loads(p.read_text())
        except OSError as exc:
            raise ConfigError(f"cannot read the site policy {p}: {exc.strerror or exc}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"the site policy {p} is not valid TOML: {exc}") from None
        for name in ("consortium_root", "revocation_list"):
            value = doc.get(name)
            if isinstance(value, str) and value and not Path(value).is_absolute():
                doc[name] = str((p.parent / value).resolve())
        try:
            return cls.from_dict(doc)
        except ConfigError as exc:
            raise ConfigError(f"{p}: {exc.message}") from None

    def to_toml(self) -> str:
        """Return the policy as a ``site-policy.toml`` text (what :meth:`load` reads)."""
        lines = []
        for f in fields(self):
            value = getattr(self, f.name)
            if value is None:
                continue
            lines.append(f"{f.name} = {_toml_value(value)}")
        return "\n".join(lines) + "\n"

    def warm_up(self) -> None:
        """Import and exercise the accountant once, if this policy will need it.

        A site that requires DP checks every round's epsilon; loading dp-accounting takes
        seconds, so the client calls this in the background when it starts. A missing
        ``confide[privacy]`` is reported by the first check, not here.
        """
        if self.allow_no_dp and set(self.dp_kinds) <= {"central"}:
            return
        try:
            from confide.privacy.accountant import account, dpsgd_event

            # One at a time per process: many clients in one process (the Ray simulation's
            # actors) would otherwise all compute the same cached PLD at once.
            with _WARM_UP_LOCK:
                account([dpsgd_event(0.5, 1.0, 2)], 1e-5)
        except Exception:  # a broken accountant is reported by the checks themselves
            return

    # -- checks ------------------------------------------------------------------------
    def check_model(self, manifest: Manifest) -> None:
        """Refuse a job whose model architecture the site does not train."""
        if self.architectures is None:
            return
        arch = architecture_of(manifest)
        if arch not in self.architectures:
            raise PolicyViolation(
                f"the job's model architecture {arch!r} is not in the site policy's "
                f"architectures {list(self.architectures)}"
            )

    def check_plain(self, privacy: PrivacyTask | None) -> None:
        """Refuse a round without secure aggregation unless ``allow_plain``."""
        if not self.allow_plain:
            raise PolicyViolation(
                "the server asks for a round without secure aggregation (it would see this "
                "site's update); the site policy requires SecAgg+ (set allow_plain = true "
                "to opt out)"
            )
        self.check_privacy_kind(privacy)

    def check_privacy_kind(self, privacy: PrivacyTask | None) -> None:
        """Refuse a round without DP (unless ``allow_no_dp``) or of a kind not allowed."""
        if privacy is None:
            if not self.allow_no_dp:
                raise PolicyViolation(
                    "the server asks for a round without differential privacy; the site "
                    "policy requires DP (set allow_no_dp = true to opt out)"
                )
            return
        if privacy.mode not in self.dp_kinds:
            raise PolicyViolation(
                f"the round's privacy mode {privacy.mode!r} is not in the site policy's "
                f"dp_kinds {list(self.dp_kinds)}"
                + (" (central noise is added by the server)" if privacy.mode == "central" else "")
            )
        if privacy.delta > self.max_delta:
            raise PolicyViolation(
                f"the round's delta {privacy.delta:g} exceeds the site policy's max_delta "
                f"{self.max_delta:g}"
            )

    def check_round(
        self,
        privacy: PrivacyTask | None,
        config: TrainConfig | None,
        ledger: PrivacyLedger,
        *,
        secure: bool,
        sample_ddg: SampleDDGParams | None = None,
        ddg: DDGParams | None = None,
        account_now: bool = True,
    ) -> PrivacyEvent | None:
        """Check one round's protections; return the privacy event the site will release.

        Parameters
        ----------
        privacy : PrivacyTask or None
            The task's privacy parameters.
        config : TrainConfig or None
            The task's training config (DP-SGD runs with ``config.dp``).
        ledger : PrivacyLedger
            The rounds this site already contributed to.
        secure : bool
            Whether the round is a SecAgg+ round.
        sample_ddg, ddg : optional
            Distributed modes: the noise parameters the site re-derived from the round's
            public SecAgg+ parameters.
        account_now : bool, default True
            Also check the job's epsilon (:meth:`check_epsilon`). A secure round defers it
            to ``mask``, before the update leaves the site: the advertisement reveals
            nothing about the data, and accounting can take longer than its deadline.

        Raises
        ------
        PolicyViolation
            The round is outside the policy.
        """
        if secure:
            self.check_privacy_kind(privacy)
        else:
            self.check_plain(privacy)
        if privacy is None:
            return None
        _check_consistent(privacy, config, sample_ddg, ddg)
        if not account_now:
            return None
        event = self.round_event(privacy, config, sample_ddg, ddg)
        self.check_epsilon(privacy, event, ledger)
        return event

    @staticmethod
    def round_event(
        privacy: PrivacyTask,
        config: TrainConfig | None,
        sample_ddg: SampleDDGParams | None = None,
        ddg: DDGParams | None = None,
    ) -> PrivacyEvent | None:
        """Return the privacy event of what the site will run (``None`` for ``central``).

        Loads the accountant (dp-accounting); :meth:`check_round` has checked the inputs.
        """
        _check_consistent(privacy, config, sample_ddg, ddg)
        if privacy.mode == "sample":
            from confide.privacy.accountant import dpsgd_event

            dp = privacy.dp
            if dp is None:  # unreachable: _check_consistent refuses it; kept under -O
                raise PolicyViolation("patient-level DP-SGD without its parameters")
            return dpsgd_event(dp.sampling_rate, dp.noise_multiplier, dp.steps)
        if privacy.mode == "sample_distributed" and sample_ddg is not None:
            from confide.privacy.distributed_dpsgd import event

            sampled: PrivacyEvent = event(sample_ddg)
            return sampled
        if privacy.mode == "distributed" and ddg is not None:
            from confide.privacy.client_dp import ddg_event

            return ddg_event(ddg)
        return None  # central: the server adds the noise; nothing the site can check

    def check_epsilon(
        self, privacy: PrivacyTask, round_event: PrivacyEvent | None, ledger: PrivacyLedger
    ) -> float:
        """Refuse a round that would take the site's job epsilon past ``max_epsilon``.

        Parameters
        ----------
        privacy : PrivacyTask
            The round's privacy parameters (``rounds``: the job's planned rounds).
        round_event : PrivacyEvent or None
            This round's event as the site recomputed it; ``None`` for ``central`` (not
            checkable by the site).
        ledger : PrivacyLedger
            The rounds this site already contributed to.

        Returns
        -------
        float
            The epsilon the site computed (``nan`` for ``central``).
        """
        if round_event is None:
            return math.nan
        if privacy.rounds is None:
            raise PolicyViolation(
                "the task does not carry the job's planned rounds, so the site cannot bound "
                "its epsilon over the job"
            )
        from confide.privacy.accountant import account

        ahead = max(1, privacy.rounds - len(ledger.events))
        events = [*ledger.events, *([round_event] * ahead)]
        eps = account(events, privacy.delta, round_event.relation).epsilon
        if not eps <= self.max_epsilon:
            raise PolicyViolation(
                f"the job's epsilon at delta {privacy.delta:g}, recomputed by the site "
                f"({len(ledger.events)} rounds done, {ahead} to go), is {eps:.3g}, above the "
                f"site policy's max_epsilon {self.max_epsilon:g}"
            )
        return float(eps)

    def check_peers(
        self,
        identity_keys: Sequence[tuple[str, bytes]],
        certificates: Mapping[str, Any] | None,
        *,
        now: float | None = None,
        state_dir: Path | None = None,
    ) -> int:
        """Refuse a secure cohort whose members are not certified by this site's root.

        Parameters
        ----------
        identity_keys : sequence of (str, bytes)
            The cohort's ids and raw Ed25519 keys, as the round's setup announces them.
        certificates : mapping, optional
            The certificates the server relayed, by client id (JSON form).
        now : float, optional
            Unix seconds (default: the clock), for expiry.
        state_dir : Path, optional
            The site's state folder, where the newest revocation list version seen is kept
            (rollback protection); without it the list's age is not checked.

        Returns
        -------
        int
            Distinct certified sites in the cohort (0 with ``peer_trust = "tofu"``).

        Raises
        ------
        PolicyViolation
            No root configured, a member without a valid certificate, a revoked member, a
            revocation list that cannot be read, is not the root's or is older than one
            already seen, or fewer than ``min_certified_sites`` certified sites.
        """
        if self.peer_trust == "tofu":
            return 0
        from confide.errors import SignatureError
        from confide.protocol.certs import ConsortiumRoot, verify_certificate

        if self.consortium_root is None:
            raise PolicyViolation(
                'the site policy requires certified peers (peer_trust = "consortium") but '
                "names no consortium_root: set consortium_root to the root.json the site was "
                'provisioned with (confide provision), or peer_trust = "tofu" for development'
            )
        try:
            root = ConsortiumRoot.load(self.consortium_root)
        except ConfigError as exc:
            raise PolicyViolation(f"cannot check peers: {exc.message}") from None
        revoked = self._revocations(root, state_dir)
        certs = certificates or {}
        certified: set[str] = set()
        for cid, key in identity_keys:
            cert = certs.get(cid)
            if cert is None:
                raise PolicyViolation(
                    f"cohort member {cid!r} has no consortium certificate: the site refuses "
                    f"peers not certified by {root.consortium!r}"
                )
            try:
                verify_certificate(cert, root, site_id=cid, identity_key=key, now=now)
            except SignatureError as exc:
                raise PolicyViolation(f"cohort member {cid!r} refused: {exc.message}") from None
            if revoked is not None and (entry := revoked.revocation_of(cid, key)) is not None:
                why = f" ({entry.reason})" if entry.reason else ""
                raise PolicyViolation(
                    f"cohort member {cid!r} refused: its certificate is revoked by the "
                    f"consortium's revocation list version {revoked.version}{why}"
                )
            certified.add(cid)
        if len(certified) < self.min_certified_sites:
            raise PolicyViolation(
                f"the cohort holds {len(certified)} distinct certified sites; the site "
                f"policy requires at least min_certified_sites = {self.min_certified_sites}"
            )
        return len(certified)

    def _revocations(self, root: ConsortiumRoot, state_dir: Path | None) -> RevocationList | None:
        """Load and verify the policy's revocation list (``None`` when it names none)."""
        if self.revocation_list is None:
            return None
        from confide.errors import SignatureError
        from confide.protocol.certs import (
            RevocationList,
            check_revocation_version,
            verify_revocation_list,
        )

        try:
            lst = verify_revocation_list(RevocationList.load(self.revocation_list), root)
            if state_dir is not None:
                check_revocation_version(lst, state_dir)
        except ConfigError as exc:
            raise PolicyViolation(f"cannot check peers: {exc.message}") from None
        except SignatureError as exc:
            raise PolicyViolation(
                f"cannot check peers: the revocation list {self.revocation_list} is refused: "
                f"{exc.message}"
            ) from None
        return lst

    def check_consistency_check(self, consistency_check: bool) -> None:
        """Refuse a semi-honest-mode round when the policy requires the consistency check.

        Raises
        ------
        PolicyViolation
            ``require_consistency_check`` and the round has no consistency check.

        Examples
        --------
        >>> SitePolicy().check_consistency_check(False)
        >>> SitePolicy(require_consistency_check=True).check_consistency_check(True)
        """
        if self.require_consistency_check and not consistency_check:
            raise PolicyViolation(
                "the secure round has no consistency check (semi-honest-server mode: the "
                "server could show sites different rosters at unmask); the site policy "
                "requires it (require_consistency_check = true): the server must set "
                "[secagg] consistency_check = true"
            )

    def check_secagg(self, params: SecAggParams) -> None:
        """Refuse SecAgg+ parameters weaker than the site's own threat model allows."""
        from confide.secagg import ThreatModel, assess, derive_params

        n = params.n
        if n < self.min_cohort_size:
            raise PolicyViolation(
                f"the secure cohort has {n} sites, fewer than the site policy's "
                f"min_cohort_size {self.min_cohort_size}"
            )
        threat = ThreatModel(self.adversarial_fraction, self.dropout_fraction, self.security_bits)
        corrupt, dropouts = threat.corrupt(n), threat.dropouts(n)
        try:
            mine = derive_params(
                n,
                threat,
                quant_bits=params.quant_bits,
                clip_range=params.clip_range,
                max_weight=params.max_weight,
            )
            wanted = f"k = {mine.k}, t = {mine.t}, D <= {mine.max_dropouts}"
        except InfeasibleConfigError as exc:
            wanted = f"none feasible: {exc}"
        if params.max_dropouts > dropouts:
            raise PolicyViolation(
                f"the round tolerates {params.max_dropouts} dropouts of {n}, more than the site "
                f"policy's dropout_fraction {self.dropout_fraction:g} allows ({dropouts}); the "
                f"site derives {wanted}"
            )
        privacy, _ = assess(n, params.k, params.t, corrupt, params.max_dropouts)
        if privacy > -float(self.security_bits):
            raise PolicyViolation(
                f"the round's SecAgg+ parameters (n = {n}, k = {params.k}, t = {params.t}, "
                f"D = {params.max_dropouts}) are not private at 2^-{self.security_bits} "
                f"against {corrupt} colluding sites (adversarial_fraction "
                f"{self.adversarial_fraction:g}); the site derives {wanted}"
            )


def _check_consistent(
    privacy: PrivacyTask,
    config: TrainConfig | None,
    sample_ddg: SampleDDGParams | None,
    ddg: DDGParams | None,
) -> None:
    """Refuse a task whose training differs from the privacy it announces (no imports)."""
    if privacy.mode == "sample":
        dp = None if config is None else config.dp
        if dp is None or dp != privacy.dp:
            raise PolicyViolation(
                "the task announces patient-level DP-SGD but its training config runs "
                f"{'no DP-SGD' if dp is None else 'other DP-SGD parameters'}"
            )
    elif privacy.mode == "sample_distributed" and sample_ddg is None:
        raise PolicyViolation("distributed DP-SGD needs a secure round")
    elif privacy.mode == "distributed" and ddg is None:
        raise PolicyViolation("distributed DP needs a secure round")


class PrivacyLedger:
    """The privacy events of the rounds this site contributed to, kept in its state folder.

    Parameters
    ----------
    state_dir : Path
        The client's folder; the ledger is ``privacy-ledger.json`` there (mode 0600).
    """

    def __init__(self, state_dir: Path) -> None:
        self._path = Path(state_dir) / _LEDGER_FILE
        self._events: list[PrivacyEvent] = []
        self._rounds: list[int] = []
        if self._path.exists():
            from confide.privacy.accountant import PrivacyEvent

            try:
                doc = json.loads(self._path.read_text())
                for entry in doc.get("rounds", []):
                    self._rounds.append(int(entry["round"]))
                    self._events.append(PrivacyEvent.from_dict(entry["event"]))
            except (
                OSError,
                UnicodeDecodeError,
                ValueError,
                KeyError,
                TypeError,
                AttributeError,
            ) as exc:
                raise PrivacyStateError(
                    f"{self._path} (this site's record of the privacy it has spent) is "
                    f"damaged: {exc}. Restore it from a backup; do not delete it, that would "
                    "forget the epsilon this site already spent"
                ) from None

    @property
    def events(self) -> Sequence[PrivacyEvent]:
        """Events recorded so far, one per round contributed."""
        return tuple(self._events)

    def record(self, round_id: int, event: PrivacyEvent | None) -> None:
        """Record that this site released an update for ``round_id`` (once per round)."""
        if event is None or round_id in self._rounds:
            return
        self._rounds.append(round_id)
        self._events.append(event)
        doc = {
            "rounds": [
                {"round": r, "event": e.to_dict()}
                for r, e in zip(self._rounds, self._events, strict=True)
            ]
        }
        self._path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        # Durable before the update it accounts for is sent: a crash must not forget a spend.
        write_atomic(self._path, (json.dumps(doc, indent=1) + "\n").encode(), sync_dir=True)


def _number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, tuple | list):
        return "[" + ", ".join(json.dumps(v) for v in value) + "]"
    if isinstance(value, float):
        return repr(value)
    return json.dumps(value)
