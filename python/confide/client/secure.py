"""Client side of SecAgg+ rounds: one :class:`~confide.secagg.ClientSecAgg` per round.

:class:`SecureParticipant` turns the server's secure tasks (``advertise``, ``share``,
``mask``, ``consistency``, ``unmask``) into protocol messages. Everything secret (the X25519
seeds, the self-mask seed, the shares received) lives in memory only, in the round's
``ClientSecAgg``; a client restarted mid-round has lost it and simply drops out of that
round (the server goes on without it if at least ``t`` clients are left).

**Distributed DP** (``task["privacy"]["mode"] == "distributed"``): the round's setup uses
ring inputs (``params.encoding == "ring"``). The client recomputes the DDG parameters from the
round's public SecAgg+ parameters (``n``, ``min_survivors``, ``corrupt``, ring bits) and the
shipped ``C`` and ``z``, and refuses a round whose shipped parameters differ (so its noise
share is calibrated for the worst case the protocol enforces, whatever the server says). At
``mask`` it encodes its update with :func:`~confide.privacy.client_dp.ddg_encode` (clip,
public per-round rotation, scale, conditional rounding, its discrete Gaussian noise share,
reduction mod ``2**bits``) and masks it with **weight 1**: client-level DP needs uniform
weights (weighting by sample count would raise the sensitivity and reveal the count).

**Distributed patient-level DP-SGD** (``"sample_distributed"``): the same ring inputs, one
DP-SGD step per round. The client re-derives the round's
:class:`~confide.privacy.distributed_dpsgd.SampleDDGParams` from the setup's public SecAgg+
parameters and the shipped ``C``, ``z``, ``q`` and site bound ``B``
(:func:`~confide.privacy.distributed_dpsgd.rederive`) and refuses a mismatch; its background
job (:func:`confide.client.training.sample_ddg_step`) computes the ring vector (its noised sum
of clipped per-patient gradients), which is masked with weight 1 as it is.

**Certified peers.** Under the site policy's default ``peer_trust = "consortium"`` every
cohort member's identity key must be certified by the consortium root the site was
provisioned with (:meth:`~confide.client.policy.SitePolicy.check_peers`, before anything is
signed): a server cannot place ids whose keys it holds in the cohort. Only with the explicit
development opt-in ``peer_trust = "tofu"`` (or without a policy) are peers' keys pinned on
first use in ``peers.json`` instead (public keys only): a round that announces another key
for a known client id is refused, so a server cannot swap a peer's identity after the fact,
but it can enrol new ones.

**One advertisement per round.** Keys are drawn once per round: a second ``advertise``
task for the same round and setup gets the very same signed advertisement back, and one
for the same round with another setup, for a round this client already left, or for an
earlier round is refused. The graph seed is the session id, a hash of the round's setup and
of every signed advertisement, so a server cannot re-roll the neighbour graph by asking an
honest site for fresh keys (what remains is in ``docs/security.md``).

**Task binding.** The advertisement signs the hash of the whole ``advertise`` task
(:meth:`~confide.protocol.tasks.SecureTask.task_sha256`: model, training config, privacy and
SecAgg+ parameters, cohort, round, seed). A site whose peers were given another task
(say a learning rate of ``1e-9`` for everybody but one site, which would make the secure sum
equal that site's update) aborts at ``share`` with ``task-mismatch``: nothing masked leaves
it.

**Site policy.** With a :class:`~confide.client.policy.SitePolicy` the advertise task is
checked before anything is signed: the SecAgg+ parameters against the site's own threat
model and minimum cohort, the privacy mode, delta and job epsilon (recomputed from the
re-derived noise parameters); a violation raises :class:`~confide.errors.PolicyViolation`.
"""

from __future__ import annotations

import base64
import json
import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from numpy.typing import NDArray

from confide._fsio import write_atomic
from confide.errors import IntegrityError
from confide.noise import SecureRng
from confide.protocol.tasks import PrivacyTask, SecureTask, TrainConfig, parse_task
from confide.secagg import ClientSecAgg, RoundSetup, SecAggAbortError

