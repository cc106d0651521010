"""Printing benchmark tables and writing them into ``docs/benchmarks.md``.

Each benchmark owns one section of the document, between
``<!-- bench:NAME -->`` and ``<!-- /bench:NAME -->``; rerunning a benchmark
replaces its section and leaves the others alone.
"""

from __future__ import annotations

import os
import platform
import re
import socket
import sys
from importlib import metadata

DOC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "benchmarks.md")
HEADER = """# Benchmarks

Every table below is written by the script named in its section, on the
machine it names, in one run; rerun the command to refresh it.  Latencies
are medians (p50) and 99th percentiles (p99) over the stated number of
queries; ratios compare figures measured side by side in the same run.
"""


def table(headers: list[str], rows: list[list]) -> str:
    def fmt(v):
        if isinstance(v, float):
            if v == 0:
                return "0"
            if abs(v) >= 100:
                return f"{v:,.0f}"
            if abs(v) >= 1:
                return f"{v:.2f}"
            return f"{v:.3g}"
        if isinstance(v, int):
            return f"{v:,}"
        return str(v)
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(fmt(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        if names:
            cpu = f"{names[0]} x {len(names)}"
    except OSError:
        pass
    try:
        with open("/proc/meminfo") as f:
            mem = int(f.readline().split()[1]) / 1024 / 1024
        mem_s = f", {mem:.0f} GiB RAM"
    except (OSError, ValueError, IndexError):
        mem_s = ""
    vers = []
    for pkg in ("numpy", "pyarrow", "mmh3", "ray", "datasketches", "duckdb", "redis"):
        try:
            vers.append(f"{pkg} {metadata.version(pkg)}")
        except metadata.PackageNotFoundError:
            pass
    return f"{cpu}{mem_s}; Python {sys.version.split()[0]}; " + ", ".join(vers)


def write_section(name: str, body: str, doc: str = DOC) -> None:
    os.makedirs(os.path.dirname(doc), exist_ok=True)
    text = open(doc).read() if os.path.exists(doc) else HEADER
    start, end = f"<!-- bench:{name} -->", f"<!-- /bench:{name} -->"
    block = f"{start}\n{body.rstrip()}\n{end}"
    if start in text and end in text:
        text = re.sub(re.escape(start) + r".*?" + re.escape(end), lambda _: block, text, flags=re.S)
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    with open(doc, "w") as f:
        f.write(text)


def free_port() -> int:
    """A free TCP port on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
