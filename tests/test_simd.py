"""numpy's vector kernels chosen for the CPU before numpy loads (``sketch.simd``): no Ray."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from importlib import metadata

import pytest

from impressions.sketch import simd

ZEN4 = """processor\t: 0
vendor_id\t: AuthenticAMD
cpu family\t: 25
model\t\t: 17
model name\t: AMD EPYC 9R14
flags\t\t: fpu vme de avx2 avx512f avx512dq avx512cd avx512bw avx512vl

processor\t: 1
vendor_id\t: AuthenticAMD
cpu family\t: 25
flags\t\t: fpu avx2 avx512f
"""
ZEN3 = ZEN4.replace(" avx512f avx512dq avx512cd avx512bw avx512vl", "").replace(" avx512f", "")
ZEN5 = ZEN4.replace("cpu family\t: 25", "cpu family\t: 26")
INTEL = ZEN4.replace("AuthenticAMD", "GenuineIntel").replace("cpu family\t: 25", "cpu family\t: 6")


def test_cpu_facts_read_the_first_processor():
    f = simd.cpu_facts(ZEN4)
    assert (f["vendor"], f["family"]) == ("AuthenticAMD", 25)
    assert "avx512f" in f["flags"] and "avx512bw" in f["flags"]
    assert simd.cpu_facts("")["family"] == -1


def test_avx512_turned_off_on_zen4_alone():
    assert simd.choose({}, ZEN4, "2.4.6") == (simd.NAMES_2_4, simd.choose({}, ZEN4, "2.4.6")[1])
    assert simd.choose({}, ZEN4, "2.2.6")[0] == simd.NAMES_2_0  # the names numpy before 2.4 reads
    for other in (ZEN3, ZEN5, INTEL, ""):
        assert simd.choose({}, other, "2.4.6")[0] is None, other
    assert simd.choose({}, None, "2.4.6")[0] is None  # no /proc/cpuinfo (not Linux)


def test_the_operators_setting_wins_even_empty():
    for value in ("", "AVX512_SKX"):
        got, why = simd.choose({simd.VARIABLE: value}, ZEN4, "2.4.6")
        assert got is None and "already set" in why


def _fresh(code: str, env: dict) -> dict:
    """Run ``code`` in a new interpreter (its last line prints JSON) and read what it printed."""
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60,
                         check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_a_fresh_process_runs_numpy_as_chosen_and_passes_it_on():
    with open("/proc/cpuinfo") as f:
        cpuinfo = f.read()
    env = {k: v for k, v in os.environ.items() if k != simd.VARIABLE}
    want, _ = simd.choose(env, cpuinfo, metadata.version("numpy"))
    ours_first = _fresh("import json, os, impressions.cluster, numpy; from impressions.sketch import simd; "
                        "print(json.dumps({**simd.stats(), 'env': os.environ.get(simd.VARIABLE)}))", env)
    assert ours_first["numpy_features_disabled"] == want and ours_first["env"] == want
    if want is not None:  # this machine is one where the AVX-512 kernels are turned off: numpy really ran without
        assert ours_first["numpy_avx512"] is False
        numpy_first = _fresh("import json, os, numpy, impressions.sketch; from impressions.sketch import simd; "
                             "print(json.dumps({**simd.stats(), 'env': os.environ.get(simd.VARIABLE)}))", env)
        # too late for this process (and it says so), but its children inherit the choice
        assert numpy_first["numpy_features_disabled"] is None and "children only" in numpy_first["numpy_features_why"]
        assert numpy_first["env"] == want
        kept = _fresh("import json, impressions.sketch, numpy; from impressions.sketch import simd; "
                      "print(json.dumps(simd.stats()))", {**env, simd.VARIABLE: ""})
        assert kept["numpy_avx512"] is True and kept["numpy_features_disabled"] == ""
    lines = subprocess.run([sys.executable, "-m", "impressions.cluster.cli", "node-env"], env=env,
                           capture_output=True, text=True, timeout=120, check=True).stdout.strip()
    assert lines == ("" if want is None else f"export {simd.VARIABLE}='{want}'")


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="x86 feature names")
def test_a_value_numpy_would_refuse_is_never_set(monkeypatch):
    # numpy refuses at import (in every process) to turn off a feature of its baseline: asked of a child first
    assert simd.numpy_accepts("X86_V2") is False  # the baseline of numpy's x86 wheels
    assert simd.numpy_accepts(simd.feature_names(metadata.version("numpy"))) is True
    assert simd.numpy_accepts("X86_V2") is False  # the verdict kept: the same answer
    saved = dict(simd.STATE)
    monkeypatch.delenv(simd.VARIABLE, raising=False)
    monkeypatch.setattr(simd, "choose", lambda *a: ("X86_V2", "a value numpy refuses"))
    try:
        simd.STATE.clear()
        st = simd.fit_numpy()
        assert st["chosen"] is None and "does not load" in st["why"] and simd.VARIABLE not in os.environ
    finally:
        simd.STATE.clear()
        simd.STATE.update(saved)