if TYPE_CHECKING:
    from confide.client.policy import PrivacyLedger, SitePolicy
    from confide.privacy.accountant import PrivacyEvent
    from confide.privacy.client_dp import DDGParams
    from confide.privacy.distributed_dpsgd import SampleDDGParams

__all__ = ["RngFactory", "SecureParticipant"]

_PINS_FILE = "peers.json"

#: Makes the generator of one round's protocol randomness: called with a purpose
#: (``"secagg"``: seeds, Shamir coefficients, nonces; ``"ddg"``: the distributed-DP noise
#: share) and the round id. The default draws a fresh OS-keyed :class:`SecureRng` every
#: time; tests inject a seeded factory through the constructor to recompute secrets.
RngFactory = Callable[[str, int], SecureRng]


def _os_rng(_purpose: str, _round_id: int) -> SecureRng:
    return SecureRng()


class SecureParticipant:
    """One client's SecAgg+ rounds.

    Parameters
    ----------
    client_id : str
        This client's enrolled id.
    identity_key : Ed25519PrivateKey
        Its enrolled identity key (signs the advertisements).
    state_dir : Path
        Client folder; ``peers.json`` (pinned public keys) is kept there.
    rng_factory : RngFactory, optional
        Source of each round's protocol randomness; OS-keyed by default. Only tests pass
        one (a seeded factory makes a run reproducible and its secrets recomputable).
    policy : SitePolicy, optional
        The site's policy; every advertise task is checked against it (with ``ledger``).
    ledger : PrivacyLedger, optional
        The rounds this site already contributed to (for the job's epsilon).
    """

    def __init__(
        self,
        client_id: str,
        identity_key: Ed25519PrivateKey,
        state_dir: Path,
        *,
        rng_factory: RngFactory | None = None,
        policy: SitePolicy | None = None,
        ledger: PrivacyLedger | None = None,
    ) -> None:
        self.client_id = client_id
        self._rng_factory: RngFactory = rng_factory or _os_rng
        self._identity = identity_key
        self._pins_path = Path(state_dir) / _PINS_FILE
        self._rounds: dict[int, ClientSecAgg] = {}
        self._ddg: dict[int, tuple[DDGParams, bytes]] = {}
        self._sddg: dict[int, SampleDDGParams] = {}
        self._policy = policy
        self._ledger = ledger
        self._events: dict[int, PrivacyEvent | None] = {}
        # What the round's privacy event is computed from (at mask, by check_budget).
        self._inputs: dict[
            int,
            tuple[PrivacyTask | None, TrainConfig | None, SampleDDGParams | None, DDGParams | None],
        ] = {}
        # The one advertisement of the latest round: (round, setup + task digest, message).
        self._advert: tuple[int, bytes, dict[str, Any]] | None = None

    def known(self, round_id: int) -> bool:
        """Whether this process holds the protocol state of ``round_id``."""
        return round_id in self._rounds

    def _pin(self, setup: RoundSetup) -> None:
        pins: dict[str, str] = {}
        if self._pins_path.exists():
            pins = json.loads(self._pins_path.read_text())
        changed = False
        for cid, raw in setup.identity_keys:
            key = base64.b64encode(raw).decode()
            if cid in pins and pins[cid] != key:
                raise IntegrityError(
                    f"round {setup.round} announces another identity key for {cid!r} than "
                    "the one pinned earlier"
                )
            if cid not in pins:
                pins[cid] = key
                changed = True
        if changed:
            text = json.dumps(pins, indent=1, sort_keys=True) + "\n"
            write_atomic(self._pins_path, text.encode(), sync_dir=True)

    def advertise(self, task: SecureTask | Mapping[str, Any]) -> dict[str, Any]:
        """Start a round from its ``advertise`` task; return the signed advertisement.

        Raises
        ------
        IntegrityError
            The setup names another model than the task, or a pinned key changed.
        PolicyViolation
            A cohort member is not certified by this site's consortium root, or the cohort
            holds fewer than ``min_certified_sites`` certified sites.
        SecAggAbortError
            The setup does not include this client with its enrolled key.
        """
        task = _secure_task(task)
        if task.stage != "advertise":
            raise IntegrityError(f"expected an advertise task, got {task.stage!r}")
        setup = RoundSetup.from_json(task.payload)
        if setup.round != task.round or setup.model_sha256.hex() != task.model_sha256:
            raise IntegrityError("the secure round's setup names another round or model")
        if self._policy is None or self._policy.peer_trust == "tofu":
            self._pin(setup)
        # The setup and the rest of the task: a re-sent advertise with another training
        # config is another task, not a retry (the signed advertisement binds the first).
        task_digest = task.task_sha256()  # once: the canonical JSON of a cohort's task
        digest = setup.digest() + task_digest
        if self._advert is not None and setup.round <= self._advert[0]:
            last, last_digest, last_msg = self._advert
            if setup.round == last and digest == last_digest and last in self._rounds:
                return last_msg  # the same keys: a re-asked advertise cannot re-roll the graph
            why = (
                "another setup or task"
                if setup.round == last and digest != last_digest
                else "a round this client already left"
                if setup.round == last
                else f"an earlier round than {last}"
            )
            raise IntegrityError(
                f"a second advertise task for round {setup.round} ({why}); one advertisement "
                "per round"
            )
        sddg = _check_sample_ddg(setup, task.privacy)
        ddg = None if sddg is not None else _check_ddg(setup, task.privacy)
        if self._policy is not None:
            from confide.client.policy import PrivacyLedger

            self._policy.check_secagg(setup.params)
            self._policy.check_consistency_check(setup.consistency_check)
            if setup.consistency_check:
                _check_quorum(setup, self._policy)
            self._policy.check_round(
                task.privacy,
                task.config,
                self._ledger if self._ledger is not None else PrivacyLedger(self._pins_path.parent),
                secure=True,
                sample_ddg=sddg,
                ddg=None if ddg is None else ddg[0],
                account_now=False,  # at mask: see check_budget
            )
            # Last of the checks, still before anything is signed: every peer certified.
            self._policy.check_peers(
                setup.identity_keys, task.certificates, state_dir=self._pins_path.parent
            )
        # Keep only the current round: earlier rounds are over (their secrets go with them).
        for earlier in self._rounds.values():
            earlier.discard()
        self._rounds.clear()
        self._ddg.clear()
        self._sddg.clear()
        self._events.clear()
        self._inputs.clear()
        if ddg is not None:
            self._ddg[setup.round] = ddg
        if sddg is not None:
            self._sddg[setup.round] = sddg
        self._inputs[setup.round] = (
            task.privacy,
            task.config,
            sddg,
            None if ddg is None else ddg[0],
        )
        rng = self._rng_factory("secagg", setup.round)
        # The whole task as this site received it is signed with the advertisement; a peer
        # given another model, config or privacy parameters makes every site abort.
        client = ClientSecAgg(
            setup, self.client_id, self._identity, rng=rng, task_sha256=task_digest
        )
        self._rounds[setup.round] = client
        msg = client.advertise().to_json()
        self._advert = (setup.round, digest, msg)
        return msg

    def check_budget(self, round_id: int) -> None:
        """Refuse to release ``round_id``'s update past the policy's epsilon budget.

        Called before the masked input is built (the checks at ``advertise`` are the cheap
        ones; the job's epsilon is accounted here).

        Raises
        ------
        PolicyViolation
            The job's epsilon, recomputed by the site, exceeds ``max_epsilon``.
        """
        privacy, config, sddg, ddg = self._inputs.get(round_id, (None, None, None, None))
        if self._policy is None or privacy is None:
            return
        from confide.client.policy import PrivacyLedger

        ledger = self._ledger if self._ledger is not None else PrivacyLedger(self._pins_path.parent)
        event = self._policy.round_event(privacy, config, sddg, ddg)
        self._policy.check_epsilon(privacy, event, ledger)
        self._events[round_id] = event

    def round_event(self, round_id: int) -> PrivacyEvent | None:
        """Return the privacy event the site releases in ``round_id`` (its masked input)."""
        return self._events.get(round_id)

    def sample_ddg(self, round_id: int) -> SampleDDGParams | None:
        """Return the checked distributed DP-SGD parameters of a round (``None``: other mode)."""
        return self._sddg.get(round_id)

    def answer(
        self,
        task: SecureTask | Mapping[str, Any],
        update: NDArray[np.float32] | None = None,
        weight: int = 0,
    ) -> dict[str, Any]:
        """Answer a ``share``, ``mask``, ``consistency`` or ``unmask`` task.

        Parameters
        ----------
        task : dict
            The server's task.
        update : numpy.ndarray, optional
            For ``mask``: the flat float32 model delta (clipped here to ``clip_range``; in a
            distributed-DP round DDG-encoded instead, see the module docstring).
        weight : int
            For ``mask``: the number of training examples (capped at ``max_weight``);
            ignored in a distributed-DP round, which masks weight 1 (uniform weights).

        Raises
        ------
        SecAggAbortError
            The request is inconsistent; the round's secrets are wiped.
        KeyError
            This process holds no state for the round (it restarted).
        """
        task = _secure_task(task)
        round_id, stage, payload = task.round, task.stage, task.payload
        client = self._rounds[round_id]
        try:
            if stage == "share":
                return client.share_keys(payload).to_json()
            if stage == "mask":
                if update is None:
                    raise IntegrityError("a mask task needs this round's update; none was trained")
                p = client.setup.params
                sddg = self._sddg.get(round_id)
                if sddg is not None:
                    # Distributed DP-SGD: the site's ring vector (already noised), weight 1.
                    vec = np.asarray(update)
                    if vec.dtype.kind != "u" or vec.shape != (sddg.dim,):
                        raise IntegrityError(
                            "a distributed DP-SGD round masks the site's ring vector "
                            f"(unsigned, ({sddg.dim},)), got {vec.dtype} {vec.shape}"
                        )
                    msg = client.masked_input(
                        payload, vec, 1, model_sha256=client.setup.model_sha256
                    )
                    return msg.to_json()
                ddg = self._ddg.get(round_id)
                if ddg is not None:
                    from confide.privacy.client_dp import ddg_encode

                    # Distributed DP: the noised ring vector, uniform weight 1.
                    ring = ddg_encode(update, ddg[0], ddg[1], rng=self._ddg_rng(round_id))
                    msg = client.masked_input(
                        payload, ring, 1, model_sha256=client.setup.model_sha256
                    )
                    return msg.to_json()
                clipped = np.clip(update, -p.clip_range, p.clip_range).astype(np.float32)
                msg = client.masked_input(
                    payload,
                    clipped,
                    min(int(weight), p.max_weight),
                    model_sha256=client.setup.model_sha256,
                )
                return msg.to_json()
            if stage == "consistency":
                return client.consistency_check(payload).to_json()
            if stage == "unmask":
                return client.unmask(payload).to_json()
        except SecAggAbortError:
            self.finish(round_id)
            raise
        raise IntegrityError(f"not a secure stage: {stage!r}")

    def _ddg_rng(self, round_id: int) -> SecureRng:
        return self._rng_factory("ddg", round_id)

    def mask_precompute(self, round_id: int) -> Callable[[], int] | None:
        """Return the job that derives ``round_id``'s mask seeds ahead of the mask stage.

        Run it (in a worker thread if the caller likes) after the share upload, while the
        site waits for the ``mask`` task: :meth:`ClientSecAgg.precompute_masks`. ``None``
        when this process holds no state for the round.
        """
        client = self._rounds.get(round_id)
        return None if client is None else client.precompute_masks

    def finish(self, round_id: int) -> None:
        """Forget a round (its secrets with it: zeroed now, not when collected)."""
        client = self._rounds.pop(round_id, None)
        if client is not None:
            client.discard()
        self._ddg.pop(round_id, None)
        self._sddg.pop(round_id, None)


