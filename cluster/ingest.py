"""The ingest job: files (or Arrow tables) -> validated, hashed, per-shard
batches -> the shard actors.

    python -m impressions.cluster.ingest SOURCE... [--ts-col ts --key-col key --visitor-col visitor]
    ray job submit --address http://HEAD:8265 --working-dir . -- python -m impressions.cluster.ingest s3://bucket/events/

SOURCE is a file or folder, local or any ``pyarrow.fs`` URI (``s3://``,
``gs://``, ``file://``), holding Parquet, CSV or JSON-lines files.

Work is cut into fragments (a Parquet row group, or a CSV/JSON file) and run
as parallel Ray tasks.  Each task reads its fragment ``batch_rows`` rows at a
time, parses timestamps, validates, hashes the visitor ids and hands the
batch to an ``actors.sender.Sender``, which cuts it by shard and sends each
part straight to its shard actor, never keeping more than ``max_inflight``
calls in flight: memory stays bounded whatever the input size, and the
events never pass through the driver.  Bad rows are
counted per reason with a few samples (file and row); every good row is
applied.  The driver shows progress and prints a summary at the end.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import uuid
from dataclasses import dataclass, field

import pyarrow as pa
import ray

from impressions.actors.sender import JOB_DEADLINE_S, Sender
from impressions.actors.shard import CALL_KEEP_S
from impressions.cluster.bootstrap import RayRuntime, coordinator_route
from impressions.cluster.config import ClusterConfig
from impressions.cluster.metrics import RayTelemetry
from impressions.cluster.priority import BULK_ENV, give_way_for_good
from impressions.cluster.readers import Fragment, MissingColumn, fragments, parse_ts, read_fragment
from impressions.cluster.sources import list_sources
from impressions.durable.ledger import SourceLedger, digest
from impressions.durable.objects import ObjectStore
from impressions.sketch.events import REASONS, IngestReport, prepare


@dataclass
class IngestSummary:
    files: int = 0
    report: IngestReport = field(default_factory=IngestReport)
    seconds: float = 0.0
    peak_inflight: int = 0
    batches: int = 0
    failed_files: list = field(default_factory=list)
    skipped_files: list = field(default_factory=list)  # ingested whole before: not counted again
    positions: dict = field(default_factory=dict)  # epoch -> {range: highest log position acknowledged}

    def wrote(self, epoch: int, positions: dict) -> None:
        seen = self.positions.setdefault(int(epoch), {})
        for i, seq in positions.items():
            seen[int(i)] = max(int(seq), seen.get(int(i), 0))

    @property
    def events_per_second(self) -> float:
        return self.report.accepted / self.seconds if self.seconds else 0.0

    def to_dict(self) -> dict:
        return {"files": self.files, "rows_read": self.report.received, "accepted": self.report.accepted,
                "rejected": self.report.rejected_total, "rejected_by_reason": dict(self.report.rejected),
                "samples": self.report.samples, "seconds": round(self.seconds, 3),
                "events_per_second": round(self.events_per_second), "batches": self.batches,
                "peak_inflight": self.peak_inflight, "failed_files": self.failed_files,
                "skipped_files": self.skipped_files}

    def text(self) -> str:
        r = self.report
        lines = [f"files: {self.files}   rows read: {r.received:,}   accepted: {r.accepted:,}   "
                 f"rejected: {r.rejected_total:,}   {self.seconds:.1f} s   {self.events_per_second:,.0f} events/s"]
        for reason, n in sorted(r.rejected.items(), key=lambda kv: -kv[1]):
            lines.append(f"  rejected {n:,}: {REASONS.get(reason, reason)} ({reason})")
        for s in r.samples[:5]:
            lines.append(f"  e.g. {s.get('file', '')} row {s['row']}: {s['reason']}"
                         + (f" ({s['value']!r})" if "value" in s else ""))
        for f in self.failed_files:
            lines.append(f"  failed: {f}")
        if self.skipped_files:
            n = len(self.skipped_files)
            lines.append(f"  skipped {n} file{'s' * (n != 1)} ingested before (--force counts them again)")
        return "\n".join(lines)


def _prepare(table: pa.Table, cfg: ClusterConfig, now: float, row: int, ts_unit: str, malformed=()):
    ts, bad = parse_ts(table.column("ts"), ts_unit)
    sk = cfg.sketch
    batch, rep = prepare(ts, table.column("key"), visitors=table.column("visitor"), now=now,
                         bucket_seconds=sk.bucket_seconds, retention_buckets=sk.retention_buckets,
                         future_seconds=sk.future_seconds, row_offset=row, ts_bad=bad, ts_raw=table.column("ts"),
                         malformed=malformed)
    telemetry = _telemetry(cfg.namespace)
    for reason, n in rep.rejected.items():
        telemetry.rejected(reason, n)
    return batch, rep


_TELEMETRY: dict[str, RayTelemetry] = {}  # one a process: its metrics are made once


def _telemetry(namespace: str) -> RayTelemetry:
    # a plain dict, not functools.cache: run as a job this module is __main__, and Ray pickles its functions
    # by value with their globals, which a cache wrapper does not survive
    if namespace not in _TELEMETRY:
        _TELEMETRY[namespace] = RayTelemetry(namespace)
    return _TELEMETRY[namespace]


def _sender(coordinator, cfg: ClusterConfig, deadline_s: float = JOB_DEADLINE_S) -> Sender:
    return Sender(RayRuntime(), coordinator_route(coordinator), cfg.sketch.p, cfg.max_inflight, deadline_s)


def fragment_id(frag: Fragment, force: str = "") -> str:
    """A fragment's part of every batch id: the source's identity (same bytes,
    same name), the row group, and the ``--force`` nonce that makes a
    deliberate re-ingest count again."""
    return digest(f"{frag.source.identity}|{frag.row_group}|{force}")[:20]


@ray.remote
def ingest_fragment(frag: Fragment, cols: dict, cfg: ClusterConfig, coordinator, now: float, ts_unit: str,
                    force: str = "") -> dict:
    """One task: read, validate, hash and send one fragment.  Its batch ids
    follow from the source (``fragment_id`` and each batch's first row), so
    Ray's retry of this task, or a rerun of the job, counts nothing twice."""
    if cfg.questions_first:
        give_way_for_good()  # a process of bulk work only: questions take the core from it (``cluster.priority``)
    sender = _sender(coordinator, cfg)
    report = IngestReport()
    base = fragment_id(frag, force)
    try:
        for table, row, malformed in read_fragment(frag, cols, cfg.batch_rows, cfg.s3_endpoint):
            batch, rep = _prepare(table, cfg, now, row, ts_unit, malformed)
            for s in rep.samples:
                s["file"] = frag.source.uri
            report.add(rep)
            if len(batch):
                sender.send(batch, f"{base}:{row}", cfg.dedup_window_s)
        sender.drain()
    except MissingColumn as e:
        sender.drain()
        return {"report": report.to_dict(), "error": str(e), "peak": sender.peak, "batches": sender.batches,
                "positions": (sender.epoch, sender.positions)}
    return {"report": report.to_dict(), "error": None, "peak": sender.peak, "batches": sender.batches,
            "positions": (sender.epoch, sender.positions)}


def _free_cpus(wait_s: float = 10.0) -> float:
    """CPUs free for ingest tasks (each takes one).  Rather than queue tasks
    that could never be scheduled (actors holding every CPU), say so."""
    deadline = time.time() + wait_s
    while True:
        free = ray.available_resources().get("CPU", 0.0)
        if free >= 1:
            return free
        if time.time() > deadline:
            total = ray.cluster_resources().get("CPU", 0.0)
            raise RuntimeError(f"no CPU of the cluster's {total:g} has been free for {wait_s:g} s, so ingest "
                               f"tasks cannot run: actors reserve them all (add a node, lower "
                               f"IMPRESSIONS_SHARD_CPUS, or stop other work)")
        time.sleep(0.2)


def _report_from(d: dict) -> IngestReport:
    return IngestReport(d["received"], d["accepted"], dict(d["rejected_by_reason"]), list(d["errors"]))


def run_ingest(sources: list[str], *, coordinator=None, config: ClusterConfig | None = None,
               ts_col: str = "ts", key_col: str = "key", visitor_col: str = "visitor", ts_unit: str = "auto",
               now: float | None = None, progress: bool = True, max_tasks: int | None = None,
               force: bool = False) -> IngestSummary:
    """Ingest files into the running cluster (the coordinator names the shards).

    A file already ingested whole (same name, size and modification time, in
    the ledger on the store) is skipped unless ``force``.  A fragment that
    fails (an unreadable file, a task that died for good) is reported in
    ``failed_files``; the others go on, and its file is left out of the
    ledger, so running the job again completes it without counting twice."""
    from impressions.cluster.bootstrap import ensure_actors

    coord = coordinator or ensure_actors(config)
    cfg = ray.get(coord.cluster_config.remote())
    t0 = time.perf_counter()
    files = list_sources(sources, cfg.s3_endpoint)
    ledger = SourceLedger(ObjectStore(cfg.storage, cfg.s3_endpoint)) if cfg.storage else None
    summary = IngestSummary(files=len(files))
    if ledger is not None and not force:
        done = [f for f in files if ledger.done(f.identity) is not None]
        summary.skipped_files = [f.uri for f in done]
        files = [f for f in files if f not in done]
    nonce = uuid.uuid4().hex if force else ""
    frags = fragments(files, cfg.s3_endpoint, failed=summary.failed_files)
    cols = {"ts": ts_col, "key": key_col, "visitor": visitor_col}
    now = time.time() if now is None else now
    total_rows = sum(f.rows for f in frags if f.rows is not None)
    total_bytes = sum(f.source.size for f in frags if f.rows is None)
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=total_rows or None, unit=" rows", unit_scale=True, desc="ingest", file=sys.stderr,
                   dynamic_ncols=True) if (total_rows or not total_bytes) else \
            tqdm(total=len(frags), unit=" files", desc="ingest", file=sys.stderr)
    left = {f.uri: 0 for f in files}  # fragments still to finish, per file
    for f in frags:
        left[f.source.uri] += 1
    failed: set[str] = {f.uri for f in files if left[f.uri] == 0 and f.format == "parquet"}
    free = _free_cpus() if frags else 0
    max_tasks = max_tasks or max(2, 2 * int(free))
    pending, queue = {}, list(frags)
    # with ``questions_first`` a task's thread gives way for good, so its workers are a pool of their own (a runtime
    # environment of their own): no other task of the job lands on a process whose thread gave way
    task = ingest_fragment.options(runtime_env={"env_vars": BULK_ENV}) if cfg.questions_first else ingest_fragment
    while queue or pending:
        while queue and len(pending) < max_tasks:
            f = queue.pop(0)
            pending[task.remote(f, cols, cfg, coord, now, ts_unit, nonce)] = f
        ready, _ = ray.wait(list(pending), num_returns=1)
        frag = pending.pop(ready[0])
        try:
            out = ray.get(ready[0])
        except Exception as e:  # noqa: BLE001 - one fragment's failure never stops the others
            out = {"report": IngestReport().to_dict(), "peak": 0, "batches": 0,
                   "error": f"{frag.source.uri}{'' if frag.row_group is None else f' row group {frag.row_group}'}: "
                            f"{type(e).__name__}: {str(e)[:300]}"}
        summary.report.add(_report_from(out["report"]))
        summary.peak_inflight = max(summary.peak_inflight, out["peak"])
        summary.batches += out["batches"]
        if out.get("positions"):
            summary.wrote(*out["positions"])
        left[frag.source.uri] -= 1
        if out["error"]:
            summary.failed_files.append(out["error"])
            failed.add(frag.source.uri)
        elif left[frag.source.uri] == 0 and frag.source.uri not in failed and ledger is not None:
            ledger.record(frag.source.identity, {"uri": frag.source.uri, "size": frag.source.size})
        if bar is not None:
            bar.update(frag.rows if (total_rows and frag.rows is not None) else (0 if total_rows else 1))
    if bar is not None:
        bar.close()
    summary.seconds = time.perf_counter() - t0
    return summary


