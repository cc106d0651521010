"""Overlap of two audiences: visitors who saw both A and B.

Every shard answers with the *joint histogram* of its register slice:
``N[i, j]`` = registers holding ``i`` in A's sketch and ``j`` in B's.  Its
row sums are A's histogram, its column sums B's, and the histogram of
``max(i, j)`` is the union's, so the three HyperLogLog estimates and the
joint estimate below all come from one 52 x 52 table per shard, summed.

Inclusion-exclusion
    ``|A & B| = |A| + |B| - |A | B|``.  Its variance is taken as the sum of
    the three estimates' variances (``(rse n)^2`` each).  The covariances
    left out (A and B with the union, positive) would narrow it, so the
    interval errs on the wide side; its coverage is measured in
    ``benchmarks/bench_audience.py``.  The absolute error is of the order of
    the *union's* error: an intersection much smaller than ``1.04 / sqrt(m)``
    of the union cannot be told from zero, and the answer says so.

Joint maximum likelihood (Ertl 2017, "New cardinality estimation methods
for HyperLogLog sketches", section on joint estimation)
    Model the three disjoint parts ``A \\ B``, ``B \\ A`` and ``A & B`` as
    Poisson streams with rates ``a, b, x`` per register.  A register of A
    holds ``max(U_a, U_x)``, of B ``max(U_b, U_x)``, where ``U_r`` is the
    largest rank of a rate-``r`` stream: ``P(U_r <= k) = exp(-r rho(k))`` with
    ``rho(k) = 2^-k`` (k <= q) and ``rho(q + 1) = 0``.  So

        P(K_A <= i, K_B <= j) = exp(-(a rho(i) + b rho(j) + x rho(min(i, j))))

    and each cell's probability is a second difference of that.  The
    log-likelihood ``sum N[i, j] log P(i, j)`` is maximised over the logs of
    ``(a, b, x)`` (Nelder-Mead, started from inclusion-exclusion); the error
    of ``x`` comes from the observed information (the inverse Hessian of the
    log-likelihood).  It uses which registers moved together, not only the
    three marginal histograms, and so is markedly more precise when the
    intersection is small (measured in ``docs/benchmarks.md``).

Sparse sketches
    When all three distinct-coupon counts are known (every part sparse, see
    ``cover.gather_base``), the three linear-counting estimates replace the
    register ones; the intersection then has a small fraction of the error.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .hll import Z95, Estimate, estimate_from_parts


@dataclass(frozen=True)
class Overlap:
    a: Estimate
    b: Estimate
    union: Estimate
    both: float  # visitors in A and B
    both_se: float  # its standard error
    method: str  # "joint-mle", "inclusion-exclusion" or "coupons"
    ie: float  # the inclusion-exclusion estimate, kept beside the chosen one
    ie_se: float

    @property
    def interval(self) -> tuple[float, float]:
        lo = max(0.0, self.both - Z95 * self.both_se)
        hi = min(self.both + Z95 * self.both_se, min(self.a.value, self.b.value) * (1 + Z95 * max(
            self.a.relative_error, self.b.relative_error)))
        return lo, max(lo, hi)

    @property
    def distinguishable(self) -> bool:
        """Whether the intersection is told apart from zero (its 95 % interval excludes 0)."""
        return self.both - Z95 * self.both_se > 0

    def to_dict(self) -> dict:
        lo, hi = self.interval
        u = max(self.union.value, 1e-9)

        def side(e: Estimate) -> dict:
            return {"unique_visitors": e.unique_visitors, "relative_error": round(float(e.relative_error), 6),
                    "interval": [int(math.floor(e.interval[0])), int(math.ceil(e.interval[1]))
                                 if math.isfinite(e.interval[1]) else None], "exact": e.exact}

        both = max(0.0, self.both)
        note = None
        if not self.distinguishable:
            note = ("the overlap is too small to tell from zero at this sketch precision: the 95 % interval "
                    f"reaches 0 (standard error {self.both_se:,.0f} visitors)")
        return {
            "a": side(self.a), "b": side(self.b), "union": side(self.union),
            "both": {"unique_visitors": int(round(both)), "standard_error": round(float(self.both_se), 3),
                     "relative_error": round(float(self.both_se / both), 6) if both > 0 else None,
                     "interval": [int(math.floor(lo)), int(math.ceil(hi))], "method": self.method,
                     "inclusion_exclusion": int(round(max(0.0, self.ie)))},
            "jaccard": round(float(both / u), 6),
            "jaccard_interval": [round(float(lo / u), 6), round(float(min(1.0, hi / u)), 6)],
            "share_of_a": round(float(both / self.a.value), 6) if self.a.value > 0 else None,
            "share_of_b": round(float(both / self.b.value), 6) if self.b.value > 0 else None,
            "distinguishable": self.distinguishable, "note": note,
            "exact": self.a.exact and self.b.exact and self.union.exact,
            "partial": self.a.partial,
        }


def union_histogram(joint: np.ndarray) -> np.ndarray:
    """The histogram of ``max(i, j)`` over a joint histogram."""
    H = joint.shape[0]
    i = np.maximum.outer(np.arange(H), np.arange(H))
    return np.bincount(i.ravel(), weights=joint.ravel(), minlength=H).astype(np.int64)


def _rho(H: int) -> np.ndarray:
    r = np.ldexp(1.0, -np.arange(H))
    r[-1] = 0.0
    return r


class _JointModel:
    """The log-likelihood of a joint histogram under rates (a, b, x) per register."""

    def __init__(self, joint: np.ndarray):
        H = joint.shape[0]
        ii, jj = np.nonzero(joint)
        self.n = joint[ii, jj].astype(np.float64)
        rho = _rho(H)
        ext = np.r_[np.inf, rho]  # rho(-1) = inf: P(K <= -1) = 0
        # rho at (i, j), (i - 1, j), (i, j - 1), (i - 1, j - 1) and at the min of each pair
        self.ri = np.stack([ext[ii + 1], ext[ii], ext[ii + 1], ext[ii]])
        self.rj = np.stack([ext[jj + 1], ext[jj + 1], ext[jj], ext[jj]])
        self.rm = np.maximum(self.ri, self.rj)
        self.sign = np.array([1.0, -1.0, -1.0, 1.0])[:, None]

    def loglik(self, a: float, b: float, x: float) -> float:
        with np.errstate(invalid="ignore", over="ignore"):
            e = -(a * self.ri + b * self.rj + x * self.rm)
            e = np.where(np.isnan(e), -np.inf, e)  # 0 * inf: a rate of 0 times an impossible bound
            p = (self.sign * np.exp(e)).sum(axis=0)
        if (p <= 0).any():
            p = np.maximum(p, 1e-300)
        return float((self.n * np.log(p)).sum())


def _nelder_mead(f, x0: np.ndarray, step: float = 0.3, iters: int = 400, tol: float = 1e-10) -> np.ndarray:
    """Minimise ``f`` from ``x0`` (a small, dependency-free Nelder-Mead)."""
    n = len(x0)
    pts = [x0] + [x0 + step * np.eye(n)[i] for i in range(n)]
    vals = [f(p) for p in pts]
    for _ in range(iters):
        order = np.argsort(vals)
        pts, vals = [pts[i] for i in order], [vals[i] for i in order]
        if abs(vals[-1] - vals[0]) <= tol * (1 + abs(vals[0])):
            break
        c = np.mean(pts[:-1], axis=0)
        xr = c + (c - pts[-1])
        fr = f(xr)
        if fr < vals[0]:
            xe = c + 2 * (c - pts[-1])
            fe = f(xe)
            pts[-1], vals[-1] = (xe, fe) if fe < fr else (xr, fr)
        elif fr < vals[-2]:
            pts[-1], vals[-1] = xr, fr
        else:
            xc = c + 0.5 * (pts[-1] - c)
            fc = f(xc)
            if fc < vals[-1]:
                pts[-1], vals[-1] = xc, fc
            else:
                pts = [pts[0]] + [pts[0] + 0.5 * (p - pts[0]) for p in pts[1:]]
                vals = [vals[0]] + [f(p) for p in pts[1:]]
    return pts[int(np.argmin(vals))]


def joint_mle(joint: np.ndarray, start: tuple[float, float, float]) -> tuple[float, float, float, float]:
    """(|A \\ B|, |B \\ A|, |A & B|, standard error of |A & B|) for the registers of ``joint``
    (counts over those registers; the caller scales a partial answer)."""
    m = float(joint.sum())
    model = _JointModel(joint)
    floor = 1e-3  # per register: rates are fitted in logs, so 0 is approached, never reached
    x0 = np.log(np.maximum(np.asarray(start, float) / m, floor))

    def nll(t):
        return -model.loglik(*np.exp(t))

    t = _nelder_mead(nll, x0)
    t = _nelder_mead(nll, t, step=0.05)  # restart: Nelder-Mead can stall on a ridge
    rates = np.exp(t)
    # observed information in the rates themselves (per register), by central differences
    h = np.maximum(rates * 1e-3, 1e-6)
    H = np.zeros((3, 3))

    def ll(r):
        return model.loglik(*np.maximum(r, 0.0))

    f0 = ll(rates)
    for i in range(3):
        for j in range(i, 3):
            ei, ej = np.eye(3)[i] * h[i], np.eye(3)[j] * h[j]
            if i == j:
                H[i, i] = (ll(rates + ei) - 2 * f0 + ll(rates - ei)) / (h[i] * h[i])
            else:
                H[i, j] = H[j, i] = (ll(rates + ei + ej) - ll(rates + ei - ej) - ll(rates - ei + ej)
                                     + ll(rates - ei - ej)) / (4 * h[i] * h[j])
    try:
        cov = np.linalg.inv(-H)
        se_x = math.sqrt(max(cov[2, 2], 0.0)) * m
    except np.linalg.LinAlgError:
        se_x = math.inf
    if not math.isfinite(se_x):
        se_x = math.inf
    a, b, x = rates * m
    return float(a), float(b), float(x), se_x


def estimate_overlap(joint: np.ndarray, counts: np.ndarray | None, m: int, registers_seen: int | None = None
                     ) -> Overlap:
    """The overlap answer from a summed joint histogram (``hist_len`` square)
    and, when every shard counted them, the distinct coupons of A, B and A | B."""
    joint = np.asarray(joint, np.int64)
    ha, hb, hu = joint.sum(axis=1), joint.sum(axis=0), union_histogram(joint)
    counts = np.full(3, -1) if counts is None else np.asarray(counts)
    sparse = bool((counts >= 0).all())
    ea, eb, eu = (estimate_from_parts(h, int(c) if c >= 0 else None, m, registers_seen)
                  for h, c in zip((ha, hb, hu), counts))
    ie = ea.value + eb.value - eu.value
    ie_se = math.sqrt(sum((e.relative_error * e.value) ** 2 for e in (ea, eb, eu)))
    if sparse:
        return Overlap(ea, eb, eu, max(0.0, ie), ie_se, "coupons", ie, ie_se)
    seen = int(joint.sum())
    scale = m / seen if seen else 1.0
    f = 1.0 / scale
    start = (max(ea.value - ie, 1.0) * f, max(eb.value - ie, 1.0) * f, max(ie, 1.0) * f)
    a, b, x, se = joint_mle(joint, start)
    x, se = x * scale, se * scale
    if seen < m:  # part of the register space: the sampling error of the part seen, as for one key
        se = math.sqrt(se * se + x * (1 - f) / f)
    if not math.isfinite(se):
        return Overlap(ea, eb, eu, max(0.0, ie), ie_se, "inclusion-exclusion", ie, ie_se)
    return Overlap(ea, eb, eu, x, se, "joint-mle", ie, ie_se)

