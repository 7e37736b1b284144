"""Client side of SecAgg+: one :class:`ClientSecAgg` per client per round.

The object is a strict state machine (``init -> advertised -> shared -> masked [-> signed]
-> done``). Every request from the server is checked before anything is computed or
released; on the first inconsistency the client *aborts*: it wipes its secrets, produces no
answer, raises :class:`SecAggAbortError` (with a reason code) and refuses every later call.
Repeating the *identical* request (a network retry) returns the identical answer; a
different request at the same stage aborts.

Per-peer state guarantees that a client releases at most one kind of share of any owner:
the self-mask share only for owners the server lists as *alive* (their masked input is in the
sum), the mask-key share only for owners listed as *dead* (dropped after sharing keys).
With the consistency check (malicious server) a client unmasks only the roster it signed and
only with ``params.quorum`` signatures on it, which makes that roster the same for every
honest client (see :mod:`confide.secagg.params`); without it the server is trusted to show
every client one roster (semi-honest).

**Task binding.** The advertisement carries and signs the hash of the whole task the client
received (``task_sha256``); a peer whose advertisement names another task makes the client
abort at ``share_keys`` (``task-mismatch``), before any share or masked input leaves it.

**Weighted aggregation.** With weight ``w`` (e.g. the sample count) in ``[0, max_weight]``,
the client quantizes ``(w / max_weight) * x`` (``x`` clipped element-wise to
``[-clip_range, clip_range]`` by the quantizer, stochastic rounding, unbiased) and appends
``w`` itself as one more ring element. Both are masked by the same masks, so the server
learns only ``sum(w_i x_i) / max_weight`` and ``sum(w_i)``, never a site's sample count; the
weighted mean is their ratio (:meth:`AggregateResult.weighted_mean`). Scaling before
quantization keeps the ring at ``bit_length(n * max(2**quant_bits - 1, max_weight))`` bits;
the price is a quantization step relative to ``w_i / max_weight`` (pick ``max_weight`` close
to the real largest weight).

**Ring inputs.** With ``params.encoding == "ring"`` the update is already a vector of ring
elements (e.g. the distributed discrete Gaussian's :func:`confide.privacy.ddg_encode`): it is
masked as is, with no clipping, quantization or weight scaling, and the weight element is
appended unchanged. Client-level DP uses ``max_weight = 1`` and weight 1 (uniform weights),
so the weight element of the sum is just the number of masked inputs in it.
"""

from __future__ import annotations

import hmac
import threading
import time
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, NoReturn

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from numpy.typing import NDArray

from confide.errors import ConfideError, ProtocolViolationError, SecAggAbortError
from confide.noise import SecureRng
from confide.secagg import _protocol as proto
from confide.secagg.crypto import (
    NONCE_BYTES,
    agree,
    decrypt_share,
    ed25519_public,
    encrypt_share,
    pack_share_bundle,
    roster_payload,
    self_commitment,
    session_id,
    sign,
    unpack_share_bundle,
    verify,
    x25519_public,
)
from confide.secagg.messages import (
    Advertisement,
    ConsistencyRequest,
    ConsistencySignature,
    EncryptedShare,
    KeyBroadcast,
    MaskedInput,
    RoundSetup,
    ShareDelivery,
    ShareUpload,
    UnmaskRequest,
    UnmaskResponse,
)
from confide.secagg.primitives import apply_masks, pack_bits, quantize, ring_dtype
from confide.shamir import split_secret

__all__ = ["ClientSecAgg"]

_MAX_SHARE = 1024


@dataclass(frozen=True)
class _Broadcast:
    """What a key broadcast implies, the same for every cohort member (public values only).

    ``bad_signature``: the first advertisement whose signature does not verify (``None``:
    all do); ``session``: the hash of the setup and every advertisement; ``graph``: the
    round's neighbour graph from that session (``None`` when ``session`` differs from the
    broadcast's ``session_id``, which makes every client abort before it is needed).
    """

    bad_signature: str | None
    session: bytes
    graph: Mapping[str, tuple[str, ...]] | None