def ingest_table(table: pa.Table, coordinator, *, ts: str = "ts", key: str = "key", visitor: str = "visitor",
                 now: float | None = None, ts_unit: str = "auto", malformed=(), batch_id: str | None = None,
                 keep_s: float | None = None, deadline_s: float = JOB_DEADLINE_S, wrote=None) -> IngestReport:
    """Ingest an in-memory Arrow table from this driver (the Python client's
    and the REST app's path).

    The whole table is validated before anything is sent, so a table is
    refused whole or sent whole; a row with a bad value is rejected alone.
    ``batch_id`` names the table (the REST ``Idempotency-Key``): sending the
    same table again under the same id counts nothing twice.  Without one the
    table gets a random id, remembered only long enough to absorb the
    runtime's own retries.  ``wrote(epoch, positions)`` is told the log
    positions the shards acknowledged (``Questions.wrote``: read your writes)."""
    cfg = ray.get(coordinator.cluster_config.remote())
    now = time.time() if now is None else now
    missing = [c for c in (ts, key, visitor) if c not in table.schema.names]
    if missing:
        raise ValueError(f"table has no {', '.join(repr(c) for c in missing)} column "
                         f"(its columns: {', '.join(table.schema.names)})")
    t = pa.table({"ts": table.column(ts), "key": table.column(key), "visitor": table.column(visitor)})
    report = IngestReport()
    prepared = []
    for start in range(0, max(t.num_rows, 1), cfg.batch_rows):
        part = t.slice(start, cfg.batch_rows)
        if not part.num_rows:
            break
        bad = [r - start for r in malformed if start <= r < start + part.num_rows]
        batch, rep = _prepare(part, cfg, now, start, ts_unit, bad)
        report.add(rep)
        prepared.append((start, batch))
    if batch_id is None:
        batch_id, keep_s = f"call-{uuid.uuid4().hex}", CALL_KEEP_S
    sender = _sender(coordinator, cfg, deadline_s)
    for start, batch in prepared:
        if len(batch):
            sender.send(batch, f"{batch_id}:{start}", cfg.dedup_window_s if keep_s is None else keep_s)
    sender.drain()
    if wrote is not None:
        wrote(sender.epoch, sender.positions)
    return report


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m impressions.cluster.ingest", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("sources", nargs="+", help="files or folders (local paths or pyarrow.fs URIs)")
    ap.add_argument("--ts-col", default="ts")
    ap.add_argument("--key-col", default="key")
    ap.add_argument("--visitor-col", default="visitor")
    ap.add_argument("--ts-unit", default="auto", choices=["auto", "s", "ms", "us", "ns"],
                    help="unit of numeric timestamps (auto: told apart by magnitude)")
    ap.add_argument("--address", default=None, help="Ray address (default: RAY_ADDRESS, or the local cluster)")
    ap.add_argument("--json", action="store_true", help="print the summary as JSON")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--force", action="store_true", help="count files ingested before again")
    a = ap.parse_args(argv)
    from impressions.cluster.bootstrap import connect
    connect(a.address, start_local=False)
    try:
        summary = run_ingest(a.sources, ts_col=a.ts_col, key_col=a.key_col, visitor_col=a.visitor_col,
                             ts_unit=a.ts_unit, progress=not a.no_progress, force=a.force)
    except (FileNotFoundError, ValueError, RuntimeError) as e:
        print(f"ingest: {e}", file=sys.stderr)
        return 2
    print(json.dumps(summary.to_dict()) if a.json else summary.text())
    return 0 if not summary.failed_files else 1


if __name__ == "__main__":
    sys.exit(main())
