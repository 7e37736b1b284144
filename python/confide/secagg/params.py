"""Threat model -> SecAgg+ parameters: neighbour count k, threshold t, modulus bits.

Notation: ``n`` clients in the cohort, at most ``C = ceil(gamma * n)`` of them corrupted and
colluding with the server, at most ``D = floor(delta * n)`` dropping out over the whole
round. Every client ``i`` Shamir-shares its two secrets (self-mask seed and mask-key seed)
``t``-of-``(k + 1)`` among its *share group* ``S(i) = N(i) + {i}``: its ``k`` neighbours in a
random Harary graph ``H(n, k)`` (Bell et al., CCS 2020) plus itself, so a survivor's own share
counts toward ``t`` (as in Flower). The complete graph is ``k = n - 1``.

The analysis (union bounds; Bell et al. 2020, Section 4 and Appendix; Bonawitz et al. 2017)
assumes, as Bell et al. do, that the corrupted and the dropped sets do not depend on the
graph; in a random Harary graph each client's neighbourhood is then a uniformly random
``k``-subset of the other ``n - 1`` clients, so the number of corrupted (dropped) neighbours
of a client is hypergeometric ``Hyp(n - 1, C, k)`` (``Hyp(n - 1, D, k)``).

**Privacy** (probability at most ``2**-security_bits``), two bad events:

* *leak*: the server obtains both the self-mask seed and the mask key of some honest client.
  Honest holders release at most one kind of share of a given owner (the client-side rule),
  corrupted holders release both; with ``c`` corrupted holders the server gets ``t`` of each
  kind only if ``2t <= (k + 1 - c) + 2c``. We therefore need ``c <= 2t - k - 2`` and require
  ``n * P[Hyp(n - 1, C, k) >= 2t - k - 1]`` to be small. This also forces ``2t >= k + 2``.
* *disconnection*: after removing the ``r = C + D`` corrupted and dropped clients the honest
  survivors' graph must stay connected, otherwise the server learns partial sums. A Harary
  ring (random cyclic order, ``k/2`` neighbours each side) only disconnects if two disjoint
  runs of ``k/2`` consecutive positions are all removed, so this needs ``r >= k`` (and then
  has probability at most ``C(n, 2) * r!/(r-k)! * (n-k)!/n!``). With ``r < k`` it cannot
  happen at all, even for dropouts chosen by the server after seeing the graph.

**Correctness** (probability at most ``2**-failure_bits``): every secret the server needs has
at least ``t`` live holders; a client with ``d`` dropped neighbours keeps ``k - d`` live
holders besides itself, so we require ``n * P[Hyp(n - 1, D, k) >= k - t + 1]`` small.

For a given even ``k`` the threshold is the *largest* ``t`` meeting correctness (most privacy
for that ``k``); the smallest ``k`` whose ``t`` also meets privacy wins. If no ``k <= n - 2``
works, the complete graph is used: there the bounds are deterministic (``t = n - D``, privacy
iff ``C <= 2t - n - 1``). Both graphs also need at least two honest survivors
(``n - C - D >= 2``). Clients refuse to unmask with fewer than ``max(t, n - D)`` survivors, so
the dropout budget in the threat model is enforced, not just assumed.

**A unique roster (malicious server).** The bounds above count, per owner, the shares
*honest holders* release, and assume every honest holder sees the same roster: an owner is
either alive for all of them (self-mask shares only) or dead for all of them (mask-key
shares only). A malicious server could otherwise show different holders different
self-consistent rosters and collect ``t`` self-mask shares of a victim from some and ``t``
mask-key shares of the victim's neighbours from others (no colluder needed). With the
consistency check on, a client unmasks only the roster it signed itself and only with
``quorum = floor((n + C) / 2) + 1`` valid signatures from distinct cohort members on it.
*Claim:* two different rosters cannot both be accepted. *Proof sketch:* an honest client
signs at most one roster per session (its stage machine); if ``R1 != R2`` each carry ``q``
signatures, their signer sets overlap only in corrupted clients, so
``2q - C <= |S1 u S2| <= n``, i.e. ``q <= (n + C) / 2``, contradicting ``q > (n + C) / 2``.
So every honest client that unmasks sees the same alive set ``A`` (and dead set
``holders - A``), which is the one-roster setting of the bounds. Liveness needs
``min_survivors >= quorum`` (about ``delta < (1 - gamma) / 2``); ``derive_params(...,
malicious=True)`` refuses otherwise. Without the consistency check (``semi-honest``) the
server is trusted to send one roster, and the bounds hold only against a server that follows
the protocol (colluding with up to ``C`` clients).

**What the 2^-40 covers.** ``log2_privacy_failure`` bounds the probability over the random
graph that the server, colluding with a set of at most ``C`` clients and seeing at most ``D``
dropouts, both fixed independently of the graph, learns more than the sum of the alive
inputs; with a malicious server it holds when the consistency check (unique roster) is on.
The disconnection term holds for dropouts chosen *after* seeing the graph only when
``C + D < k`` (then it is zero); otherwise a server that declares dead exactly the clients
that isolate a victim is outside the bound (it is limited to ``D`` such declarations, since
a roster needs ``min_survivors`` members).

**Modulus.** Each client uploads ``d`` quantized values in ``[0, 2**quant_bits - 1]`` and its
weight in ``[0, max_weight]``; the sum of ``n`` such vectors is below
``2**modulus_bits`` for ``modulus_bits = bit_length(n * max(2**quant_bits - 1, max_weight))``,
so the aggregate in ``Z_(2**modulus_bits)`` never wraps. More than 64 bits is refused.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any, Literal

from confide.errors import InfeasibleConfigError

__all__ = [
    "SecAggParams",
    "ThreatModel",
    "assess",
    "derive_params",
    "required_modulus_bits",
]

_NEG_INF = float("-inf")
_MAX_QUANT_BITS = 32
_MIN_RING_BITS = 8
_LN2 = math.log(2.0)


@dataclass(frozen=True)
class ThreatModel:
    """What the job tolerates, as stated in its configuration.

    Parameters
    ----------
    adversarial_fraction : float
        Fraction ``gamma`` of cohort clients that may be corrupted (colluding with the
        server), ``0 <= gamma < 1``.
    dropout_fraction : float
        Fraction ``delta`` of cohort clients that may drop out during a round,
        ``0 <= delta < 1``.
    security_bits : int, default 40
        Statistical security ``sigma``: privacy fails with probability ``<= 2**-sigma``.
    failure_bits : int, default 20
        Correctness ``eta``: a round fails despite the dropout budget with probability
        ``<= 2**-eta``.

    Examples
    --------
    >>> ThreatModel(0.05, 0.1).security_bits
    40
    """

    adversarial_fraction: float
    dropout_fraction: float
    security_bits: int = 40
    failure_bits: int = 20

    def __post_init__(self) -> None:
        for name in ("adversarial_fraction", "dropout_fraction"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and 0.0 <= value < 1.0):
                raise InfeasibleConfigError(f"{name} must be in [0, 1), got {value!r}")
        for name in ("security_bits", "failure_bits"):
            value = getattr(self, name)
            if not (isinstance(value, int) and 1 <= value <= 128):
                raise InfeasibleConfigError(f"{name} must be an int in [1, 128], got {value!r}")

    def corrupt(self, n: int) -> int:
        """Return the number of corrupted clients assumed for a cohort of ``n``."""
        return min(n, math.ceil(self.adversarial_fraction * n - 1e-9))

    def dropouts(self, n: int) -> int:
        """Return the number of dropouts tolerated in a cohort of ``n``."""
        return math.floor(self.dropout_fraction * n + 1e-9)


@dataclass(frozen=True)
class SecAggParams:
    """Public parameters of one SecAgg+ round.

    Parameters
    ----------
    n : int
        Cohort size.
    k : int
        Neighbours per client; ``n - 1`` is the complete graph, otherwise even and
        ``2 <= k <= n - 2``.
    t : int
        Shamir threshold among the ``k + 1`` members of a share group; ``2t >= k + 2``.
    max_dropouts : int
        Dropout budget ``D``; clients refuse to unmask with fewer than ``n - D`` survivors.
    quant_bits : int
        Bits of the quantizer, 1..32.
    clip_range : float
        Quantizer range: values are clipped to ``[-clip_range, clip_range]``.
    max_weight : int
        Largest aggregation weight a client may use (e.g. a sample-count cap), >= 1.
    modulus_bits : int
        Ring width ``B``; at least :func:`required_modulus_bits`, at most 64.
    corrupt : int, default 0
        Corrupted clients assumed by the analysis (informative).
    log2_privacy_failure : float, default -inf
        ``log2`` of the bound on the privacy failure probability (``-inf``: impossible).
    log2_correctness_failure : float, default -inf
        ``log2`` of the bound on the correctness failure probability.
    encoding : {"quantized", "ring"}, default "quantized"
        What a client uploads. ``"quantized"``: a float update that the client quantizes
        (``quant_bits``, ``clip_range``) and scales by ``weight / max_weight``; the sum never
        wraps. ``"ring"``: an update already encoded as ring elements in
        ``[0, 2**modulus_bits)`` (e.g. by :func:`confide.privacy.ddg_encode`), masked as is;
        the element sum is taken mod ``2**modulus_bits`` (the encoder's business), only the
        weight element must not wrap, and ``quant_bits``/``clip_range`` are unused.
        Serialised only when not the default, so quantized setups keep their encoding.

    Examples
    --------
    >>> p = SecAggParams(n=5, k=4, t=4, max_dropouts=1, quant_bits=16, clip_range=1.0,
    ...                  max_weight=100, modulus_bits=19)
    >>> p.complete, p.min_survivors
    (True, 4)
    """

    n: int
    k: int
    t: int
    max_dropouts: int
    quant_bits: int
    clip_range: float
    max_weight: int
    modulus_bits: int
    corrupt: int = 0
    log2_privacy_failure: float = _NEG_INF
    log2_correctness_failure: float = _NEG_INF
    encoding: Literal["quantized", "ring"] = "quantized"

    def __post_init__(self) -> None:
        ints = ("n", "k", "t", "max_dropouts", "quant_bits", "max_weight", "modulus_bits")
        for name in (*ints, "corrupt"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise InfeasibleConfigError(f"{name} must be an int, got {value!r}")
        n, k, t = self.n, self.k, self.t
        if n < 2:
            raise InfeasibleConfigError(f"the cohort needs at least 2 clients, got n = {n}")
        if not (k == n - 1 or (k % 2 == 0 and 2 <= k <= n - 2)):
            raise InfeasibleConfigError(
                f"k must be n - 1 = {n - 1} (complete graph) or even in [2, {n - 2}], got {k}"
            )
        if not (2 * t >= k + 2 and t <= k + 1):
            raise InfeasibleConfigError(
                f"t must satisfy (k + 2) / 2 <= t <= k + 1 = {k + 1}, got t = {t}"
            )
        if not (self.max_dropouts >= 0 and n - self.max_dropouts >= t):
            raise InfeasibleConfigError(
                f"max_dropouts must be in [0, n - t] = [0, {n - t}], got {self.max_dropouts}"
            )
        if not 1 <= self.quant_bits <= _MAX_QUANT_BITS:
            raise InfeasibleConfigError(f"quant_bits must be in [1, 32], got {self.quant_bits}")
        if not (isinstance(self.clip_range, float) and math.isfinite(self.clip_range)):
            raise InfeasibleConfigError(f"clip_range must be a finite float, got {self.clip_range}")
        if self.clip_range <= 0.0:
            raise InfeasibleConfigError(f"clip_range must be > 0, got {self.clip_range}")
        if self.max_weight < 1:
            raise InfeasibleConfigError(f"max_weight must be >= 1, got {self.max_weight}")
        if self.encoding not in ("quantized", "ring"):
            raise InfeasibleConfigError(
                f"encoding must be 'quantized' or 'ring', got {self.encoding!r}"
            )
        if self.encoding == "ring":
            # Ring elements may wrap (the encoder's business); the weight sum must not.
            need = max(_MIN_RING_BITS, (n * self.max_weight).bit_length())
        else:
            need = required_modulus_bits(n, self.quant_bits, self.max_weight)
        if not need <= self.modulus_bits <= 64:
            raise InfeasibleConfigError(
                f"modulus_bits must be in [{need}, 64] so the sum cannot wrap, "
                f"got {self.modulus_bits}"
            )

    @property
    def complete(self) -> bool:
        """Whether the graph is complete (every client is every other's neighbour)."""
        return self.k == self.n - 1

    @property
    def min_survivors(self) -> int:
        """Fewest clients with a masked input for which a client agrees to unmask."""
        return max(self.t, self.n - self.max_dropouts)

    @property
    def quorum(self) -> int:
        """Consistency signatures a client needs on the roster before it unmasks.

        ``floor((n + corrupt) / 2) + 1``: more than half of the cohort's honest members
        plus every corrupted one, so two different rosters can never both reach it (an
        honest client signs one roster per session; see the module docstring).
        """
        return (self.n + self.corrupt) // 2 + 1

    @property
    def quorum_reachable(self) -> bool:
        """Whether every roster the clients accept (``min_survivors``) can reach the quorum."""
        return self.min_survivors >= self.quorum

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-serialisable dict (infinities as ``None``)."""
        d = asdict(self)
        for name in ("log2_privacy_failure", "log2_correctness_failure"):
            if math.isinf(d[name]):
                d[name] = None
        if d["encoding"] == "quantized":
            del d["encoding"]  # the default: quantized setups serialise as before
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> SecAggParams:
        """Inverse of :meth:`to_dict`; validates every field.

        Raises
        ------
        InfeasibleConfigError
            Missing, extra or invalid fields.
        """
        names = {f for f in cls.__dataclass_fields__}
        if set(d) != names and set(d) != names - {"encoding"}:
            raise InfeasibleConfigError(f"params fields must be {sorted(names)}, got {sorted(d)}")
        kw = dict(d)
        for name in ("log2_privacy_failure", "log2_correctness_failure"):
            kw[name] = _NEG_INF if kw[name] is None else float(kw[name])
        if isinstance(kw["clip_range"], int) and not isinstance(kw["clip_range"], bool):
            kw["clip_range"] = float(kw["clip_range"])
        return cls(**kw)


def required_modulus_bits(n: int, quant_bits: int, max_weight: int) -> int:
    """Return the smallest ring width in which ``n`` uploads cannot wrap.

    Parameters
    ----------
    n : int
        Number of clients.
    quant_bits : int
        Quantizer bits (values in ``[0, 2**quant_bits - 1]``).
    max_weight : int
        Largest weight element (values in ``[0, max_weight]``).

    Returns
    -------
    int
        ``bit_length(n * max(2**quant_bits - 1, max_weight))``.

    Examples
    --------
    >>> required_modulus_bits(100, 16, 1000)
    23
    """
    return (n * max((1 << quant_bits) - 1, max_weight)).bit_length()


def _log2_hyp_tails(population: int, marked: int, draws: int) -> list[float]:
    """Return ``tails[m] = log2 P[X >= m]`` for ``X ~ Hyp(population, marked, draws)``.

    ``m = 0..draws + 1``; computed with ``lgamma`` (relative error far below the bounds' slack).
    """

    def lcomb(a: int, b: int) -> float:
        return math.lgamma(a + 1) - math.lgamma(b + 1) - math.lgamma(a - b + 1)

    lo, hi = max(0, draws - (population - marked)), min(marked, draws)
    total = lcomb(population, draws)
    tails = [_NEG_INF] * (draws + 2)
    acc = _NEG_INF
    for i in range(draws, -1, -1):
        if lo <= i <= hi:
            term = (lcomb(marked, i) + lcomb(population - marked, draws - i) - total) / _LN2
            acc = _log2_add(acc, term)
        tails[i] = min(0.0, acc)
    return tails


def _log2_disconnect(n: int, removed: int, k: int) -> float:
    if removed < k:
        return _NEG_INF
    ln = math.log(n * (n - 1) / 2)
    ln += sum(math.log(removed - i) - math.log(n - i) for i in range(k))
    return min(0.0, ln / _LN2)


def _log2_add(a: float, b: float) -> float:
    if a == _NEG_INF:
        return b
    if b == _NEG_INF:
        return a
    top = max(a, b)
    return top + math.log2(2 ** (a - top) + 2 ** (b - top))


def _tail(tails: list[float], at_least: int) -> float:
    if at_least <= 0:
        return 0.0
    return tails[at_least] if at_least < len(tails) else _NEG_INF


class _Analysis:
    """The bounds for one (n, k, C, D), with the tails computed once."""

    def __init__(self, n: int, k: int, corrupt: int, dropouts: int) -> None:
        self.n, self.k = n, k
        self.log2n = math.log2(n)
        self.corrupt_tails = _log2_hyp_tails(n - 1, corrupt, k)
        self.dropout_tails = _log2_hyp_tails(n - 1, dropouts, k)
        self.disconnect = _log2_disconnect(n, corrupt + dropouts, k)

    def privacy(self, t: int) -> float:
        leak = self.log2n + _tail(self.corrupt_tails, 2 * t - self.k - 1)
        return min(0.0, _log2_add(leak, self.disconnect))

    def correctness(self, t: int) -> float:
        return min(0.0, self.log2n + _tail(self.dropout_tails, self.k - t + 1))


def assess(n: int, k: int, t: int, corrupt: int, dropouts: int) -> tuple[float, float]:
    """Bound the failure probabilities of a (k, t) choice (see the module docstring).

    Parameters
    ----------
    n, k, t : int
        Cohort size, neighbours, threshold.
    corrupt, dropouts : int
        Corrupted clients ``C`` and dropouts ``D`` assumed.

    Returns
    -------
    tuple of float
        ``(log2 privacy failure, log2 correctness failure)``; ``-inf`` for impossible, 0.0
        for certain (or a vacuous bound).

    Examples
    --------
    >>> assess(10, 9, 8, 0, 2)
    (-inf, -inf)
    >>> assess(10, 9, 6, 3, 2)[0]
    0.0
    """
    if corrupt + dropouts > n - 2:
        return 0.0, 0.0
    if k == n - 1:
        privacy = _NEG_INF if corrupt <= 2 * t - k - 2 else 0.0
        correctness = _NEG_INF if n - dropouts >= t else 0.0
        return privacy, correctness
    analysis = _Analysis(n, k, corrupt, dropouts)
    return analysis.privacy(t), analysis.correctness(t)


def derive_params(
    n: int,
    threat: ThreatModel,
    *,
    quant_bits: int,
    clip_range: float,
    max_weight: int,
    graph: Literal["auto", "harary", "complete"] = "auto",
    malicious: bool = False,
) -> SecAggParams:
    """Choose ``k``, ``t`` and the modulus for ``n`` clients under ``threat``.

    Parameters
    ----------
    n : int
        Cohort size, >= 2.
    threat : ThreatModel
        Tolerated adversarial and dropout fractions and the target probabilities.
    quant_bits : int
        Quantizer bits, 1..32.
    clip_range : float
        Quantizer range.
    max_weight : int
        Largest aggregation weight of one client.
    graph : {"auto", "harary", "complete"}, default "auto"
        ``"auto"`` takes the smallest feasible Harary degree and falls back to the complete
        graph (which is what small cohorts get).
    malicious : bool, default False
        The round runs the consistency check (a malicious server): also require that every
        roster of ``min_survivors`` clients can reach the signature quorum.

    Returns
    -------
    SecAggParams
        Validated parameters, with the achieved bounds recorded.

    Raises
    ------
    InfeasibleConfigError
        No graph meets the bounds, the sum would need more than 64 bits, or (with
        ``malicious``) the dropout budget leaves fewer survivors than the quorum.

    Examples
    --------
    >>> p = derive_params(6, ThreatModel(0.2, 0.2), quant_bits=16, clip_range=1.0,
    ...                   max_weight=100)
    >>> p.complete, p.t, p.max_dropouts, p.modulus_bits
    (True, 5, 1, 19)
    >>> p = derive_params(1000, ThreatModel(0.05, 0.05), quant_bits=16, clip_range=1.0,
    ...                   max_weight=100)
    >>> p.complete, p.k < 200
    (False, True)
    """
    if not isinstance(n, int) or n < 2:
        raise InfeasibleConfigError(f"the cohort needs at least 2 clients, got n = {n!r}")
    if not 1 <= quant_bits <= _MAX_QUANT_BITS:
        raise InfeasibleConfigError(f"quant_bits must be in [1, 32], got {quant_bits}")
    bits = required_modulus_bits(n, quant_bits, max_weight)
    if bits > 64:
        raise InfeasibleConfigError(
            f"the sum of {n} uploads needs {bits} bits (> 64): lower quant_bits or max_weight"
        )
    corrupt, dropouts = threat.corrupt(n), threat.dropouts(n)
    if n - corrupt - dropouts < 2:
        raise InfeasibleConfigError(
            f"with n = {n}, {corrupt} corrupted and {dropouts} dropped clients fewer than two "
            "honest survivors remain"
        )
    common: dict[str, Any] = {
        "n": n,
        "max_dropouts": dropouts,
        "quant_bits": quant_bits,
        "clip_range": float(clip_range),
        "max_weight": max_weight,
        "modulus_bits": bits,
        "corrupt": corrupt,
    }
    found = _search(n, threat, graph, common, corrupt, dropouts)
    if malicious and not found.quorum_reachable:
        raise InfeasibleConfigError(
            f"with the consistency check a roster needs {found.quorum} signatures "
            f"(floor((n + C) / 2) + 1 for n = {n}, C = {corrupt}) but only "
            f"{found.min_survivors} survivors are guaranteed ({dropouts} dropouts allowed): "
            f"lower dropout_fraction below (1 - adversarial_fraction) / 2 "
            f"= {(1 - threat.adversarial_fraction) / 2:g}, or run without the consistency "
            "check (semi-honest server)"
        )
    return found


def _search(
    n: int,
    threat: ThreatModel,
    graph: str,
    common: dict[str, Any],
    corrupt: int,
    dropouts: int,
) -> SecAggParams:
    sigma, eta = -float(threat.security_bits), -float(threat.failure_bits)
    if graph in ("auto", "harary"):
        for k in range(2, n - 1, 2):
            analysis = _Analysis(n, k, corrupt, dropouts)
            if analysis.disconnect > sigma:
                continue
            # Correctness worsens as t grows, privacy as t shrinks: take the largest t that
            # is correct; if it is not private, no smaller t is either.
            for t in range(min(k + 1, n - dropouts), (k + 3) // 2 - 1, -1):
                correctness = analysis.correctness(t)
                if correctness > eta:
                    continue
                privacy = analysis.privacy(t)
                if privacy <= sigma:
                    return SecAggParams(
                        k=k,
                        t=t,
                        log2_privacy_failure=privacy,
                        log2_correctness_failure=correctness,
                        **common,
                    )
                break
    if graph in ("auto", "complete"):
        k, t = n - 1, n - dropouts
        privacy, correctness = assess(n, k, t, corrupt, dropouts)
        if 2 * t >= k + 2 and privacy <= sigma and correctness <= eta:
            return SecAggParams(
                k=k,
                t=t,
                log2_privacy_failure=privacy,
                log2_correctness_failure=correctness,
                **common,
            )
    raise InfeasibleConfigError(
        f"no {'graph' if graph == 'auto' else graph + ' graph'} meets 2^-{threat.security_bits} "
        f"privacy and 2^-{threat.failure_bits} correctness for n = {n} with up to {corrupt} "
        f"corrupted and {dropouts} dropped clients"
    )