def _secure_task(task: SecureTask | Mapping[str, Any]) -> SecureTask:
    """Return the typed task (a JSON mapping is parsed strictly, once)."""
    if isinstance(task, SecureTask):
        return task
    parsed = parse_task(dict(task))
    if not isinstance(parsed, SecureTask):
        raise IntegrityError(f"not a secure-stage task: {parsed.action!r}")
    return parsed


def _check_quorum(setup: RoundSetup, policy: SitePolicy) -> None:
    """Refuse a roster quorum computed for fewer colluders than the site assumes.

    The quorum ``floor((n + corrupt) / 2) + 1`` makes the unmask roster unique only if at
    most ``corrupt`` cohort members sign for the server; a server announcing a smaller
    ``corrupt`` than the site's own ``ceil(adversarial_fraction * n)`` would lower it.

    Raises
    ------
    PolicyViolation
        ``params.corrupt`` below the site's own count.
    """
    from confide.errors import PolicyViolation
    from confide.secagg import ThreatModel

    p = setup.params
    mine = ThreatModel(policy.adversarial_fraction, policy.dropout_fraction).corrupt(p.n)
    if p.corrupt < mine:
        raise PolicyViolation(
            f"the round's roster quorum assumes {p.corrupt} colluding sites of {p.n}, fewer "
            f"than the site policy's adversarial_fraction {policy.adversarial_fraction:g} "
            f"({mine}); the quorum must be at least {(p.n + mine) // 2 + 1}"
        )


