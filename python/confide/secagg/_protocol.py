"""Derivations shared by client and server (no state, no secrets kept)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any, TypeVar

from confide.secagg.crypto import advert_payload, session_id, task_binding
from confide.secagg.graph import harary_graph
from confide.secagg.messages import Advertisement, Message, RoundSetup
from confide.secagg.primitives import MaskDomain

MASK_PURPOSE = "secaggplus/mask/v1"
M = TypeVar("M", bound=Message)


def coerce(cls: type[M], msg: M | Mapping[str, Any]) -> M:
    """Accept a message object or its JSON dict (decoded strictly)."""
    if isinstance(msg, cls):
        return msg
    if isinstance(msg, Message):
        from confide.errors import MessageFormatError

        raise MessageFormatError(f"expected {cls.__name__}, got {type(msg).__name__}")
    return cls.from_json(msg)


def payload(setup: RoundSetup, digest: bytes, adv: Advertisement) -> bytes:
    """Return the bytes ``adv`` is a signature over (setup digest bound to its task hash)."""
    return advert_payload(
        task_binding(digest, adv.task_sha256),
        setup.round,
        adv.client_id,
        adv.enc_pk,
        adv.mask_pk,
        adv.self_commit,
    )


def compute_session(setup: RoundSetup, digest: bytes, adverts: Iterable[Advertisement]) -> bytes:
    """Session id: a hash of the round configuration and every advertisement."""
    return session_id(
        digest,
        setup.round,
        ((a.client_id, payload(setup, digest, a) + a.signature) for a in adverts),
    )


def neighbours(setup: RoundSetup, ids: Sequence[str], session: bytes) -> dict[str, tuple[str, ...]]:
    """Return the Harary graph of the round over the clients that advertised keys."""
    return harary_graph(ids, setup.params.k, session)


def share_group(nbrs: Mapping[str, tuple[str, ...]], owner: str) -> tuple[str, ...]:
    """Return the holders of ``owner``'s shares: its neighbours and itself, sorted.

    Share ``i`` of :func:`confide.split_secret` goes to the ``i``-th holder.
    """
    return tuple(sorted((*nbrs[owner], owner)))


def domain(setup: RoundSetup, session: bytes) -> MaskDomain:
    """Mask domain: the session, round and a fixed purpose.

    Self and pairwise masks share it: their seeds are independent (random vs. HKDF outputs).
    """
    return MaskDomain(session, setup.round, MASK_PURPOSE)


def packed_len(setup: RoundSetup) -> int:
    """Bytes of one bit-packed upload: ``vector_length + 1`` elements (update, weight)."""
    return ((setup.vector_length + 1) * setup.params.modulus_bits + 7) // 8


def pair_sign(me: str, peer: str) -> int:
    """Sign with which ``me`` adds the mask shared with ``peer``: ``+1`` iff ``me < peer``."""
    return 1 if me < peer else -1
