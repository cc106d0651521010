"""Which of numpy's vector kernels this process uses, chosen before numpy loads.

numpy picks, at import, the widest kernels the CPU offers.  On AMD Zen 4
(``cpu family`` 25 with AVX-512: EPYC 9xx4, Ryzen 7000; AWS m7a, GCP c3d)
its AVX-512 sort (``np.sort``, ``argsort``, and so ``unique`` and every
sort-based step of ours) partitions with a compress-store to memory, an
instruction that chip runs as microcode at over 100 cycles: a sort of a
million 32-bit values takes 32-35 ms there against 5-8 ms on the AVX2 kernels
of the same numpy (``benchmarks/bench_simd.py``).  Zen 5 (family 26) and
Intel run it at full speed, and Zen 4's other AVX-512 kernels are no faster
than AVX2 (its 512-bit units are two 256-bit halves), so on Zen 4 alone the
AVX-512 kernels are turned off, through numpy's own switch,
``NPY_DISABLE_CPU_FEATURES``, which it reads once, at import (after checking,
once per machine, that this numpy accepts it: ``numpy_accepts``).

``fit_numpy()`` runs first thing in every package of ours (each package's
``__init__`` imports this module before anything that imports numpy), and
sets the variable in ``os.environ``, so that processes started from this one
(a local Ray's raylet and so every worker it starts, an ingest job's
children) inherit it before they load numpy.  A variable already set, even
empty, is the operator's choice and is left alone.  No numpy import here.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import subprocess
import sys
import tempfile
from importlib import metadata

VARIABLE = "NPY_DISABLE_CPU_FEATURES"

# numpy >= 2.4 names the AVX-512 levels as groups; earlier 2.x names each feature
NAMES_2_4 = "X86_V4 AVX512_ICL AVX512_SPR"
NAMES_2_0 = "AVX512F AVX512CD AVX512_SKX AVX512_CLX AVX512_CNL AVX512_ICL AVX512_SPR"

# what this process decided: ``chosen`` the value it set (None: it set none), ``disabled`` the value its numpy
# read, ``why``
STATE: dict = {}


def cpu_facts(cpuinfo: str) -> dict:
    """``vendor``, ``family`` and ``flags`` of the first processor in a ``/proc/cpuinfo`` text."""
    facts: dict = {"vendor": "", "family": -1, "flags": frozenset()}
    for line in cpuinfo.splitlines():
        name, _, value = line.partition(":")
        name, value = name.strip(), value.strip()
        if name == "vendor_id" and not facts["vendor"]:
            facts["vendor"] = value
        elif name == "cpu family" and facts["family"] < 0 and value.isdigit():
            facts["family"] = int(value)
        elif name == "flags" and not facts["flags"]:
            facts["flags"] = frozenset(value.split())
        elif not line.strip() and facts["vendor"]:
            break  # the first processor's block is over
    return facts


def slow_avx512_sort(facts: dict) -> bool:
    """Zen 4: AMD, family 25 (0x19, Zen 3 and 4: only 4 has AVX-512), AVX-512 present."""
    return facts["vendor"] == "AuthenticAMD" and facts["family"] == 25 and "avx512f" in facts["flags"]


def feature_names(numpy_version: str) -> str:
    """The value of ``NPY_DISABLE_CPU_FEATURES`` that turns AVX-512 off for this numpy."""
    try:
        major, minor = (int(x) for x in numpy_version.split(".")[:2])
    except ValueError:
        return NAMES_2_4
    return NAMES_2_4 if (major, minor) >= (2, 4) else NAMES_2_0


def choose(environ, cpuinfo: str | None, numpy_version: str | None) -> tuple[str | None, str]:
    """``(value to set or None, why)`` for a process with this environment, CPU and numpy."""
    if VARIABLE in environ:
        return None, f"{VARIABLE} already set ({environ[VARIABLE]!r}): left as it is"
    if cpuinfo is None:
        return None, "no /proc/cpuinfo: numpy's own choice"
    if not slow_avx512_sort(cpu_facts(cpuinfo)):
        return None, "numpy's own choice (no CPU known to run its AVX-512 sort slowly)"
    if numpy_version is None:
        return None, "numpy not installed"
    return feature_names(numpy_version), "AMD Zen 4: numpy's AVX-512 sort is microcoded there, AVX2 kernels used"


def numpy_accepts(value: str) -> bool:
    """Whether numpy loads with ``NPY_DISABLE_CPU_FEATURES=value``: it refuses (an error at import, in every
    process) to turn off a feature built into its baseline, which a numpy compiled for the machine may hold.
    Asked of a child interpreter once per machine, numpy build and value; the verdict is kept in a file."""
    if not sys.executable:  # an embedded interpreter: no child to ask, numpy's own choice
        return False
    spec = importlib.util.find_spec("numpy")
    where = os.path.dirname(spec.origin) if spec and spec.origin else ""
    try:
        built = os.stat(os.path.join(where, "version.py")).st_mtime_ns
    except OSError:
        built = 0
    tag = hashlib.sha256(f"{sys.executable}|{where}|{built}|{value}".encode()).hexdigest()[:16]
    verdict = os.path.join(tempfile.gettempdir(), f"impressions-numpy-{tag}")
    try:
        with open(verdict) as f:
            if os.fstat(f.fileno()).st_uid == os.getuid():  # a verdict another user left is not taken
                return f.read() == "yes"
    except OSError:
        pass
    try:
        ok = subprocess.run([sys.executable, "-c", "import numpy"], env={**os.environ, VARIABLE: value},
                            capture_output=True, timeout=120, check=False).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False  # not known: numpy's own choice
    try:  # a file of its own made safely (never through a link someone left), then renamed: whole or absent
        fd, part = tempfile.mkstemp(prefix=os.path.basename(verdict) + ".", dir=os.path.dirname(verdict))
        with os.fdopen(fd, "w") as f:
            f.write("yes" if ok else "no")
        os.replace(part, verdict)
    except OSError:
        pass
    return ok


def fit_numpy() -> dict:
    """Decide once per process (see the module text); returns ``STATE``."""
    if STATE:
        return STATE
    try:
        with open("/proc/cpuinfo") as f:
            cpuinfo = f.read(1 << 16)  # the first processor's block is enough (the file is large on many cores)
    except OSError:
        cpuinfo = None
    try:
        version = metadata.version("numpy")
    except metadata.PackageNotFoundError:
        version = None
    value, why = choose(os.environ, cpuinfo, version)
    if value is not None and not numpy_accepts(value):
        value, why = None, (f"numpy does not load with {VARIABLE}={value!r} (AVX-512 in its baseline, or no "
                            "interpreter to ask): left as it is")
    late = "numpy" in sys.modules
    if value is not None:
        os.environ[VARIABLE] = value  # children inherit it, whatever this process could still do
        if late:
            why += "; numpy was loaded before this process could choose: its children only"
    # the value numpy of this process read: none if it loaded before this choice set one
    STATE.update(chosen=value, disabled=None if late and value is not None else os.environ.get(VARIABLE), why=why)
    return STATE


def stats() -> dict:
    """What this process's numpy runs with, for a copy's stats."""
    from numpy._core._multiarray_umath import __cpu_features__ as features  # numpy is loaded by now

    avx512 = features.get("X86_V4", features.get("AVX512_SKX", False))  # the dispatch level (2.4 / earlier names)
    return {"numpy_avx512": bool(avx512),
            "numpy_features_disabled": STATE.get("disabled"), "numpy_features_why": STATE.get("why")}



def node_env() -> str:
    """Shell lines for a node's start (``impressions node-env``): evaluated before ``ray start``, the node's
    raylet, and so every process Ray starts there (Serve replicas too, which load numpy before any code of
    ours), inherits this node's choice."""
    fit_numpy()
    return f"export {VARIABLE}='{os.environ[VARIABLE]}'" if VARIABLE in os.environ else ""
