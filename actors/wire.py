"""Questions over a socket of the copy's own: one round trip, not a Ray call.

A question to a copy of a register range through Ray costs about 0.6 ms on
this machine before the copy does any work (two in parallel, one to each
range, 0.9 ms): the caller's ``.remote()`` alone is 0.2 ms of Python, then
the call's trip through Ray's core worker on both sides.  Where the copy's
own work is 0.1-0.6 ms, that is most of an answer.  A reader therefore also
answers on a TCP port of its own (``QuestionPort``), and an asker with the
shard map reaches it there (``WireClient``): a round trip costs about 0.06 ms.

* **What travels.** A question is the same ``(method, log position, args)``
  as ``ShardBase.ask`` takes, as JSON (never pickle: a question comes from the
  network, and a pickle runs code when it is read); a question whose
  arguments are not plain JSON values (arrays) goes through Ray instead.  The
  answer is what ``ShardBase.ask_packed`` answers (the asker trusts the copy
  the coordinator's shard map named, as it trusts Ray's own pickles), or the
  copy's exception (``Behind``, ``ShardUnavailable``, a bad argument).
* **Who may ask.** Each port has a token of its own, drawn at random when the
  copy starts; a question without it is not read (the connection is closed).
  The token goes to the coordinator only by a call of its own
  (``question_address``), never in ``health`` or ``stats``, which the REST API
  shows, and from the coordinator only in ``read_route``, to askers that
  reach Ray anyway (the REST replicas, the Python client).
* **Where.** A copy listens on its node's address, for askers on other nodes,
  and on 127.0.0.1, for askers on its own node, which use it.
* **Failure.** A copy that is gone or restarting refuses the connection or
  closes it: the asker's call fails at once with ``ShardUnavailable`` and it
  moves on to the next copy of the range (``actors.questions``), as it does
  for a Ray call.  A restarted copy listens on a new port with a new token;
  the coordinator publishes them at its next look at the readers.
* **Bounds.** A port serves at most ``MAX_CONNECTIONS`` connections at once
  (a thread each; each runs one question at a time, as a Ray reading thread
  does), drops one that shows no token within ``FIRST_S`` of opening and one
  idle for ``IDLE_S``, reads the token before the question (a stranger's
  bytes are never buffered or parsed); a question is at most
  ``MAX_QUESTION`` bytes.

Nothing here holds a lock while it waits on the network: the asker's side is
one thread per process that reads answers and completes futures; the
caller waits on those futures with its own deadline.
"""

from __future__ import annotations

import concurrent.futures as cf
import hashlib
import hmac
import json
import logging
import pickle
import secrets
import selectors
import socket
import struct
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from .runtime import ShardUnavailable

log = logging.getLogger("impressions.wire")

HEADER = struct.Struct(">I")
TOKEN_LEN = 32  # hex characters
MAX_QUESTION = 8 << 20
MAX_ANSWER = 1 << 31
MAX_CONNECTIONS = 64
IDLE_S = 300.0  # a port closes a connection idle this long
FIRST_S = 5.0  # ...and one that has not sent a question with the token this long after it opened
POOL_IDLE_S = 60.0  # an asker drops a connection idle this long (well before the port would)
CONNECT_S = 1.0
STUCK_S = 600.0  # an asker gives up on a call not answered in this long (its caller gave up long before)
OK, FAILED = 0, 1


@dataclass(frozen=True)
class Address:
    """Where a copy answers: ``host:port`` for askers on other nodes, ``127.0.0.1:loopback`` for askers on
    its own node; ``token`` is the port's secret; ``ident`` names the port without giving its token away."""

    host: str | None
    port: int
    loopback: int
    token: str

    @property
    def ident(self) -> str:
        return ident_of(self.token)

    def route(self, node_ip: str | None) -> tuple[str, int]:
        """The endpoint an asker on node ``node_ip`` uses."""
        if self.loopback and (self.host is None or node_ip is None or node_ip == self.host):
            return "127.0.0.1", self.loopback
        return self.host, self.port