#: Key broadcasts already derived in this process (the Ray simulation runs many virtual
#: sites per process, and each of them would otherwise verify the same cohort's signed
#: advertisements, hash the same session and build the same graph). Keyed by the exact
#: setup and broadcast (frozen messages, compared field by field); a broadcast with a bad
#: signature is never remembered. A real site derives each broadcast once anyway.
_BROADCASTS: OrderedDict[tuple[RoundSetup, KeyBroadcast], _Broadcast] = OrderedDict()
_BROADCASTS_MAX = 4
_BROADCASTS_LOCK = threading.Lock()


def _derive_broadcast(setup: RoundSetup, digest: bytes, msg: KeyBroadcast) -> _Broadcast:
    """Return (once per process and broadcast) the public values ``msg`` implies."""
    key = (setup, msg)
    with _BROADCASTS_LOCK:
        known = _BROADCASTS.get(key)
    if known is not None:
        return known
    identity = dict(setup.identity_keys)
    payloads = [proto.payload(setup, digest, a) for a in msg.advertisements]
    for a, signed in zip(msg.advertisements, payloads, strict=True):
        if not verify(identity[a.client_id], a.signature, signed):
            return _Broadcast(a.client_id, b"", None)  # not remembered
    session = session_id(
        digest,
        setup.round,
        (
            (a.client_id, signed + a.signature)
            for a, signed in zip(msg.advertisements, payloads, strict=True)
        ),
    )
    graph = None
    if hmac.compare_digest(session, msg.session_id):
        ids = [a.client_id for a in msg.advertisements]
        graph = MappingProxyType(proto.neighbours(setup, ids, session))
    out = _Broadcast(None, session, graph)
    with _BROADCASTS_LOCK:
        _BROADCASTS[key] = out
        while len(_BROADCASTS) > _BROADCASTS_MAX:
            _BROADCASTS.popitem(last=False)
    return out


@dataclass
class _Peer:
    """What this client knows about one peer in its share group."""

    advert: Advertisement
    self_share: bytes | None = None
    key_share: bytes | None = None
    released: str | None = None


