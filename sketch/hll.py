"""HyperLogLog math: coupons, registers, the estimator and its error.

Layout
------
A visitor's 64-bit hash ``h`` (see ``sketch.hashing``) is read from the top:

    bit 63 ................................................. bit 0
    | index: top p bits | rank source: the remaining 64 - p bits  |

* register index  ``i = h >> (64 - p)``, one of ``m = 2**p`` registers;
* register value  ``rank = (number of leading zeros of the remaining
  64 - p bits) + 1``, from 1 to ``q + 1`` where ``q = 64 - p``;
* a register holds the largest rank seen, so merging two sketches is an
  element-wise ``max``: commutative, associative and idempotent.

Sparse form ("coupons", as in HLL++ and DataSketches).  While a sketch is small
it stores, instead of ``m`` registers, one 32-bit *coupon* per distinct value
of the top ``SPARSE_P = 26`` bits:

    coupon = (h >> 38) << 6 | rank26        rank26 = nlz(low 38 bits) + 1 (1..39)

A coupon converts exactly to the register it would update at any ``p <= 26``
(``coupon_registers``), so a sparse sketch turned dense is byte-for-byte the
sketch built dense from the start.  Counting distinct coupon indices is
linear counting over 2**26 buckets: exact in practice below a few thousand
visitors (``exact`` below), and the reason small counts are near exact.

Register ranges (``RegisterRange``).  ``S`` shards (``S`` a power of two
dividing ``m``) each own ``R = m / S`` contiguous registers ``[s*R, (s+1)*R)``; a visitor's shard is
``i // R``, a function of its hash alone, and the concatenation of all shards'
slices is the unsharded sketch.

Estimator.  Ertl, "New cardinality estimation algorithms for HyperLogLog
sketches" (2017), improved raw estimator (Algorithm 6).  It reads only the
histogram ``C[k]`` = number of registers holding ``k`` (``k = 0..q+1``),
so a shard summarises its slice as ``q + 2 = 52`` integers and the sum of
the shards' histograms gives the estimate.  No empirical bias tables; its
relative standard error is about ``1.04 / sqrt(m)`` over the whole range
(0.81 % at p = 14).  A subset of the register ranges (shards down) still
gives an unbiased estimate, scaled by ``m / m_seen`` with error
``1.04 / sqrt(m_seen)``.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np

HASH_BITS = 64
DEFAULT_P = 14  # 16,384 registers: 0.81 % standard error, 12-16 KiB dense
MIN_P, MAX_P = 8, 18  # p <= 18 keeps the coupon->register table small (2**(26-p))
SPARSE_P = 26  # coupon index bits; 26 + 6 rank bits = one uint32, as DataSketches
SPARSE_SHIFT = HASH_BITS - SPARSE_P  # 38 low bits feed the coupon's rank
RANK_BITS = 6
RANK_MASK = (1 << RANK_BITS) - 1
SPARSE_M = 1 << SPARSE_P
ALPHA_INF = 1.0 / (2.0 * math.log(2.0))
Z95 = 1.959963984540054
# "exact" when the chance that two distinct visitors share a coupon index
# (birthday bound k^2 / 2^27) is below 1 %: k <= 1158.
EXACT_MAX = int(math.sqrt(0.01 * 2 * SPARSE_M))

_U64 = np.uint64


def _bit_length(x: np.ndarray) -> np.ndarray:
    """Bit length of non-negative integers below 2**53 (exact via frexp)."""
    return np.frexp(x.astype(np.float64))[1].astype(np.int64)


def coupons_from_hashes(h: np.ndarray) -> np.ndarray:
    """uint64 hashes -> uint32 coupons ``(h >> 38) << 6 | rank26``."""
    h = np.asarray(h, dtype=np.uint64)
    low = h & _U64((1 << SPARSE_SHIFT) - 1)
    rank = (SPARSE_SHIFT + 1) - _bit_length(low)  # nlz within 38 bits, + 1
    return (((h >> _U64(SPARSE_SHIFT)) << _U64(RANK_BITS)) | rank.astype(np.uint64)).astype(np.uint32)


def register_of_hash(h: int, p: int) -> tuple[int, int]:
    """(index, rank) a single hash updates at precision p: the definition, unvectorized."""
    q = HASH_BITS - p
    rest = h & ((1 << q) - 1)
    return h >> q, q - rest.bit_length() + 1


def coupon_register(coupons: np.ndarray, p: int) -> np.ndarray:
    """The register index (0 .. 2**p - 1) each coupon updates at precision ``p``:
    the top ``p`` of its 26 index bits."""
    return ((np.asarray(coupons, dtype=np.uint32) >> np.uint32(RANK_BITS)) >> np.uint32(SPARSE_P - p)).astype(np.int64)


def check_precision(p: int) -> None:
    if not (MIN_P <= p <= MAX_P):
        raise ValueError(f"precision p={p} is outside the supported range {MIN_P}..{MAX_P}")


def check_shards(shards: int, p: int) -> None:
    """Shards split the 2**p registers into equal contiguous ranges: a power of two, at most 2**p."""
    m = 1 << p
    if isinstance(shards, bool) or not isinstance(shards, (int, np.integer)) or shards < 1 \
            or shards & (shards - 1) or shards > m:
        raise ValueError(f"shard count {shards} must be a power of two between 1 and {m}")


@functools.lru_cache(maxsize=None)
def _rank_tables(low_bits: int) -> tuple[np.ndarray, np.ndarray | None]:
    """The rank a coupon's index bits below the register give when not all zero
    (``low_rank``), and, for p >= 12, the rank of every value of a coupon's low
    ``6 + low_bits`` bits (its index's bits below the register and its rank26):
    one table lookup a coupon (256 KB at p = 14).  Built once per precision."""
    low = np.arange(1 << low_bits, dtype=np.int64)
    low_rank = (low_bits - _bit_length(low) + 1).astype(np.uint8)
    if low_bits > 14:  # p < 12: the table would pass 1 MB
        return low_rank, None
    v = np.arange(1 << (RANK_BITS + low_bits), dtype=np.int32)
    lo = v >> RANK_BITS
    return low_rank, np.where(lo != 0, low_rank[lo], (v & RANK_MASK) + low_bits).astype(np.uint8)


class Precision:
    """Constants derived from the precision ``p`` alone."""

    def __init__(self, p: int = DEFAULT_P):
        check_precision(p)
        self.p, self.m, self.q = p, 1 << p, HASH_BITS - p
        self.hist_len = self.q + 2  # register values 0..q+1
        self.low_bits = SPARSE_P - p  # coupon index bits below the register index
        self._low_rank, self._rank_of_low = _rank_tables(self.low_bits)

    def coupon_registers(self, coupons: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Coupons -> (register index, rank) at this precision."""
        c = np.asarray(coupons, dtype=np.uint32)
        shift = RANK_BITS + self.low_bits
        if self._rank_of_low is not None:
            return (c >> np.uint32(shift)).astype(np.int64), self._rank_of_low[c & np.uint32((1 << shift) - 1)]
        idx = c >> RANK_BITS
        low = idx & np.uint32((1 << self.low_bits) - 1)
        rank = np.where(low != 0, self._low_rank[low], (c & RANK_MASK).astype(np.uint8) + np.uint8(self.low_bits))
        return (idx >> self.low_bits).astype(np.int64), rank.astype(np.uint8)


class RegisterRange:
    """The registers ``[lo, lo + R)`` that shard ``shard`` of ``shards`` owns.

    Every shard store and row table works on one such range: a dense row is
    its ``R`` registers, and register indices inside it are relative to ``lo``.
    """

    def __init__(self, p: int = DEFAULT_P, shards: int = 1, shard: int = 0):
        self.prec = Precision(p)
        check_shards(shards, p)
        if not (0 <= shard < shards):
            raise ValueError(f"shard index {shard} is outside 0..{shards - 1}")
        self.p, self.shards, self.shard = p, shards, shard
        self.R = self.prec.m // shards  # registers per shard
        self.lo = shard * self.R
        self.hi = self.lo + self.R
        # a dense slice costs R bytes in memory and, compressed, about a third
        # of that at rest; a coupon costs 4 bytes either way.  Switching to
        # dense past R/8 coupons keeps a sparse row at most half a dense one
        # in memory and never much above a dense one at rest.
        self.dense_threshold = max(1, self.R // 8)
        # Counted answers are decided on the whole sketch, never on one slice,
        # so the shard count cannot change an answer (``answer.merge_answers``):
        # a range is counted from its coupons when its impressions on all shards
        # together are at most ``exact_budget`` (2 m: the near-exact path,
        # ``cover.gather_base``), or when its distinct coupons are at most
        # ``count_limit`` (m / 8, what one sparse row of the whole sketch holds).
        # A shard reads level-0 rows while its own impressions are within the
        # budget (a shard's share never exceeds the whole), so the path reads at
        # most 2 m coupons (an event is at most one) a key a shard.
        self.exact_budget = 2 * self.prec.m
        self.count_limit = self.prec.m // 8

    def coupon_registers(self, coupons: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Coupons -> (register index relative to this range, rank)."""
        reg, rank = self.prec.coupon_registers(coupons)
        return reg - self.lo, rank

    def owns(self, coupons: np.ndarray) -> bool:
        """Whether every coupon falls in this range's registers."""
        if not len(coupons):
            return True
        reg = coupon_register(coupons, self.p)
        return bool(reg.min() >= self.lo and reg.max() < self.hi)

    def shard_of_hashes(self, h: np.ndarray) -> np.ndarray:
        return (np.asarray(h, dtype=np.uint64) >> _U64(HASH_BITS - self.p)).astype(np.int64) // self.R

    def registers_from_coupons(self, coupons: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """Scatter coupons into this range's dense register slice (max)."""
        if out is None:
            out = np.zeros(self.R, dtype=np.uint8)
        if len(coupons):
            reg, rank = self.coupon_registers(coupons)
            np.maximum.at(out, reg, rank)
        return out


# ---------------------------------------------------------------- estimator


def _sigma(x: float) -> float:
    if x == 1.0:
        return math.inf
    y, z = 1.0, x
    while True:
        x *= x
        z_old = z
        z += x * y
        y += y
        if z == z_old:
            return z


def _tau(x: float) -> float:
    if x == 0.0 or x == 1.0:
        return 0.0
    y, z = 1.0, 1.0 - x
    while True:
        x = math.sqrt(x)
        z_old = z
        y *= 0.5
        z -= (1.0 - x) ** 2 * y
        if z == z_old:
            return z / 3.0


def ertl_estimate(hist: np.ndarray) -> float:
    """Ertl's improved estimator from a register-value histogram ``C[0..q+1]``.

    ``m`` is the histogram's total, so a histogram of a subset of registers
    estimates the distinct count among hashes falling into that subset.
    """
    c = np.asarray(hist, dtype=np.float64)
    m = float(c.sum())
    if m == 0:
        return 0.0
    q = len(c) - 2
    z = m * _tau(1.0 - c[q + 1] / m)
    for k in range(q, 0, -1):
        z = 0.5 * (z + c[k])
    z += m * _sigma(c[0] / m)
    return ALPHA_INF * m * m / z if z != math.inf else 0.0


def _sigma_vec(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64).copy()
    z, y = x.copy(), np.ones_like(x)
    one = x == 1.0
    x[one] = 0.0
    while True:
        x *= x
        z_old = z.copy()
        z += x * y
        y += y
        if (z == z_old).all():
            break
    z[one] = np.inf
    return z


def _tau_vec(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64).copy()
    edge = (x == 0.0) | (x == 1.0)
    x[edge] = 0.5
    y, z = np.ones_like(x), 1.0 - x
    while True:
        x = np.sqrt(x)
        z_old = z.copy()
        y *= 0.5
        z -= (1.0 - x) ** 2 * y
        if (z == z_old).all():
            break
    z = z / 3.0
    z[edge] = 0.0
    return z


def ertl_estimates(hists: np.ndarray) -> np.ndarray:
    """``ertl_estimate`` of every row of ``hists`` at once (a series' points)."""
    c = np.asarray(hists, dtype=np.float64)
    m = c.sum(axis=1)
    out = np.zeros(len(c))
    ok = m > 0
    if not ok.any():
        return out
    c, m = c[ok], m[ok]
    q = c.shape[1] - 2
    z = m * _tau_vec(1.0 - c[:, q + 1] / m)
    for k in range(q, 0, -1):
        z = 0.5 * (z + c[:, k])
    z = z + m * _sigma_vec(c[:, 0] / m)
    with np.errstate(divide="ignore"):
        out[ok] = np.where(np.isfinite(z), ALPHA_INF * m * m / z, 0.0)
    return out


def linear_count(k: int, m: int = SPARSE_M) -> float:
    """Linear counting: distinct items given ``k`` of ``m`` buckets occupied."""
    if k >= m:
        return float("inf")
    return -m * math.log1p(-k / m)


def linear_count_rse(n: float, m: int = SPARSE_M) -> float:
    """Relative standard error of linear counting (Whang et al. 1990)."""
    if n <= 0:
        return 0.0
    t = n / m
    return math.sqrt(m * (math.expm1(t) - t)) / n


@dataclass(frozen=True)
class Estimate:
    """A distinct count with its error bars.

    ``value`` is the point estimate; ``relative_error`` its relative standard
    error; ``interval`` the 95 % interval; ``exact`` says the count was
    counted from coupons, not estimated (it equals the true count unless two
    visitors share a 26-bit coupon index, which is under 1 % likely);
    ``partial`` says some register ranges did not answer and the estimate
    extrapolates from the others (unbiased, wider error).
    """

    value: float
    relative_error: float
    interval: tuple[float, float]
    exact: bool
    partial: bool = False
    registers_seen: int = 0

    @property
    def unique_visitors(self) -> int:
        return int(round(self.value))


def estimate_from_parts(hist: np.ndarray, sparse_count: int | None, m: int, registers_seen: int | None = None,
                        raw: float | None = None) -> Estimate:
    """Combine a summed histogram (and, when every part was sparse, the summed
    distinct-coupon count) into an ``Estimate``.

    ``registers_seen`` (default: the histogram total) below ``m`` means only
    a fraction ``f`` of the register space answered: the estimate is scaled
    by ``1 / f`` and flagged partial, and its error adds the sampling error
    of seeing only that fraction of the visitors, ``sqrt((1 - f) / (n f))``.
    """
    hist = np.asarray(hist, dtype=np.int64)
    seen = int(hist.sum()) if registers_seen is None else int(registers_seen)
    if seen == 0:
        return Estimate(0.0, math.inf, (0.0, math.inf), False, True, 0)
    f = seen / m
    partial = seen < m
    if sparse_count is not None:
        k = int(sparse_count)
        if not partial and k <= EXACT_MAX:
            return Estimate(float(k), 0.0, (float(k), float(k)), True, False, seen)
        m_sparse = SPARSE_M * seen // m
        n_seen = linear_count(k, m_sparse)
        rse = linear_count_rse(n_seen, m_sparse)
        floor = float(k)  # at least one visitor per occupied coupon index
    else:
        n_seen = ertl_estimate(hist) if raw is None else float(raw)  # raw: computed with ertl_estimates
        rse = 1.04 / math.sqrt(seen)
        floor = float(seen - hist[0])  # at least one visitor per non-empty register
    n = n_seen / f
    if partial:
        rse = math.sqrt(rse * rse + (1 - f) / (max(n, 1.0) * f))
    lo = max(floor, n * (1 - Z95 * rse))
    return Estimate(n, rse, (lo, max(lo, n * (1 + Z95 * rse))), False, partial, seen)
