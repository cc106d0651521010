"""The ``impressions`` command line."""

from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="impressions", description="Unique visitors in the last n units of time.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("demo", help="generate a sample stream, ingest it and print answers beside exact counts")
    d.add_argument("--events", type=int, default=2_000_000)
    d.add_argument("--ads", type=int, default=1000)
    d.add_argument("--days", type=float, default=3.0)
    a = ap.parse_args(argv)
    if a.cmd == "demo":
        from cluster.demo import run
        run(a.events, a.ads, a.days)
    return 0


if __name__ == "__main__":
    sys.exit(main())
