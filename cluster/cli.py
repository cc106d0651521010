"""The ``impressions`` command line.

    impressions up                      # a local Ray (ray start --head), the actors, the REST app on :8000
    impressions status                  # shards, events, checkpoints, the REST app
    impressions ingest ./events/ s3://bucket/more/    # an ingest job; waits and prints its summary
    impressions query ad-1 ad-2 --last 15m            # a table; --json for the REST API's JSON
    impressions query --start 2026-11-29T00:00:00Z    # no key: site-wide
    impressions query ad-1 --rolling 24h --step 1h --last 7d   # trailing 24 h, every hour
    impressions query ad-1 --cumulative --step 1d --last 30d   # unique visitors since the start, daily
    impressions reach ad-1 ad-2 --prefix campaign-12/ --last 30d   # a set of keys' visitors, each once
    impressions overlap ad-1,ad-2 ad-3 --last 7d      # visitors of both sets (comma-separated keys)
    impressions checkpoint | rescale 4 | down | demo
    eval "$(impressions node-env)" && ray start ...    # a node's settings for every process Ray starts there

Every command but ``up`` and ``demo`` needs a running cluster (this
machine's, or ``--address``) and says so plainly when there is none.
Settings come from ``IMPRESSIONS_*`` variables (see the README).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time


def _connect(a, start_local: bool = False):
    from impressions.cluster.bootstrap import connect
    return connect(a.address, start_local=start_local)


def _auth_mode(starts_ray: bool) -> None:
    """Ray's token auth, settled before Ray is imported (it reads the mode then).

    For a command that may start Ray here (``up``, ``demo``): ``RAY_AUTH_MODE``
    if set, else ``token``, with a token made if none exists (Ray's GCS
    listens on every interface of the machine, so a cluster without one would
    run code for anyone who reaches it).  For the others: with the mode unset
    and a token on this machine, send it (a cluster `impressions up` started
    wants it; one without auth ignores it)."""
    path = os.environ.get("RAY_AUTH_TOKEN_PATH") or os.path.expanduser("~/.ray/auth_token")
    have = bool(os.environ.get("RAY_AUTH_TOKEN")) or os.path.exists(path)
    if "RAY_AUTH_MODE" in os.environ:
        mode = os.environ["RAY_AUTH_MODE"]
    elif starts_ray or have:
        mode = os.environ["RAY_AUTH_MODE"] = "token"
    else:
        return
    if starts_ray and mode == "token" and not have:
        r = _ray("get-auth-token", "--generate")
        if r.returncode:
            raise RuntimeError(f"could not make a Ray token: {r.stderr[-500:]}")


def _client(a):
    from impressions.cluster.client import Client
    _connect(a)
    return Client(start=False, namespace=a.namespace)


def _ray(*args: str) -> subprocess.CompletedProcess:
    ray_bin = os.path.join(os.path.dirname(sys.executable), "ray")
    return subprocess.run([ray_bin if os.path.exists(ray_bin) else "ray", *args], capture_output=True, text=True)


def cmd_up(a) -> int:
    import ray

    from impressions.api.auth import parse_api_keys
    from impressions.cluster.bootstrap import ClusterNotRunning, connect, ensure_actors
    from impressions.cluster.config import ClusterConfig, placeholder_secrets
    from impressions.cluster.serve import start as start_api
    # refused before anything starts: the example file's placeholders, or a public port without keys
    stale = placeholder_secrets()
    if stale:
        print(f"impressions: {' and '.join(stale)} still hold the example file's placeholders; set real secrets",
              file=sys.stderr)
        return 2
    env_cfg = ClusterConfig.from_env(namespace=a.namespace)
    parse_api_keys(env_cfg.api_keys)
    if a.host not in ("127.0.0.1", "localhost", "::1") and not env_cfg.api_keys:
        print(f"impressions: --host {a.host} would open the REST API beyond this machine without API keys; set "
              f"IMPRESSIONS_API_KEYS (key:read,key2:write) first", file=sys.stderr)
        return 2
    started = False
    try:
        how = connect(a.address, start_local=False)
    except (ClusterNotRunning, ConnectionError):
        if a.address:
            raise
        r = _ray("start", "--head", "--dashboard-host=127.0.0.1", "--disable-usage-stats",
                 f"--num-cpus={os.cpu_count()}")
        if r.returncode:
            print(f"impressions: `ray start --head` failed:\n{r.stderr[-2000:]}", file=sys.stderr)
            return 1
        started = True
        how = connect(None, start_local=False)
    coord = ensure_actors(env_cfg)
    cfg = ray.get(coord.cluster_config.remote())
    url = start_api(cfg.namespace, host=a.host, port=a.port, api_keys=env_cfg.api_keys)
    mode = os.environ.get("RAY_AUTH_MODE", "")
    print(f"Ray: {'started a local cluster' if started else how}" +
          (f" (token auth {'on' if mode == 'token' else 'off'}: RAY_AUTH_MODE={mode or 'unset'})" if started else ""))
    if started and mode == "token":
        print("  `ray job submit` and `ray status` from a shell need `export RAY_AUTH_MODE=token` there "
              "(the token is ~/.ray/auth_token)")
    print(f"{cfg.shards} shards in namespace {cfg.namespace!r}; storage {cfg.storage}")
    print(f"REST API: {url}  (OpenAPI: {url}/docs)")
    return 0


def cmd_down(a) -> int:
    from ray import serve

    from impressions.cluster.bootstrap import teardown
    from impressions.cluster.config import ClusterConfig
    try:
        _connect(a)
    except Exception:
        print("no Ray cluster is running here: nothing to stop")
        return 0
    try:
        serve.shutdown()
    except Exception:
        pass
    n = teardown(ClusterConfig.from_env(namespace=a.namespace).namespace)
    print(f"stopped the REST app and {n} actors (their data stays on the storage)")
    if not a.keep_ray and not a.address:
        import ray
        ray.shutdown()
        _ray("stop")
        print("stopped the local Ray")
    return 0


def _ago(t: float | None) -> str:
    return "-" if t is None else f"{time.time() - t:.0f} s ago"


def cmd_status(a) -> int:
    c = _client(a)
    st = c.stats()
    cfg = st["config"]
    try:
        from ray import serve
        apps = {name: str(app.status) for name, app in serve.status().applications.items()}
    except Exception:  # noqa: BLE001 - Serve not started on this cluster
        apps = {}
    if a.json:
        keep = ("shard", "available", "reason", "node", "host", "pid", "heap_bytes", "mapped_bytes", "events",
                "keys", "base_rows", "rollup_rows", "sealed_nodes", "sealed_bytes", "log_seq", "manifest",
                "checkpoint_age_s", "recovery", "uptime_s")
        out = {"epoch": st["epoch"], "queries": st["queries"],
               "config": json.loads(cfg.to_json()), "rest_apps": apps, "notes": st.get("events", []),
               "shards": [{"shard": i, "available": False, "reason": "did not answer in time"} if s is None else
                          {k: s.get(k) for k in keep} for i, s in enumerate(st["shards"])],
               "readers": [s and {k: s.get(k) for k in ("shard", "replica", "available", "reason", "node", "pid",
                                                        "heap_bytes", "mapped_bytes", "events", "log_seq", "manifest")}
                           for s in st.get("readers", [])]}
        print(json.dumps(out, default=str))
        return 0
    print(f"{len(st['shards'])} shards (layout epoch {st['epoch']}), namespace {cfg.namespace!r}, "
          f"storage {cfg.storage}; {st['queries']:,} queries answered by the coordinator")
    print(f"{'shard':>5} {'node':>12} {'events':>12} {'keys':>8} {'heap MB':>8} {'mapped MB':>9} {'log':>6} "
          f"{'checkpoint':>10} {'ckpt age s':>10}  last start")
    for i, s in enumerate(st["shards"]):
        if s is None:
            print(f"{i:>5} ? (not answering)")
            continue
        age = "-" if s.get("checkpoint_age_s") is None else f"{s['checkpoint_age_s']:.0f}"
        r = s.get("recovery") or {}
        how = (f"recovered {_ago(r.get('at'))} in {r.get('seconds', 0):.2f} s (checkpoint {r.get('manifest')}, "
               f"{r.get('replayed', 0)} log entries replayed)" if r.get("manifest") or r.get("replayed") else
               f"started {_ago(r.get('at'))}, nothing to recover")
        if not s["available"]:
            how = f"NOT SERVING: {s['reason']}"
        print(f"{s['shard']:>5} {str(s.get('node'))[-12:]:>12} {s['events']:>12,} {s['keys']:>8,} "
              f"{s.get('heap_bytes', 0) / 1e6:>8.1f} {s.get('mapped_bytes', 0) / 1e6:>9.1f} {s['log_seq']:>6} "
              f"{s['manifest']:>10} {age:>10}  {how}")
    readers = st.get("readers") or []
    if readers:
        print(f"{'reader':>8} {'node':>12} {'events':>12} {'heap MB':>8} {'mapped MB':>9} {'log':>6} {'checkpoint':>10}")
        for s in readers:
            if s is None:
                print(f"{'?':>8} (not answering)")
                continue
            state = "" if s["available"] else f"  NOT SERVING: {s['reason']}"
            print(f"{s['shard']:>5}.{s['replica']:<2} {str(s.get('node'))[-12:]:>12} {s['events']:>12,} "
                  f"{s.get('heap_bytes', 0) / 1e6:>8.1f} {s.get('mapped_bytes', 0) / 1e6:>9.1f} {s['log_seq']:>6} "
                  f"{s['manifest']:>10}{state}")
    for name, status in apps.items():
        print(f"REST app {name!r}: {status}")
    if not apps:
        print("REST app: not running")
    for e in st.get("events", []):
        print(f"  {e}")
    return 0


def cmd_ingest(a) -> int:
    from impressions.cluster.bootstrap import dashboard_url
    from impressions.cluster.demo import submit_ingest
    c = _client(a)  # connects; the cluster's actors must exist
    sources = [s if "://" in s else os.path.abspath(s) for s in a.sources]
    extra = []
    for flag, v in (("--ts-col", a.ts_col), ("--key-col", a.key_col), ("--visitor-col", a.visitor_col),
                    ("--ts-unit", a.ts_unit)):
        if v:
            extra += [flag, v]
    if a.force:
        extra.append("--force")
    if a.no_wait:
        from ray.job_submission import JobSubmissionClient
        job = JobSubmissionClient(dashboard_url()).submit_job(
            entrypoint=shlex.join([sys.executable, "-m", "impressions.cluster.ingest", *sources, *extra,
                                   "--no-progress"]),
            runtime_env={"env_vars": c.config.job_env()})
        print(f"submitted ingest job {job}; follow it with: ray job logs --follow {job}")
        return 0
    t = time.perf_counter()
    s = submit_ingest(dashboard_url(), shlex.join(sources + extra), c.config)
    print(f"ingest job {s['job']}: {s['files']} files, {s['rows_read']:,} rows read, {s['accepted']:,} accepted, "
          f"{s['rejected']:,} rejected, {s['events_per_second']:,} events/s ({time.perf_counter() - t:.1f} s in all)")
    for reason, n in sorted(s["rejected_by_reason"].items(), key=lambda kv: -kv[1]):
        print(f"  rejected {n:,}: {reason}")
    for e in s["samples"][:5]:
        print(f"  e.g. {e.get('file', '')} row {e['row']}: {e['reason']}")
    for f in s["failed_files"]:
        print(f"  failed: {f}")
    if s.get("skipped_files"):
        n = len(s['skipped_files'])
        print(f"  skipped {n} file{'s' * (n != 1)} ingested before (--force counts them again)")
    return 0 if not s["failed_files"] else 1


def _range(a, default: str = "15m") -> dict:
    return {"last": a.last if a.last is not None or a.start is not None else default, "start": a.start, "end": a.end}


def _interval(r: dict) -> str:
    lo, hi = r["interval"]
    return f"[{lo:,}, {hi:,}]" if hi is not None else f"[{lo:,}, ...]"


def _flag(r: dict) -> str:
    return " exact" if r["exact"] else " partial" if r["partial"] else ""


def cmd_query(a) -> int:
    c = _client(a)
    keys = [None if k in ("*", "site-wide") else k for k in (a.keys or [None])]
    if a.rolling or a.cumulative:
        return _rolling(a, c, keys)
    if a.step:
        raise ValueError("--step goes with --rolling or --cumulative")
    out = c.query(keys, **_range(a))
    if a.json:
        print(json.dumps(out[0] if len(out) == 1 else out))
        return 0
    print(f"{'key':>16} {'start (UTC)':>20} {'end (UTC)':>20} {'unique visitors':>16} {'95% interval':>24} "
          f"{'impressions':>12}")
    for r in out:
        print(f"{r['key'] or 'site-wide':>16} {_utc(r['start']):>20} {_utc(r['end']):>20} {r['unique_visitors']:>16,} "
              f"{_interval(r):>24} {r['impressions']:>12,}{_flag(r)}")
    return 0


def _rolling(a, c, keys: list) -> int:
    if a.rolling and a.cumulative:
        raise ValueError("--rolling WINDOW or --cumulative, not both")
    if not a.step:
        raise ValueError("--step is needed with --rolling or --cumulative (e.g. --step 1h)")
    if None in keys and len(keys) > 1:
        raise ValueError("a series is of one key, a set of keys, or site-wide: not site-wide and keys together")
    out = c.rolling(None if keys == [None] else keys, step=a.step, window=a.rolling, cumulative=a.cumulative,
                    **_range(a, "24h" if a.cumulative else "7d"))
    if a.json:
        print(json.dumps(out))
        return 0
    what = "site-wide" if keys == [None] else " | ".join(keys)
    how = "cumulative since the start" if out["cumulative"] else f"trailing {out['window']}s"
    print(f"{what}: {how}, every {out['step']}s")
    print(f"{'window start (UTC)':>20} {'end (UTC)':>20} {'unique visitors':>16} {'95% interval':>24} "
          f"{'impressions':>12}")
    for r in out["points"]:
        print(f"{_utc(r['start']):>20} {_utc(r['end']):>20} {r['unique_visitors']:>16,} {_interval(r):>24} "
              f"{r['impressions']:>12,}{_flag(r)}{'' if r['complete'] else ' (in progress)'}")
    return 0


def cmd_reach(a) -> int:
    r = _client(a).reach(a.keys, prefix=a.prefix, **_range(a, "1d"))
    if a.json:
        print(json.dumps(r))
        return 0
    what = ", ".join(a.keys) + (f" and {a.prefix}*" if a.prefix else "") if a.keys else f"{a.prefix}*"
    print(f"reach of {what} ({r['keys']} keys with data), {_utc(r['start'])} to {_utc(r['end'])} UTC")
    print(f"  unique visitors {r['unique_visitors']:,} {_interval(r)}{_flag(r)}")
    print(f"  impressions     {r['impressions']:,}" + (f" (frequency {r['frequency']:.2f} a visitor)"
                                                       if r["frequency"] is not None else ""))
    return 0


def cmd_overlap(a) -> int:
    sets = []
    for keys, prefix in ((a.a, a.a_prefix), (a.b, a.b_prefix)):
        sets.append(([k for k in (keys or "").split(",") if k], prefix))
    r = _client(a).overlap(sets[0][0], sets[1][0], a_prefix=sets[0][1], b_prefix=sets[1][1], **_range(a, "1d"))
    if a.json:
        print(json.dumps(r))
        return 0
    both = r["both"]
    print(f"{_utc(r['start'])} to {_utc(r['end'])} UTC")
    for name in ("a", "b", "union"):
        print(f"  {name:>6} {r[name]['unique_visitors']:>14,} {_interval(r[name]):>26}")
    print(f"  {'both':>6} {both['unique_visitors']:>14,} {_interval(both):>26}  ({both['method']}; "
          f"inclusion-exclusion {both['inclusion_exclusion']:,})")
    print(f"  jaccard {r['jaccard']:.4f} [{r['jaccard_interval'][0]:.4f}, {r['jaccard_interval'][1]:.4f}]"
          + (f", share of a {r['share_of_a']:.2%}" if r["share_of_a"] is not None else "")
          + (f", share of b {r['share_of_b']:.2%}" if r["share_of_b"] is not None else ""))
    if r["note"]:
        print(f"  note: {r['note']}")
    return 0


def _utc(t: int) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(t))


def cmd_checkpoint(a) -> int:
    out = _client(a).checkpoint()
    for r in out:
        print(f"shard {r['shard']}: checkpoint {r['manifest']}, {r['nodes_written']} of {r['nodes']} objects written "
              f"({r['bytes_written']:,} bytes; {r['bytes_total']:,} in all), {r['seconds']:.2f} s")
    return 0


def cmd_rescale(a) -> int:
    r = _client(a).rescale(a.shards)
    print(f"now {r['shards']} shards" + (f" (from {r['from']}, {r['seconds']:.1f} s)" if r.get("changed") else
                                         " (unchanged)"))
    return 0


def cmd_demo(a) -> int:
    from impressions.cluster.demo import run
    run(a.events, a.ads, a.days)
    return 0


def _range_args(p, default: str) -> None:
    """The range and output options of a question command."""
    p.add_argument("--last", help=f"15m, 24h, 30d, or a number of buckets (default {default})")
    p.add_argument("--start", help="epoch seconds or ISO-8601")
    p.add_argument("--end", help="epoch seconds or ISO-8601 (default: now)")
    p.add_argument("--json", action="store_true", help="the REST API's JSON")


def cmd_node_env(a) -> int:
    from impressions.sketch import simd
    lines = simd.node_env()
    if lines:
        print(lines)
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="impressions", description="Unique visitors in the last n units of time.",
                                 epilog=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # --address and --namespace are taken before or after the command (`impressions status --address X`)
    common = argparse.ArgumentParser(add_help=False)
    for parser, default in ((ap, None), (common, argparse.SUPPRESS)):
        parser.add_argument("--address", default=default,
                            help="Ray address (default: RAY_ADDRESS, or this machine's cluster)")
        parser.add_argument("--namespace", default=default,
                            help="Ray namespace of the actors (default: IMPRESSIONS_NAMESPACE)")
    sub = ap.add_subparsers(dest="cmd", required=True)
    _add_parser = sub.add_parser
    sub.add_parser = lambda name, **kw: _add_parser(name, parents=[common], **kw)  # every command takes both
    p = sub.add_parser("up", help="start the local default (Ray, the actors, the REST app), or join --address")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p = sub.add_parser("down", help="stop the REST app and the actors (data stays), and the local Ray")
    p.add_argument("--keep-ray", action="store_true", help="leave Ray itself running")
    p = sub.add_parser("status", help="shards (node, memory, events, checkpoint, last start), the REST app")
    p.add_argument("--json", action="store_true", help="for scripts")
    p = sub.add_parser("ingest", help="ingest files or folders (Parquet, CSV, JSON lines) as a Ray job")
    p.add_argument("sources", nargs="+")
    p.add_argument("--ts-col")
    p.add_argument("--key-col")
    p.add_argument("--visitor-col")
    p.add_argument("--ts-unit", choices=["auto", "s", "ms", "us", "ns"])
    p.add_argument("--no-wait", action="store_true", help="print the job id and return")
    p.add_argument("--force", action="store_true", help="count files ingested before again")
    p = sub.add_parser("query", help="unique visitors and impressions of keys (none: site-wide)")
    p.add_argument("keys", nargs="*")
    _range_args(p, "15m")
    p.add_argument("--rolling", metavar="WINDOW", help="a trailing window (e.g. 24h) at every --step over the range")
    p.add_argument("--cumulative", action="store_true", help="unique visitors since the range's start at every --step")
    p.add_argument("--step", help="between points of a --rolling or --cumulative series (e.g. 1h)")
    p = sub.add_parser("reach", help="unique visitors of a set of keys together (each visitor once)")
    p.add_argument("keys", nargs="*")
    p.add_argument("--prefix", help="and every key whose name starts with this")
    _range_args(p, "1d")
    p = sub.add_parser("overlap", help="visitors of both of two key sets, Jaccard and shares")
    p.add_argument("a", nargs="?", help="keys of A, comma-separated")
    p.add_argument("b", nargs="?", help="keys of B, comma-separated")
    p.add_argument("--a-prefix", help="and every key starting with this, in A")
    p.add_argument("--b-prefix", help="and every key starting with this, in B")
    _range_args(p, "1d")
    sub.add_parser("checkpoint", help="checkpoint every shard now")
    p = sub.add_parser("rescale", help="change the number of shards of the live cluster")
    p.add_argument("shards", type=int)
    p = sub.add_parser("demo", help="a sample stream through a real ingest job, answers beside exact counts")
    p.add_argument("--events", type=int, default=2_000_000)
    p.add_argument("--ads", type=int, default=1000)
    p.add_argument("--days", type=float, default=3.0)
    sub.add_parser("node-env", help="shell lines to evaluate before `ray start` on a node (numpy's kernels for "
                   "this CPU, impressions.sketch.simd)")
    a = ap.parse_args(argv)
    _auth_mode(starts_ray=a.cmd in ("up", "demo"))
    from impressions.cluster.bootstrap import ClusterNotRunning
    from impressions.sketch.timeindex import RangeError
    try:
        return {"up": cmd_up, "down": cmd_down, "status": cmd_status, "ingest": cmd_ingest, "query": cmd_query,
                "reach": cmd_reach, "overlap": cmd_overlap, "checkpoint": cmd_checkpoint, "rescale": cmd_rescale,
                "demo": cmd_demo, "node-env": cmd_node_env}[a.cmd](a)
    except ClusterNotRunning as e:
        print(f"impressions: {e}", file=sys.stderr)
        return 2
    except (RangeError, ValueError, FileNotFoundError) as e:
        print(f"impressions: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