def ident_of(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()[:12]


def _plain(x):
    """JSON's ``default``: numpy scalars as Python numbers; anything else is not sent over the wire."""
    item = getattr(x, "item", None)
    if item is not None and getattr(x, "shape", None) == ():
        return item()
    raise TypeError(f"{type(x).__name__} does not go over the wire")


def encode_question(method: str, after: int, args: tuple) -> bytes | None:
    """The question as JSON, or None when its arguments are not plain values (it then goes through Ray)."""
    try:
        return json.dumps([method, int(after), list(args)], default=_plain, separators=(",", ":")).encode()
    except (TypeError, ValueError):
        return None


def frame(token: str, body: bytes) -> bytes:
    return HEADER.pack(TOKEN_LEN + len(body)) + token.encode() + body


def _exception_bytes(e: BaseException) -> bytes:
    try:
        return pickle.dumps(e, protocol=pickle.HIGHEST_PROTOCOL)
    except Exception:  # noqa: BLE001 - an exception that does not pickle is sent as its text
        return pickle.dumps(RuntimeError(f"{type(e).__name__}: {e}"), protocol=pickle.HIGHEST_PROTOCOL)


def _recv_exact(conn: socket.socket, n: int) -> bytes | None:
    """``n`` bytes, or None when the peer closed the connection first."""
    parts, got = [], 0
    while got < n:
        b = conn.recv(min(n - got, 1 << 20))
        if not b:
            return None
        parts.append(b)
        got += len(b)
    return b"".join(parts)


class QuestionPort:
    """A copy's questions on TCP: ``answer(method, after, args)`` returns the answer's bytes (or raises), run on
    the connection's own thread.  Listens on each of ``hosts`` (port 0: the system picks)."""

    def __init__(self, answer: Callable[[str, int, list], bytes], hosts: list[str], name: str = "questions"):
        self.answer, self.name = answer, name
        self.token = secrets.token_hex(TOKEN_LEN // 2)
        self._token = self.token.encode()
        self._listeners: list[socket.socket] = []
        self._conns: set = set()
        self._lock = threading.Lock()
        self._closed = False
        self.counts = {"connections": 0, "refused": 0, "questions": 0, "bad": 0}
        ports = {}
        for host in dict.fromkeys(hosts):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((host, 0))
            s.listen(128)
            self._listeners.append(s)
            ports[host] = s.getsockname()[1]
            threading.Thread(target=self._accept, args=(s,), name=f"{name}-accept", daemon=True).start()
        node = next((h for h in ports if h != "127.0.0.1"), None)
        self.address = Address(node, ports.get(node, 0), ports.get("127.0.0.1", 0), self.token)

    def _accept(self, listener: socket.socket) -> None:
        while not self._closed:
            try:
                conn, _ = listener.accept()
            except OSError:
                return  # closed
            with self._lock:
                full = len(self._conns) >= MAX_CONNECTIONS
                if not full:
                    self._conns.add(conn)
            if full:
                self.counts["refused"] += 1
                conn.close()
                continue
            self.counts["connections"] += 1
            threading.Thread(target=self._serve, args=(conn,), name=f"{self.name}-conn", daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        try:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn.settimeout(FIRST_S)  # until its first question shows the token: then as long as IDLE_S
            while not self._closed:
                head = _recv_exact(conn, HEADER.size + TOKEN_LEN)
                if head is None:
                    return
                (n,) = HEADER.unpack_from(head)
                if n < TOKEN_LEN or n > MAX_QUESTION + TOKEN_LEN:
                    self._bad(f"a question of {n} bytes")
                    return
                # the token before the question is read: nothing of a stranger's is buffered, let alone parsed
                if not hmac.compare_digest(head[HEADER.size:], self._token):
                    self._bad("a question without this port's token")
                    return
                conn.settimeout(IDLE_S)
                body = _recv_exact(conn, n - TOKEN_LEN)
                if body is None:
                    return
                status, out = self._answer(body)
                conn.sendall(HEADER.pack(1 + len(out)) + bytes((status,)) + out)
        except OSError:
            return  # the asker went away, or the connection idled out
        finally:
            with self._lock:
                self._conns.discard(conn)
            conn.close()

    def _bad(self, what: str) -> None:
        self.counts["bad"] += 1
        if self.counts["bad"] <= 10 or self.counts["bad"] % 1000 == 0:
            log.warning("%s: %s; connection closed (%d so far)", self.name, what, self.counts["bad"])

    def _answer(self, body: bytes) -> tuple[int, bytes]:
        self.counts["questions"] += 1
        try:
            q = json.loads(body)
            if not (isinstance(q, list) and len(q) == 3 and isinstance(q[0], str) and isinstance(q[1], int)
                    and isinstance(q[2], list)):
                raise ValueError("a question is [method, log position, [arguments]]")
            return OK, self.answer(q[0], q[1], q[2])
        except Exception as e:  # noqa: BLE001 - the asker gets the copy's exception, as through Ray
            return FAILED, _exception_bytes(e)

    def stats(self) -> dict:
        with self._lock:
            open_now = len(self._conns)
        return {"port_" + k: v for k, v in {**self.counts, "open": open_now}.items()}

    def close(self) -> None:
        self._closed = True
        for s in self._listeners:
            try:
                s.close()
            except OSError:
                pass
        with self._lock:
            conns = list(self._conns)
        for c in conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


class _Call:
    __slots__ = ("buf", "endpoint", "future", "sock", "started")

    def __init__(self, future, sock, endpoint):
        self.future, self.sock, self.endpoint = future, sock, endpoint
        self.buf = bytearray()
        self.started = time.monotonic()


class WireClient:
    """An asker's side: ``ask(endpoint, token, body)`` sends a question on a pooled connection and returns a
    ``concurrent.futures.Future`` of the answer's bytes (or the copy's exception, or ``ShardUnavailable``).
    One thread reads every answer (``selectors``); callers only send and wait."""

    def __init__(self):
        self._sel = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._sel.register(self._wake_r, selectors.EVENT_READ, None)
        self._incoming: deque = deque()
        self._pool: dict = {}  # endpoint -> [(socket, idle since)]
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._loop, name="impressions-wire", daemon=True)
        self._thread.start()

    def ask(self, endpoint: tuple[str, int], token: str, body: bytes) -> cf.Future:
        fut: cf.Future = cf.Future()  # left pending: a caller that gives up may cancel it
        data = frame(token, body)
        for attempt in (0, 1):
            sock = self._take(endpoint) if attempt == 0 else None
            fresh = sock is None
            try:
                if fresh:
                    sock = socket.create_connection(endpoint, timeout=CONNECT_S)
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                sock.settimeout(CONNECT_S)
                sock.sendall(data)
                sock.setblocking(False)
                break
            except OSError as e:
                if sock is not None:
                    sock.close()
                if fresh:
                    fut.set_exception(ShardUnavailable(f"no answer at {endpoint[0]}:{endpoint[1]}: {e}"))
                    return fut
        self._incoming.append(_Call(fut, sock, endpoint))
        self._wake_w.send(b"\0")
        return fut

    def _take(self, endpoint) -> socket.socket | None:
        """A pooled connection to ``endpoint`` that is still open (one the copy closed reads as ready)."""
        now = time.monotonic()
        while True:
            with self._lock:
                idle = self._pool.get(endpoint)
                if not idle:
                    return None
                sock, since = idle.pop()
            if now - since < POOL_IDLE_S:
                try:
                    sock.setblocking(False)
                    if sock.recv(1, socket.MSG_PEEK) == b"":
                        raise OSError("closed")
                except BlockingIOError:
                    return sock  # nothing to read: open and quiet, as it should be
                except OSError:
                    pass
            sock.close()

    def _give_back(self, call: _Call) -> None:
        with self._lock:
            self._pool.setdefault(call.endpoint, []).append((call.sock, time.monotonic()))

    def _loop(self) -> None:
        calls: dict = {}
        while True:
            for key, _ in self._sel.select(timeout=1.0):
                if key.data is None:
                    try:
                        self._wake_r.recv(4096)
                    except BlockingIOError:
                        pass
                    continue
                self._read(key.data, calls)
            while self._incoming:
                call = self._incoming.popleft()
                calls[call.sock] = call
                self._sel.register(call.sock, selectors.EVENT_READ, call)
            now = time.monotonic()
            for call in [c for c in calls.values() if now - c.started > STUCK_S]:
                self._end(call, calls, ShardUnavailable(f"no answer in {STUCK_S:.0f} s"))

    def _read(self, call: _Call, calls: dict) -> None:
        if calls.get(call.sock) is not call:
            return  # ended earlier in this round
        try:
            b = call.sock.recv(1 << 20)
        except BlockingIOError:
            return
        except OSError as e:
            self._end(call, calls, ShardUnavailable(f"the copy at {call.endpoint} went away: {e}"))
            return
        if not b:
            self._end(call, calls, ShardUnavailable(f"the copy at {call.endpoint} closed the connection"))
            return
        call.buf += b
        if len(call.buf) < HEADER.size:
            return
        (n,) = HEADER.unpack_from(call.buf)
        if n < 1 or n > MAX_ANSWER:
            self._end(call, calls, ShardUnavailable(f"a malformed answer from {call.endpoint}"))
            return
        if len(call.buf) < HEADER.size + n:
            return
        status, payload = call.buf[HEADER.size], bytes(call.buf[HEADER.size + 1:HEADER.size + n])
        self._sel.unregister(call.sock)
        del calls[call.sock]
        if len(call.buf) == HEADER.size + n:
            self._give_back(call)
        else:
            call.sock.close()
        if status == OK:
            self._settle(call.future, payload, None)
        else:
            try:
                e = pickle.loads(payload)
            except Exception as err:  # noqa: BLE001 - an exception that does not load is reported as such
                e = RuntimeError(f"an error from {call.endpoint} that could not be read: {err}")
            self._settle(call.future, None, e if isinstance(e, BaseException) else RuntimeError(repr(e)))

    def _end(self, call: _Call, calls: dict, e: Exception) -> None:
        try:
            self._sel.unregister(call.sock)
        except (KeyError, ValueError):
            pass
        calls.pop(call.sock, None)
        call.sock.close()
        self._settle(call.future, None, e)

    @staticmethod
    def _settle(fut: cf.Future, value, e) -> None:
        try:
            if e is None:
                fut.set_result(value)
            else:
                fut.set_exception(e)
        except cf.InvalidStateError:
            pass  # cancelled by its caller meanwhile


_client: WireClient | None = None
_client_lock = threading.Lock()


def wire_client() -> WireClient:
    """This process's asker side (one thread, started at the first question)."""
    global _client
    if _client is None:
        with _client_lock:
            if _client is None:
                _client = WireClient()
    return _client
