"""Server side of SecAgg+: :class:`ServerSecAgg`, one per round, transport-independent.

The runtime feeds it the messages clients send (``receive_*``) and closes each stage at its
deadline (``close_*``), which declares every client that has not answered *dropped* and
returns what to send next. A submission from a dropped client, or for a stage already
closed, raises :class:`LateSubmissionError` and is never counted; an invalid one raises
:class:`ProtocolViolationError` and is ignored (the round goes on without it). A stage that
closes with too few clients raises :class:`SecAggAbortError` and the round is over.

The server holds no secret except, during unmask, the shares clients release; those are
kept in memory only (never in :meth:`to_state`, never in a log or an exception), used to
rebuild each secret from *exactly* ``t`` shares with :func:`confide.combine_shares`, checked
(self-mask seeds against the advertised commitment, mask keys against the advertised public
key; a failed check retries another ``t``-subset), and dropped as soon as the aggregate is
computed. All masks are then removed in a single fused :func:`confide.apply_masks` call.

:meth:`to_state` / :meth:`from_state` give a JSON-serialisable snapshot for crash recovery;
a server restored in the unmask stage has lost the released shares and re-sends
:meth:`pending_unmask_request` (clients answer an identical request identically).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import itertools
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

from confide.errors import (
    LateSubmissionError,
    ProtocolViolationError,
    SecAggAbortError,
    ShareError,
)
from confide.secagg import _protocol as proto
from confide.secagg.crypto import (
    agree,
    roster_payload,
    self_commitment,
    verify,
    x25519_public,
)
from confide.secagg.messages import (
    Advertisement,
    ConsistencyRequest,
    ConsistencySignature,
    KeyBroadcast,
    MaskedInput,
    RoundSetup,
    ShareDelivery,
    ShareUpload,
    UnmaskRequest,
    UnmaskResponse,
)
from confide.secagg.primitives import apply_masks, dequantize, pack_bits, ring_dtype, unpack_bits
from confide.shamir import combine_shares

__all__ = ["AggregateResult", "ServerSecAgg"]

_STAGES = ("advertise", "share", "mask", "consistency", "unmask", "done", "aborted")
_MAX_SUBSETS = 64
_STATE_VERSION = 1


@dataclass(frozen=True)
class AggregateResult:
    """The unmasked sum of the survivors' uploads.

    Parameters
    ----------
    total : numpy.ndarray
        Element-wise integer sum of the survivors' quantized, weight-scaled updates (ring
        dtype); equal, bit for bit, to the plaintext sum.
    total_weight : int
        Sum of the survivors' weights.
    survivors : tuple of str
        Clients whose masked inputs are in the sum, sorted.
    setup : RoundSetup
        The round.
    """

    total: NDArray[np.unsignedinteger[Any]]
    total_weight: int
    survivors: tuple[str, ...]
    setup: RoundSetup

    def weighted_sum(self) -> NDArray[np.float32]:
        """Return ``sum(w_i * x_i)`` (float32, quantization error included).

        Raises
        ------
        SecAggAbortError
            The round uses ring inputs (``encoding == "ring"``): ``total`` is the ring sum,
            to be decoded by whoever encoded it (e.g. :func:`confide.privacy.ddg_decode`).
        """
        p = self.setup.params
        if p.encoding == "ring":
            raise SecAggAbortError(
                "ring-encoding", "ring inputs are decoded by their encoder, not dequantized"
            )
        z = dequantize(self.total, p.clip_range, p.quant_bits, len(self.survivors), mean=False)
        out: NDArray[np.float32] = (z * np.float32(p.max_weight)).astype(np.float32)
        return out

    def weighted_mean(self) -> NDArray[np.float32]:
        """Return ``sum(w_i * x_i) / sum(w_i)``.

        Raises
        ------
        SecAggAbortError
            The total weight is zero.
        """
        if self.total_weight == 0:
            raise SecAggAbortError("zero-weight", "the survivors' weights sum to zero")
        out: NDArray[np.float32] = (self.weighted_sum() / np.float32(self.total_weight)).astype(
            np.float32
        )
        return out


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


class ServerSecAgg:
    """The server's SecAgg+ state machine for one round.

    Parameters
    ----------
    setup : RoundSetup
        The round, as announced to the cohort.

    Examples
    --------
    See ``tests/secagg/driver.py`` for a complete in-process round.
    """

    def __init__(self, setup: RoundSetup) -> None:
        self.setup = setup
        self._digest = setup.digest()
        self._ids = frozenset(setup.cohort)
        self.stage = "advertise"
        self.abort_reason: str | None = None
        self.dropped: dict[str, str] = {}
        self._adverts: dict[str, Advertisement] = {}
        self._session: bytes | None = None
        self._graph: dict[str, tuple[str, ...]] = {}
        self._uploads: dict[str, ShareUpload] = {}
        self._u2: tuple[str, ...] = ()
        self._masked: dict[str, str] = {}
        self._acc: NDArray[Any] | None = None
        self._u3: tuple[str, ...] = ()
        self._signatures: dict[str, bytes] = {}
        self._request: UnmaskRequest | None = None
        self._responses: dict[str, UnmaskResponse] = {}

    # -- helpers ----------------------------------------------------------------------------

    @property
    def session_id(self) -> bytes | None:
        """The session id, once the advertise stage is closed."""
        return self._session

    def _accept(self, stage: str, client_id: str, round_: int, session: bytes | None) -> None:
        if client_id in self.dropped:
            raise LateSubmissionError(
                f"{client_id!r} was declared dropped in stage {self.dropped[client_id]!r}"
            )
        if client_id not in self._ids:
            raise ProtocolViolationError(f"{client_id!r} is not in the cohort")
        if self.stage != stage:
            raise LateSubmissionError(f"stage {stage!r} is not open (now {self.stage!r})")
        if round_ != self.setup.round:
            raise ProtocolViolationError(f"expected round {self.setup.round}, got {round_}")
        if session is not None and (
            self._session is None or not hmac.compare_digest(session, self._session)
        ):
            raise ProtocolViolationError("wrong session id")

    def _abort(self, reason: str, detail: str) -> SecAggAbortError:
        self.stage = "aborted"
        self.abort_reason = reason
        self._responses.clear()
        self._acc = None
        return SecAggAbortError(reason, detail)

    def _need(self, count: int, what: str) -> None:
        need = self.setup.params.min_survivors
        if count < need:
            raise self._abort("too-few-clients", f"{count} {what}, at least {need} needed")

    def declare_dropped(self, client_id: str) -> None:
        """Declare a client dropped now (e.g. it disconnected); later submissions are refused.

        A client whose masked input was already accepted stays in the sum.
        """
        if client_id in self._ids and client_id not in self.dropped:
            self.dropped[client_id] = self.stage

    def expected(self) -> frozenset[str]:
        """Clients the open stage waits for (answered or not); empty once the round is over."""
        if self.stage == "advertise":
            group: tuple[str, ...] | frozenset[str] = self._ids
        elif self.stage == "share":
            group = tuple(self._adverts)
        elif self.stage == "mask":
            group = self._u2
        elif self.stage in ("consistency", "unmask"):
            group = self._u3
        else:
            return frozenset()
        return frozenset(c for c in group if c not in self.dropped)

    def _drop_missing(self, expected: tuple[str, ...] | frozenset[str], got: object) -> None:
        for cid in sorted(expected):
            if cid not in got:  # type: ignore[operator]
                self.declare_dropped(cid)

    def _group(self, owner: str) -> tuple[str, ...]:
        return proto.share_group(self._graph, owner)

    # -- stage 1: advertise keys ------------------------------------------------------------

    def receive_advertisement(self, msg: Advertisement | Mapping[str, Any]) -> None:
        """Accept a client's signed advertisement.

        Raises
        ------
        ProtocolViolationError
            Bad signature, wrong round, not in the cohort, a second different advertisement.
        LateSubmissionError
            The stage is closed or the client was declared dropped.
        """
        adv = proto.coerce(Advertisement, msg)
        self._accept("advertise", adv.client_id, adv.round, None)
        if adv.client_id in self._adverts:
            if self._adverts[adv.client_id] == adv:
                return
            raise ProtocolViolationError(f"{adv.client_id!r} advertised twice")
        if not verify(
            self.setup.identity_key(adv.client_id),
            adv.signature,
            proto.payload(self.setup, self._digest, adv),
        ):
            raise ProtocolViolationError(f"advertisement of {adv.client_id!r} is not signed")
        self._adverts[adv.client_id] = adv

    def close_advertise(self) -> KeyBroadcast:
        """Close the advertise stage; return the broadcast every advertiser receives.

        Raises
        ------
        SecAggAbortError
            Fewer advertisements than ``params.min_survivors``.
        """
        self._require_stage("advertise")
        self._drop_missing(self.setup.cohort, self._adverts)
        self._need(len(self._adverts), "advertisements")
        adverts = tuple(self._adverts[c] for c in sorted(self._adverts))
        self._session = proto.compute_session(self.setup, self._digest, adverts)
        self._graph = proto.neighbours(self.setup, sorted(self._adverts), self._session)
        self.stage = "share"
        return self.key_broadcast()

    def key_broadcast(self) -> KeyBroadcast:
        """Return the broadcast of the share stage (re-sendable after a restart)."""
        if self._session is None:  # kept under python -O
            raise ProtocolViolationError("no session yet: the round is not at this stage")
        adverts = tuple(self._adverts[c] for c in sorted(self._adverts))
        return KeyBroadcast(
            round=self.setup.round, session_id=self._session, advertisements=adverts
        )

    def _require_stage(self, stage: str) -> None:
        if self.stage != stage:
            raise ProtocolViolationError(f"cannot close {stage!r}: the round is in {self.stage!r}")

    # -- stage 2: share keys ----------------------------------------------------------------

    def receive_share_upload(self, msg: ShareUpload | Mapping[str, Any]) -> None:
        """Accept a client's encrypted shares (one per neighbour, exactly).

        Raises
        ------
        ProtocolViolationError
            Not an advertiser, wrong session, wrong sender or recipient set.
        LateSubmissionError
            The stage is closed or the client was declared dropped.
        """
        up = proto.coerce(ShareUpload, msg)
        self._accept("share", up.client_id, up.round, up.session_id)
        if up.client_id not in self._adverts:
            raise ProtocolViolationError(f"{up.client_id!r} did not advertise keys")
        if up.client_id in self._uploads:
            if self._uploads[up.client_id] == up:
                return
            raise ProtocolViolationError(f"{up.client_id!r} uploaded shares twice")
        receivers = [s.receiver for s in up.shares]
        if any(s.sender != up.client_id for s in up.shares):
            raise ProtocolViolationError(f"shares from {up.client_id!r} name another sender")
        if sorted(receivers) != sorted(self._graph[up.client_id]) or len(set(receivers)) != len(
            receivers
        ):
            raise ProtocolViolationError(
                f"shares from {up.client_id!r} are not exactly one per neighbour"
            )
        self._uploads[up.client_id] = up

    def close_share(self) -> dict[str, ShareDelivery]:
        """Close the share stage; return each holder's delivery (its neighbours' shares).

        Raises
        ------
        SecAggAbortError
            Fewer uploads than ``params.min_survivors``.
        """
        self._require_stage("share")
        self._drop_missing(tuple(self._adverts), self._uploads)
        self._need(len(self._uploads), "share uploads")
        self._u2 = tuple(sorted(self._uploads))
        self.stage = "mask"
        return self.share_deliveries()

    def share_deliveries(self) -> dict[str, ShareDelivery]:
        """Return the deliveries of the masked-input stage (re-sendable after a restart)."""
        if self._session is None:  # kept under python -O
            raise ProtocolViolationError("no session yet: the round is not at this stage")
        inbox: dict[str, list[Any]] = {c: [] for c in self._u2}
        for sender in self._u2:
            for enc in self._uploads[sender].shares:
                if enc.receiver in inbox:
                    inbox[enc.receiver].append(enc)
        return {
            c: ShareDelivery(
                round=self.setup.round,
                session_id=self._session,
                holders=self._u2,
                shares=tuple(inbox[c]),
            )
            for c in self._u2
        }

    # -- stage 3: masked input --------------------------------------------------------------

    def receive_masked_input(self, msg: MaskedInput | Mapping[str, Any]) -> None:
        """Add a client's masked vector to the running sum (exactly once).

        Raises
        ------
        ProtocolViolationError
            Not a share holder, wrong session, wrong length, a second different input.
        LateSubmissionError
            The stage is closed or the client was declared dropped: the input is not added.
        """
        mi = proto.coerce(MaskedInput, msg)
        self._accept("mask", mi.client_id, mi.round, mi.session_id)
        if mi.client_id not in self._u2:
            raise ProtocolViolationError(f"{mi.client_id!r} did not share keys")
        digest = hashlib.sha256(mi.data).hexdigest()
        if mi.client_id in self._masked:
            if self._masked[mi.client_id] == digest:
                return
            raise ProtocolViolationError(f"{mi.client_id!r} sent two different masked inputs")
        if len(mi.data) != proto.packed_len(self.setup):
            raise ProtocolViolationError(
                f"masked input of {mi.client_id!r} has {len(mi.data)} bytes, "
                f"expected {proto.packed_len(self.setup)}"
            )
        bits = self.setup.params.modulus_bits
        try:
            vec = unpack_bits(mi.data, bits, self.setup.vector_length + 1)
        except ValueError:
            raise ProtocolViolationError(f"masked input of {mi.client_id!r} is malformed") from None
        if self._acc is None:
            self._acc = np.zeros(self.setup.vector_length + 1, dtype=ring_dtype(bits))
        np.add(self._acc, vec, out=self._acc)
        if bits not in (32, 64):
            np.bitwise_and(self._acc, self._acc.dtype.type((1 << bits) - 1), out=self._acc)
        self._masked[mi.client_id] = digest

    def close_mask(self) -> ConsistencyRequest | UnmaskRequest:
        """Close the masked-input stage.

        Returns
        -------
        ConsistencyRequest or UnmaskRequest
            The request for every survivor: the consistency check if the round has one.

        Raises
        ------
        SecAggAbortError
            Fewer masked inputs than ``params.min_survivors``.
        """
        self._require_stage("mask")
        self._drop_missing(self._u2, self._masked)
        self._need(len(self._masked), "masked inputs")
        self._u3 = tuple(sorted(self._masked))
        self._uploads.clear()  # routed; not needed any more
        if self.setup.consistency_check:
            self.stage = "consistency"
            return self.consistency_request()
        self.stage = "unmask"
        self._request = self._make_unmask_request()
        return self._request

    def consistency_request(self) -> ConsistencyRequest:
        """Return the consistency-check request (re-sendable after a restart)."""
        if self._session is None:  # kept under python -O
            raise ProtocolViolationError("no session yet: the round is not at this stage")
        return ConsistencyRequest(
            round=self.setup.round, session_id=self._session, survivors=self._u3
        )

    def _make_unmask_request(self) -> UnmaskRequest:
        if self._session is None:  # kept under python -O
            raise ProtocolViolationError("no session yet: the round is not at this stage")
        alive = set(self._u3)
        return UnmaskRequest(
            round=self.setup.round,
            session_id=self._session,
            alive=self._u3,
            dead=tuple(c for c in self._u2 if c not in alive),
            signatures=tuple(sorted(self._signatures.items())),
        )

    # -- optional stage: consistency check --------------------------------------------------

    def receive_consistency_signature(self, msg: ConsistencySignature | Mapping[str, Any]) -> None:
        """Accept a survivor's signature over the roster.

        Raises
        ------
        ProtocolViolationError
            Not a survivor, wrong session, invalid signature.
        LateSubmissionError
            The stage is closed or the client was declared dropped.
        """
        cs = proto.coerce(ConsistencySignature, msg)
        self._accept("consistency", cs.client_id, cs.round, cs.session_id)
        if cs.client_id not in self._u3:
            raise ProtocolViolationError(f"{cs.client_id!r} sent no masked input")
        if self._session is None:  # kept under python -O
            raise ProtocolViolationError("no session yet: the round is not at this stage")
        payload = roster_payload(self._session, self.setup.round, self._u3)
        if not verify(self.setup.identity_key(cs.client_id), cs.signature, payload):
            raise ProtocolViolationError(f"consistency signature of {cs.client_id!r} is invalid")
        self._signatures[cs.client_id] = cs.signature

    def close_consistency(self) -> UnmaskRequest:
        """Close the consistency check; return the unmask request for every survivor.

        Raises
        ------
        SecAggAbortError
            Fewer than ``params.quorum`` signatures (honest clients would refuse to unmask).
        """
        self._require_stage("consistency")
        self._drop_missing(self._u3, self._signatures)
        quorum = self.setup.params.quorum
        if len(self._signatures) < quorum:
            raise self._abort(
                "too-few-signatures",
                f"{len(self._signatures)} signatures, at least {quorum} needed",
            )
        self.stage = "unmask"
        self._request = self._make_unmask_request()
        return self._request

    # -- stage 4: unmask --------------------------------------------------------------------

    def pending_unmask_request(self) -> UnmaskRequest | None:
        """Return the unmask request in force (to re-send after a restart), if any."""
        return self._request

    def receive_unmask_response(self, msg: UnmaskResponse | Mapping[str, Any]) -> None:
        """Accept a survivor's released shares (exactly the ones the request implies).

        Raises
        ------
        ProtocolViolationError
            Not a survivor, wrong session, shares of the wrong kind or for owners the client
            does not hold, missing shares.
        LateSubmissionError
            The stage is closed or the client was declared dropped.
        """
        resp = proto.coerce(UnmaskResponse, msg)
        self._accept("unmask", resp.client_id, resp.round, resp.session_id)
        if self._request is None:  # kept under python -O
            raise ProtocolViolationError("no request yet: the round is not at this stage")
        if resp.client_id not in self._u3:
            raise ProtocolViolationError(f"{resp.client_id!r} is not alive")
        if resp.client_id in self._responses:
            if self._responses[resp.client_id] == resp:
                return
            raise ProtocolViolationError(f"{resp.client_id!r} answered twice")
        me = resp.client_id
        alive, dead = set(self._request.alive), set(self._request.dead)
        want_self = {o for o in alive if me in self._group(o)}
        want_key = {o for o in dead if me in self._group(o)}
        if {o for o, _ in resp.self_shares} != want_self or {
            o for o, _ in resp.key_shares
        } != want_key:
            raise ProtocolViolationError(f"{me!r} released an unexpected set of shares")
        self._responses[me] = resp

    def ready(self) -> bool:
        """Whether enough shares arrived to rebuild every secret (the stage may close early)."""
        if self.stage != "unmask" or self._request is None:
            return False
        counts: dict[str, int] = {}
        for resp in self._responses.values():
            for owner, _ in (*resp.self_shares, *resp.key_shares):
                counts[owner] = counts.get(owner, 0) + 1
        owners = (*self._request.alive, *self._request.dead)
        return all(counts.get(o, 0) >= self.setup.params.t for o in owners)

    def close_unmask(self) -> AggregateResult:
        """Rebuild the secrets from exactly ``t`` shares each and remove every mask.

        Returns
        -------
        AggregateResult
            The integer sum of the survivors' uploads and their total weight.

        Raises
        ------
        SecAggAbortError
            Some secret has fewer than ``t`` valid shares, or the aggregate is out of range.
        """
        self._require_stage("unmask")
        if self._request is None:  # kept under python -O
            raise ProtocolViolationError("no request yet: the round is not at this stage")
        if self._session is None:  # kept under python -O
            raise ProtocolViolationError("no session yet: the round is not at this stage")
        if self._acc is None:  # kept under python -O
            raise ProtocolViolationError("no acc yet: the round is not at this stage")
        self._drop_missing(self._u3, self._responses)
        setup, params = self.setup, self.setup.params
        self_shares: dict[str, list[bytes]] = {o: [] for o in self._request.alive}
        key_shares: dict[str, list[bytes]] = {o: [] for o in self._request.dead}
        for cid in sorted(self._responses):
            for owner, share in self._responses[cid].self_shares:
                self_shares[owner].append(share)
            for owner, share in self._responses[cid].key_shares:
                key_shares[owner].append(share)
        self._responses.clear()
        masks: list[tuple[bytes, int]] = []
        for owner, shares in self_shares.items():
            commit = self._adverts[owner].self_commit
            seed = self._rebuild(
                owner,
                shares,
                lambda s, o=owner, c=commit: hmac.compare_digest(
                    self_commitment(s, setup.round, o), c
                ),
            )
            masks.append((seed, -1))
        survivors = set(self._u3)
        for owner, shares in key_shares.items():
            mask_pk = self._adverts[owner].mask_pk
            seed = self._rebuild(
                owner, shares, lambda s, pk=mask_pk: hmac.compare_digest(x25519_public(s), pk)
            )
            for i in self._graph[owner]:
                if i in survivors:
                    pair = agree(
                        seed,
                        self._adverts[i].mask_pk,
                        label="mask",
                        session=self._session,
                        round=setup.round,
                        a=owner,
                        b=i,
                    )
                    masks.append((pair, -proto.pair_sign(i, owner)))
        bits = params.modulus_bits
        total = apply_masks(self._acc, masks, bits, proto.domain(setup, self._session))
        masks.clear()
        n3 = len(self._u3)
        weight = int(total[-1])
        levels = (1 << params.quant_bits) - 1
        ring = params.encoding == "ring"  # ring inputs wrap by design; the weight never does
        if weight > n3 * params.max_weight or (
            not ring and int(total[:-1].max(initial=0)) > n3 * levels
        ):
            raise self._abort("inconsistent-aggregate", "the unmasked sum is out of range")
        self._acc = None
        self.stage = "done"
        return AggregateResult(
            total=total[:-1].copy(), total_weight=weight, survivors=self._u3, setup=setup
        )

    def _rebuild(self, owner: str, shares: list[bytes], check: Any) -> bytes:
        t = self.setup.params.t
        if len(shares) < t:
            raise self._abort(
                "too-few-shares", f"{len(shares)} shares of {owner!r}'s secret, {t} needed"
            )
        for subset in itertools.islice(itertools.combinations(shares, t), _MAX_SUBSETS):
            try:
                secret = combine_shares(list(subset))
            except ShareError:
                continue
            if len(secret) == 32 and check(secret):
                return secret
        raise self._abort("bad-shares", f"no {t} shares rebuild {owner!r}'s secret correctly")

    # -- persistence ------------------------------------------------------------------------

    def to_state(self) -> dict[str, Any]:
        """Return a JSON-serialisable snapshot (no secrets: released shares are left out)."""
        acc = None
        if self._acc is not None:
            acc = _b64(pack_bits(self._acc, self.setup.params.modulus_bits))
        return {
            "version": _STATE_VERSION,
            "setup": self.setup.to_json(),
            "stage": self.stage,
            "abort_reason": self.abort_reason,
            "dropped": dict(self.dropped),
            "adverts": [self._adverts[c].to_json() for c in sorted(self._adverts)],
            "uploads": [self._uploads[c].to_json() for c in sorted(self._uploads)],
            "u2": list(self._u2),
            "masked": dict(self._masked),
            "acc": acc,
            "u3": list(self._u3),
            "signatures": {c: _b64(s) for c, s in sorted(self._signatures.items())},
            "request": None if self._request is None else self._request.to_json(),
        }

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> ServerSecAgg:
        """Restore a server from :meth:`to_state`'s output.

        Raises
        ------
        ProtocolViolationError
            The snapshot is malformed or of another version.
        """
        try:
            if state["version"] != _STATE_VERSION or state["stage"] not in _STAGES:
                raise ProtocolViolationError("unsupported server state")
            srv = cls(RoundSetup.from_json(state["setup"]))
            srv.stage = state["stage"]
            srv.abort_reason = state["abort_reason"]
            srv.dropped = {str(k): str(v) for k, v in state["dropped"].items()}
            for raw in state["adverts"]:
                adv = Advertisement.from_json(raw)
                srv._adverts[adv.client_id] = adv
            if srv.stage not in ("advertise",) and srv._adverts:
                adverts = [srv._adverts[c] for c in sorted(srv._adverts)]
                srv._session = proto.compute_session(srv.setup, srv._digest, adverts)
                srv._graph = proto.neighbours(srv.setup, sorted(srv._adverts), srv._session)
            for raw in state["uploads"]:
                up = ShareUpload.from_json(raw)
                srv._uploads[up.client_id] = up
            srv._u2 = tuple(state["u2"])
            srv._masked = {str(k): str(v) for k, v in state["masked"].items()}
            if state["acc"] is not None:
                srv._acc = unpack_bits(
                    base64.b64decode(state["acc"]),
                    srv.setup.params.modulus_bits,
                    srv.setup.vector_length + 1,
                )
            srv._u3 = tuple(state["u3"])
            srv._signatures = {k: base64.b64decode(v) for k, v in state["signatures"].items()}
            if state["request"] is not None:
                srv._request = UnmaskRequest.from_json(state["request"])
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            if isinstance(exc, ProtocolViolationError):
                raise
            raise ProtocolViolationError(f"malformed server state ({type(exc).__name__})") from None
        return srv