def _check_sample_ddg(setup: RoundSetup, privacy: PrivacyTask | None) -> SampleDDGParams | None:
    """Validate a distributed DP-SGD round; return its re-derived parameters (or ``None``).

    Raises
    ------
    IntegrityError
        Parameters that differ from those derived from the round's public SecAgg+
        parameters, or a setup that is not a weight-1 ring of the model's length.
    """
    if privacy is None or privacy.mode != "sample_distributed":
        return None
    from confide.privacy.distributed_dpsgd import rederive

    p = setup.params
    mine = rederive(
        dict(privacy.sample_ddg or {}),
        num_sites=p.n,
        min_survivors=p.min_survivors,
        max_colluding=p.corrupt,
        bits=p.modulus_bits,
    )
    if p.encoding != "ring" or p.max_weight != 1 or setup.vector_length != mine.dim:
        raise IntegrityError(
            "the secure round's setup does not match its distributed DP-SGD parameters "
            f"(need ring inputs of length {mine.dim} with weight 1)"
        )
    return mine


def _check_ddg(setup: RoundSetup, privacy: PrivacyTask | None) -> tuple[DDGParams, bytes] | None:
    """Validate a distributed-DP round; return its DDG parameters and rotation seed.

    The parameters are recomputed here from the setup's public SecAgg+ parameters and the
    shipped ``C``, ``z``, ``beta`` and relation; shipped values that differ are refused.

    Raises
    ------
    IntegrityError
        Ring encoding without DDG parameters (or the reverse), or inconsistent parameters.
    """
    p = setup.params
    distributed = privacy is not None and privacy.mode == "distributed"
    if not distributed:
        if p.encoding == "ring":
            raise IntegrityError("the round uses ring inputs but ships no DDG parameters")
        return None
    if privacy is None:  # unreachable: distributed implies privacy; kept under -O
        raise IntegrityError("distributed DP round without privacy parameters")
    from confide.errors import InvalidPrivacyConfig
    from confide.privacy.client_dp import DDGParams, calibrate_ddg, ddg_config_for, padded_dim

    try:
        shipped = DDGParams(**(privacy.ddg or {}))
        seed = bytes.fromhex(str(privacy.rotation_seed))
        mine = calibrate_ddg(
            ddg_config_for(
                p,
                dim=int(shipped.dim),
                clip_norm=float(shipped.clip_norm),
                noise_multiplier=float(shipped.noise_multiplier),
                bits=p.modulus_bits,
                beta=float(shipped.beta),
                relation=shipped.relation,
            )
        )
    except (KeyError, TypeError, ValueError, InvalidPrivacyConfig) as exc:
        raise IntegrityError(f"bad distributed-DP parameters: {exc}") from None
    if (
        p.encoding != "ring"
        or p.max_weight != 1
        or setup.vector_length != mine.padded_dim
        or mine.padded_dim != padded_dim(mine.dim)
        or len(seed) != 32
    ):
        raise IntegrityError("the secure round's setup does not match its DDG parameters")
    for key, value in mine.to_dict().items():
        other = getattr(shipped, key)
        same = (
            math.isclose(value, other, rel_tol=1e-9, abs_tol=0.0)
            if isinstance(value, float)
            else value == other
        )
        if not same:
            raise IntegrityError(
                f"the shipped DDG parameter {key}={other!r} differs from {value!r} derived "
                "from the round's public parameters"
            )
    return mine, seed