class ClientSecAgg:
    """One client's SecAgg+ state for one round.

    Parameters
    ----------
    setup : RoundSetup
        The round as announced by the server.
    client_id : str
        This client's id (must be in ``setup.cohort``).
    identity_key : Ed25519PrivateKey
        This client's enrolled identity key (must match ``setup``).
    rng : SecureRng, optional
        Source of every secret (seeds, Shamir coefficients, nonces, rounding); a fresh
        OS-keyed generator by default. Seed it only in tests.
    task_sha256 : bytes, optional
        SHA-256 of the whole task this client received for the round (model, training
        config, privacy parameters; :meth:`confide.protocol.tasks.SecureTask.task_sha256`).
        It is signed with the advertisement, and every peer's advertisement must carry the
        same hash, so clients given different tasks abort at ``share_keys``. The default
        (32 zero bytes) binds nothing beyond the setup itself; a site always passes it.

    Raises
    ------
    SecAggAbortError
        The client is not in the cohort, the server announced another identity key for it,
        or the round runs the consistency check with a signature quorum that the dropout
        budget makes unreachable.

    Examples
    --------
    See ``tests/secagg/driver.py`` for a complete in-process round.
    """

    def __init__(
        self,
        setup: RoundSetup,
        client_id: str,
        identity_key: Ed25519PrivateKey,
        *,
        rng: SecureRng | None = None,
        task_sha256: bytes = bytes(32),
    ) -> None:
        self.setup = setup
        self.client_id = client_id
        self._identity = identity_key
        self._rng = SecureRng() if rng is None else rng
        self._stage = "init"
        self._digest = setup.digest()
        self._enc_seed = bytearray(self._rng.random_bytes(32))
        self._mask_seed = bytearray(self._rng.random_bytes(32))
        self._self_seed = bytearray(self._rng.random_bytes(32))
        self._peers: dict[str, _Peer] = {}
        # The pairwise share keys agreed at share_keys, by neighbour: the same keys decrypt
        # the neighbours' shares at masked_input (no second X25519 agreement); as secret as
        # the seed they come from, and wiped with it.
        self._share_keys: dict[str, bytearray] = {}
        # The pairwise mask seeds derived ahead of masked_input (precompute_masks), by
        # neighbour, each with the neighbour's advertised mask key it came from: as secret
        # as the mask seed, wiped with it; a neighbour missing from the holders at
        # masked_input has its seed zeroed unused. The lock orders a precompute in a worker
        # thread against masked_input and the wipes.
        self._mask_seeds: dict[str, tuple[bytes, bytearray]] = {}
        self._lock = threading.RLock()
        self._nbrs: tuple[str, ...] = ()
        self._holders: frozenset[str] = frozenset()
        self._advertised: frozenset[str] = frozenset()
        self._session = b""
        self._roster: frozenset[str] | None = None
        self._last: tuple[object, object] | None = None
        self._advert: Advertisement | None = None
        self._task = bytes(task_sha256)
        if len(self._task) != 32:
            self._abort("malformed", "task_sha256 must be 32 bytes")
        if client_id not in setup.cohort:
            self._abort("not-in-cohort", f"{client_id!r} is not in the announced cohort")
        announced = setup.identity_key(client_id)
        if not hmac.compare_digest(announced, ed25519_public(identity_key)):
            self._abort("identity-mismatch", "the round announces another identity key for us")
        if setup.consistency_check and not setup.params.quorum_reachable:
            self._abort(
                "quorum-unreachable",
                f"the roster needs {setup.params.quorum} signatures but only "
                f"{setup.params.min_survivors} survivors are guaranteed",
            )

    # -- state handling ---------------------------------------------------------------------

    @property
    def stage(self) -> str:
        """Current stage: init, advertised, shared, masked, signed, done or aborted."""
        return self._stage

    @property
    def aborted(self) -> bool:
        """Whether this client aborted the round."""
        return self._stage == "aborted"

    def _wipe(self) -> None:
        with self._lock:
            for buf in (
                self._enc_seed,
                self._mask_seed,
                self._self_seed,
                *self._share_keys.values(),
                *(seed for _, seed in self._mask_seeds.values()),
            ):
                buf[:] = bytes(len(buf))
            self._share_keys.clear()
            self._mask_seeds.clear()

    def _abort(self, reason: str, detail: str = "") -> NoReturn:
        self.discard()
        raise SecAggAbortError(reason, detail)

    def discard(self) -> None:
        """Leave the round: wipe every secret and refuse every later call (no error raised).

        For a round the client gives up on (dropped, restarted, superseded): the seeds, the
        share keys and any precomputed mask seeds are zeroed at once instead of lingering
        until the object is collected.
        """
        with self._lock:
            if self._stage == "aborted":
                return
            self._wipe()
            self._peers.clear()
            self._last = None
            self._stage = "aborted"

    def _enter(self, expected: tuple[str, ...], request: object) -> object | None:
        """Check the stage; return the cached answer for a repeated identical request."""
        if self._stage == "aborted":
            raise SecAggAbortError("already-aborted", "this client aborted the round earlier")
        if self._last is not None and self._last[0] == request:
            return self._last[1]
        if self._stage not in expected:
            self._abort("unexpected-stage", f"request not valid in stage {self._stage!r}")
        return None

    def _decode(self, cls: type[Any], msg: object) -> Any:
        try:
            return proto.coerce(cls, msg)
        except ProtocolViolationError as exc:
            self._abort("malformed", str(exc))

    def _check_round(self, round_: int, session: bytes | None = None) -> None:
        if round_ != self.setup.round:
            self._abort("wrong-round", f"expected round {self.setup.round}, got {round_}")
        if session is not None and not hmac.compare_digest(session, self._session):
            self._abort("wrong-session", "session id differs from the one this client derived")

    # -- stage 1: advertise keys ------------------------------------------------------------

    def advertise(self) -> Advertisement:
        """Return this client's signed advertisement (two X25519 public keys, commitment).

        Returns
        -------
        Advertisement
            The same object on every call.
        """
        if self._advert is not None and self._stage != "aborted":
            return self._advert
        self._enter(("init",), None)
        enc_pk = x25519_public(bytes(self._enc_seed))
        mask_pk = x25519_public(bytes(self._mask_seed))
        commit = self_commitment(bytes(self._self_seed), self.setup.round, self.client_id)
        adv = Advertisement(
            round=self.setup.round,
            client_id=self.client_id,
            enc_pk=enc_pk,
            mask_pk=mask_pk,
            self_commit=commit,
            task_sha256=self._task,
            signature=b"\0" * 64,
        )
        sig = sign(self._identity, proto.payload(self.setup, self._digest, adv))
        self._advert = Advertisement(
            round=adv.round,
            client_id=adv.client_id,
            enc_pk=enc_pk,
            mask_pk=mask_pk,
            self_commit=commit,
            task_sha256=self._task,
            signature=sig,
        )
        self._stage = "advertised"
        return self._advert

    # -- stage 2: share keys ----------------------------------------------------------------

    def share_keys(self, broadcast: KeyBroadcast | Mapping[str, Any]) -> ShareUpload:
        """Check every advertisement, then Shamir-share both secrets to the neighbours.

        Parameters
        ----------
        broadcast : KeyBroadcast or dict
            All accepted advertisements and the session id.

        Returns
        -------
        ShareUpload
            One encrypted share bundle per neighbour.

        Raises
        ------
        SecAggAbortError
            Wrong round or session id, unknown or repeated ids, a peer given another task
            (``task-mismatch``), a bad signature, repeated keys, our own advertisement
            missing or altered, or fewer clients than the dropout budget allows.
        """
        msg: KeyBroadcast = self._decode(KeyBroadcast, broadcast)
        cached = self._enter(("advertised",), msg)
        if cached is not None:
            return cached  # type: ignore[return-value]
        setup, params = self.setup, self.setup.params
        self._check_round(msg.round)
        ids = [a.client_id for a in msg.advertisements]
        if len(set(ids)) != len(ids):
            self._abort("repeated-id", "an id is advertised twice")
        if ids != sorted(ids):
            self._abort("malformed", "advertisements are not sorted by client id")
        unknown = set(ids) - set(setup.cohort)
        if unknown:
            self._abort("unknown-id", f"advertisements from outside the cohort: {sorted(unknown)}")
        if len(ids) < params.min_survivors:
            self._abort(
                "too-few-clients",
                f"{len(ids)} advertisements, at least {params.min_survivors} needed",
            )
        keys = [k for a in msg.advertisements for k in (a.enc_pk, a.mask_pk)]
        if len(set(keys)) != len(keys):
            self._abort("repeated-key", "two advertised public keys are equal")
        mine = [a for a in msg.advertisements if a.client_id == self.client_id]
        if not mine or mine[0] != self._advert:
            self._abort("own-advert-altered", "our advertisement is missing or altered")
        # Every signature, the session and the graph: public, the same for every member.
        derived = _derive_broadcast(setup, self._digest, msg)
        for a in msg.advertisements:
            if a.round != setup.round:
                self._abort("wrong-round", f"advertisement of {a.client_id!r} is for another round")
            if not hmac.compare_digest(a.task_sha256, self._task):
                self._abort(
                    "task-mismatch",
                    f"{a.client_id!r} was given another task for this round (model, training "
                    "config or privacy parameters differ from ours)",
                )
            if a.client_id == derived.bad_signature:
                self._abort("bad-signature", f"advertisement of {a.client_id!r} is not signed")
        session = derived.session
        if derived.graph is None or not hmac.compare_digest(session, msg.session_id):
            self._abort("wrong-session", "session id is not the hash of the advertisements")
        self._session = session
        self._advertised = frozenset(ids)
        graph = derived.graph
        self._nbrs = graph[self.client_id]
        group = proto.share_group(graph, self.client_id)
        adverts = {a.client_id: a for a in msg.advertisements}
        self_shares = split_secret(bytes(self._self_seed), len(group), params.t, rng=self._rng)
        key_shares = split_secret(bytes(self._mask_seed), len(group), params.t, rng=self._rng)
        out: list[EncryptedShare] = []
        # One key object for the k agreements (a local: it goes with this call).
        enc_key = X25519PrivateKey.from_private_bytes(bytes(self._enc_seed))
        for holder, s_share, k_share in zip(group, self_shares, key_shares, strict=True):
            self._peers[holder] = _Peer(adverts[holder])
            if holder == self.client_id:
                self._peers[holder].self_share = s_share
                self._peers[holder].key_share = k_share
                continue
            try:
                key = agree(
                    enc_key,
                    adverts[holder].enc_pk,
                    label="share",
                    session=session,
                    round=setup.round,
                    a=self.client_id,
                    b=holder,
                )
            except ProtocolViolationError as exc:
                self._abort("bad-key", str(exc))
            self._share_keys[holder] = bytearray(key)
            nonce = self._rng.random_bytes(NONCE_BYTES)
            ct = encrypt_share(
                key,
                nonce,
                pack_share_bundle(self.client_id, holder, s_share, k_share),
                session=session,
                round=setup.round,
                sender=self.client_id,
                receiver=holder,
            )
            out.append(
                EncryptedShare(sender=self.client_id, receiver=holder, nonce=nonce, ciphertext=ct)
            )
        upload = ShareUpload(
            round=setup.round, client_id=self.client_id, session_id=session, shares=tuple(out)
        )
        self._stage = "shared"
        self._last = (msg, upload)
        return upload

    # -- between stages 2 and 3: the mask seeds, ahead of time ------------------------------

    def _mask_agreement(
        self, mask_key: X25519PrivateKey, peer: str, peer_pk: bytes, session: bytes
    ) -> bytes:
        """Return the pairwise mask seed with ``peer``.

        The one derivation :meth:`precompute_masks` and :meth:`masked_input` share, so the
        two agree by construction.
        """
        return agree(
            mask_key,
            peer_pk,
            label="mask",
            session=session,
            round=self.setup.round,
            a=self.client_id,
            b=peer,
        )

    def precompute_masks(self) -> int:
        """Derive the pairwise mask seeds with every neighbour before ``masked_input``.

        Meant for the wait after the share upload (it may run in a worker thread): the
        ``k`` X25519 agreements then leave the masked-input stage's critical path. The
        seeds are exactly those ``masked_input`` would derive: this client's mask key and
        each neighbour's mask key from the key broadcast checked at ``share_keys`` (the
        signed advertisements), the session and the round. ``masked_input`` uses a seed
        only for a neighbour that is among the holders and whose advertised key is still
        the one it was derived from; every other one (a neighbour that dropped after
        sharing keys) is zeroed unused. A neighbour whose key does not agree is left to
        ``masked_input``, which then fails as it would have without this call.

        Returns
        -------
        int
            How many seeds are held now (0 outside the ``shared`` stage: nothing is done).
        """
        with self._lock:
            if self._stage != "shared" or self._mask_seeds:
                return len(self._mask_seeds)
            own = bytes(self._mask_seed)
            session = self._session
            peers = [(j, self._peers[j].advert.mask_pk) for j in self._nbrs if j in self._peers]
        seeds: dict[str, tuple[bytes, bytearray]] = {}
        mask_key = X25519PrivateKey.from_private_bytes(own)
        del own
        for j, pk in peers:
            try:
                seed = self._mask_agreement(mask_key, j, pk, session)
            except ProtocolViolationError:
                continue  # masked_input derives it again and fails as before
            seeds[j] = (pk, bytearray(seed))
        del mask_key
        with self._lock:
            if self._stage == "shared" and not self._mask_seeds and session == self._session:
                self._mask_seeds = seeds
                return len(seeds)
        # The round moved on (masked, aborted, discarded) while we computed: nothing kept.
        for _, buf in seeds.values():
            buf[:] = bytes(len(buf))
        seeds.clear()
        return 0

    # -- stage 3: masked input --------------------------------------------------------------

    def masked_input(
        self,
        delivery: ShareDelivery | Mapping[str, Any],
        update: NDArray[Any],
        weight: int,
        *,
        model_sha256: bytes,
        timings: dict[str, float] | None = None,
    ) -> MaskedInput:
        """Store the shares addressed to us, then upload the masked, packed update.

        Parameters
        ----------
        delivery : ShareDelivery or dict
            Our neighbours' encrypted shares and the roster of share holders.
        update : numpy.ndarray
            1-D float32 update of ``setup.vector_length`` finite values (already clipped);
            with ``params.encoding == "ring"`` an unsigned-integer vector of that length with
            values below ``2**modulus_bits``.
        weight : int
            Aggregation weight in ``[0, params.max_weight]``.
        model_sha256 : bytes
            SHA-256 of the model the update was trained from.
        timings : dict, optional
            If given, filled with the seconds spent in ``"decrypt"``, ``"quantize"``,
            ``"mask"`` and ``"pack"``.

        Returns
        -------
        MaskedInput
            The bit-packed masked vector (update elements then the weight).

        Raises
        ------
        SecAggAbortError
            The model hash differs from the announced one, wrong round or session, unknown
            or missing holders, a share that fails authentication.
        InvalidArgumentError
            Bad ``update`` or ``weight`` (the round is then aborted as well).
        """
        with self._lock:
            return self._masked_input(delivery, update, weight, model_sha256, timings)

    def _masked_input(
        self,
        delivery: ShareDelivery | Mapping[str, Any],
        update: NDArray[Any],
        weight: int,
        model_sha256: bytes,
        timings: dict[str, float] | None,
    ) -> MaskedInput:
        msg: ShareDelivery = self._decode(ShareDelivery, delivery)
        cached = self._enter(("shared",), msg)
        if cached is not None:
            return cached  # type: ignore[return-value]
        setup, params = self.setup, self.setup.params
        if not hmac.compare_digest(bytes(model_sha256), setup.model_sha256):
            self._abort("model-hash-mismatch", "the model differs from the announced one")
        self._check_round(msg.round, msg.session_id)
        holders = frozenset(msg.holders)
        if not holders <= self._advertised:
            self._abort("unknown-id", "share holders include clients that did not advertise")
        if self.client_id not in holders:
            self._abort("self-listed-dead", "we are not listed among the share holders")
        if len(holders) < params.min_survivors:
            self._abort(
                "too-few-clients",
                f"{len(holders)} share holders, at least {params.min_survivors} needed",
            )
        expected = {j for j in self._nbrs if j in holders}
        senders = [s.sender for s in msg.shares]
        if len(set(senders)) != len(senders) or set(senders) != expected:
            self._abort(
                "share-set-mismatch",
                "delivered shares do not match the neighbours that shared keys",
            )
        t0 = time.perf_counter()
        # One key object per secret for the k agreements (locals: they go with this call).
        enc_key = X25519PrivateKey.from_private_bytes(bytes(self._enc_seed))
        mask_key = X25519PrivateKey.from_private_bytes(bytes(self._mask_seed))
        for enc in msg.shares:
            if enc.receiver != self.client_id:
                self._abort(
                    "share-set-mismatch", "a delivered share is addressed to another client"
                )
            peer = self._peers[enc.sender]
            try:
                known = self._share_keys.get(enc.sender)
                key = (
                    bytes(known)
                    if known is not None
                    else agree(
                        enc_key,
                        peer.advert.enc_pk,
                        label="share",
                        session=self._session,
                        round=setup.round,
                        a=self.client_id,
                        b=enc.sender,
                    )
                )
                plain = decrypt_share(
                    key,
                    enc.nonce,
                    enc.ciphertext,
                    session=self._session,
                    round=setup.round,
                    sender=enc.sender,
                    receiver=self.client_id,
                )
                src, dst, s_share, k_share = unpack_share_bundle(plain)
            except ProtocolViolationError as exc:
                self._abort("bad-share", str(exc))
            if src != enc.sender or dst != self.client_id:
                self._abort("bad-share", f"share bundle from {enc.sender!r} is mislabelled")
            if not (0 < len(s_share) <= _MAX_SHARE and 0 < len(k_share) <= _MAX_SHARE):
                self._abort("bad-share", f"share bundle from {enc.sender!r} is malformed")
            peer.self_share, peer.key_share = s_share, k_share
        t1 = time.perf_counter()
        vec = self._quantize(update, weight)
        t2 = time.perf_counter()
        masks: list[tuple[bytes, int]] = [(bytes(self._self_seed), 1)]
        pre = self._mask_seeds
        for j in sorted(expected):
            pk = self._peers[j].advert.mask_pk
            ready = pre.pop(j, None)
            if ready is not None and hmac.compare_digest(ready[0], pk):
                seed = bytes(ready[1])
            else:
                seed = self._mask_agreement(mask_key, j, pk, self._session)
            if ready is not None:
                ready[1][:] = bytes(len(ready[1]))
            masks.append((seed, proto.pair_sign(self.client_id, j)))
        bits = params.modulus_bits
        masked = apply_masks(vec, masks, bits, proto.domain(setup, self._session))
        masks.clear()
        del enc_key, mask_key
        t3 = time.perf_counter()
        data = pack_bits(masked, bits)
        t4 = time.perf_counter()
        if timings is not None:
            timings.update(decrypt=t1 - t0, quantize=t2 - t1, mask=t3 - t2, pack=t4 - t3)
        # The secrets now live only as shares; our own copies go.
        self._wipe()
        # Peers that never shared keys with us are irrelevant from here on.
        for j in [p for p in self._peers if p != self.client_id and p not in expected]:
            del self._peers[j]
        self._holders = holders
        out = MaskedInput(
            round=setup.round, client_id=self.client_id, session_id=self._session, data=data
        )
        self._stage = "masked"
        self._last = (msg, out)
        return out

    def _quantize(self, update: NDArray[Any], weight: int) -> NDArray[Any]:
        params = self.setup.params
        x = np.asarray(update)
        if params.encoding == "ring":
            return self._ring_input(x, weight)
        if x.dtype != np.float32 or x.ndim != 1 or x.shape[0] != self.setup.vector_length:
            self._abort(
                "bad-update", f"update must be float32 of length {self.setup.vector_length}"
            )
        if not (
            isinstance(weight, int)
            and not isinstance(weight, bool)
            and 0 <= weight <= params.max_weight
        ):
            self._abort("bad-weight", f"weight must be an int in [0, {params.max_weight}]")
        if weight != params.max_weight:
            # Clip first: the quantizer's own clipping would act on the scaled values.
            r = np.float32(params.clip_range)
            x = np.clip(x, -r, r) * np.float32(weight / params.max_weight)
        try:
            q = quantize(
                np.ascontiguousarray(x), params.clip_range, params.quant_bits, rng=self._rng
            )
        except ConfideError as exc:
            self._abort("bad-update", str(exc))
        vec = np.empty(self.setup.vector_length + 1, dtype=ring_dtype(params.modulus_bits))
        vec[:-1] = q
        vec[-1] = weight
        return vec

    def _ring_input(self, x: NDArray[Any], weight: int) -> NDArray[Any]:
        params = self.setup.params
        if (
            x.dtype.kind != "u"
            or x.ndim != 1
            or x.shape[0] != self.setup.vector_length
            or (x.size and int(x.max()) >> params.modulus_bits)
        ):
            self._abort(
                "bad-update",
                f"ring input must be unsigned integers below 2**{params.modulus_bits} of "
                f"length {self.setup.vector_length}",
            )
        if not (
            isinstance(weight, int)
            and not isinstance(weight, bool)
            and 0 <= weight <= params.max_weight
        ):
            self._abort("bad-weight", f"weight must be an int in [0, {params.max_weight}]")
        vec = np.empty(self.setup.vector_length + 1, dtype=ring_dtype(params.modulus_bits))
        vec[:-1] = x
        vec[-1] = weight
        return vec

    # -- optional stage: consistency check --------------------------------------------------

    def consistency_check(
        self, request: ConsistencyRequest | Mapping[str, Any]
    ) -> ConsistencySignature:
        """Sign the roster of clients whose masked inputs the server says it holds.

        Raises
        ------
        SecAggAbortError
            The round has no consistency check, wrong round or session, unknown ids, we are
            not listed, or fewer survivors than allowed.
        """
        msg: ConsistencyRequest = self._decode(ConsistencyRequest, request)
        cached = self._enter(("masked",), msg)
        if cached is not None:
            return cached  # type: ignore[return-value]
        if not self.setup.consistency_check:
            self._abort("unexpected-stage", "this round has no consistency check")
        self._check_round(msg.round, msg.session_id)
        roster = frozenset(msg.survivors)
        self._check_alive(roster)
        sig = sign(self._identity, roster_payload(self._session, self.setup.round, roster))
        self._roster = roster
        out = ConsistencySignature(
            round=self.setup.round,
            client_id=self.client_id,
            session_id=self._session,
            signature=sig,
        )
        self._stage = "signed"
        self._last = (msg, out)
        return out

    def _check_alive(self, alive: frozenset[str]) -> None:
        if not alive <= self._holders:
            self._abort("unknown-id", "survivors include clients that did not share keys")
        if self.client_id not in alive:
            self._abort("self-listed-dead", "we are not listed among the survivors")
        if len(alive) < self.setup.params.min_survivors:
            self._abort(
                "too-few-alive",
                f"{len(alive)} survivors, at least {self.setup.params.min_survivors} needed",
            )

    # -- stage 4: unmask --------------------------------------------------------------------

    def unmask(self, request: UnmaskRequest | Mapping[str, Any]) -> UnmaskResponse:
        """Release, per owner in our share group, the one kind of share the request implies.

        Raises
        ------
        SecAggAbortError
            A peer listed both dead and alive, we are listed dead, unknown or repeated ids,
            holders missing from both lists, fewer than ``max(t, n - max_dropouts)`` alive,
            (with a consistency check) a roster differing from the one we signed or fewer than
            ``params.quorum`` valid signatures on it, or a second, different unmask request.
        """
        msg: UnmaskRequest = self._decode(UnmaskRequest, request)
        expected_stage = ("signed",) if self.setup.consistency_check else ("masked",)
        cached = self._enter(expected_stage, msg)
        if cached is not None:
            return cached  # type: ignore[return-value]
        self._check_round(msg.round, msg.session_id)
        alive, dead = frozenset(msg.alive), frozenset(msg.dead)
        if alive & dead:
            self._abort("dead-and-alive", f"listed both dead and alive: {sorted(alive & dead)}")
        if self.client_id in dead:
            self._abort("self-listed-dead", "we are listed as dropped")
        if not (alive | dead) <= self._holders:
            self._abort("unknown-id", "the request names clients that did not share keys")
        self._check_alive(alive)
        if alive | dead != self._holders:
            self._abort("roster-mismatch", "some share holders are neither alive nor dead")
        if self.setup.consistency_check:
            self._check_signatures(msg, alive)
        self_out: list[tuple[str, bytes]] = []
        key_out: list[tuple[str, bytes]] = []
        for owner in sorted(self._peers):
            peer = self._peers[owner]
            kind = "self" if owner in alive else "key" if owner in dead else None
            if kind is None:
                continue
            if peer.released not in (None, kind):
                self._abort("conflicting-unmask", f"other kind of share of {owner!r} released")
            share = peer.self_share if kind == "self" else peer.key_share
            if share is None:
                continue
            peer.released = kind
            (self_out if kind == "self" else key_out).append((owner, share))
        out = UnmaskResponse(
            round=self.setup.round,
            client_id=self.client_id,
            session_id=self._session,
            self_shares=tuple(self_out),
            key_shares=tuple(key_out),
        )
        # Only the released shares matter from here on (for identical retries).
        for peer in self._peers.values():
            peer.self_share = peer.key_share = None
        self._stage = "done"
        self._last = (msg, out)
        return out

    def _check_signatures(self, msg: UnmaskRequest, alive: frozenset[str]) -> None:
        if alive != self._roster:
            self._abort("roster-mismatch", "alive list differs from the roster we signed")
        payload = roster_payload(self._session, self.setup.round, alive)
        signers = dict(msg.signatures)
        if not set(signers) <= alive:
            self._abort("unknown-id", "consistency signatures from clients not alive")
        for cid, sig in signers.items():
            if not verify(self.setup.identity_key(cid), sig, payload):
                self._abort("bad-signature", f"consistency signature of {cid!r} is invalid")
        # The quorum, not t: two different rosters cannot both collect more than
        # (n + corrupt) / 2 signatures when every honest client signs only one, so every
        # honest client that unmasks sees the same alive set (params.py, docs/security.md).
        quorum = self.setup.params.quorum
        if len(signers) < quorum:
            self._abort(
                "too-few-signatures",
                f"{len(signers)} consistency signatures, at least {quorum} needed",
            )
