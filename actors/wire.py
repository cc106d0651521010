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
* **Who may ask, and who answers.** Each port has a token of its own, drawn
  at random when the copy starts, and never sent over the wire: a new
  connection opens with a handshake in which each side proves it holds the
  token (an HMAC of both sides' random nonces), so a stranger's connection
  is closed before anything of it is read but its fixed-size hello, and an
  asker reads an answer only from the copy whose port the coordinator named
  (not from whatever listens on that port after the copy died).
  The token goes to the coordinator only by a call of its own
  (``question_address``), never in ``health`` or ``stats``, which the REST API
  shows, and from the coordinator only in ``read_route``, to askers that
  reach Ray anyway (the REST replicas, the Python client).
* **Where.** A copy listens on its node's address, for askers on other nodes,
  and on 127.0.0.1, for askers on its own node, which use it.
* **Failure.** A port that refuses, closes, does not complete the handshake
  in ``CONNECT_S`` or drops the answer fails the call with ``PortFailed``:
  the asker asks the same copy through Ray (``actors.questions``), which
  says whether the copy itself is gone; a port is a shortcut, never the only
  way to a copy.  A restarted copy listens on a new port with a new token;
  the coordinator publishes them at its next look at the readers.
* **Bounds.** A port serves at most ``MAX_CONNECTIONS`` connections at once
  (a thread each), of which at most ``MAX_STRANGERS`` not through the
  handshake yet; one that has not completed it ``FIRST_S`` after opening is
  closed, as is one idle for ``IDLE_S``; at most ``RUNNING`` questions run
  at once (the others queue), as a copy's reading threads bound them on
  Ray; a question is at most ``MAX_QUESTION`` bytes (a larger one goes
  through Ray).  An asker keeps at most ``POOL_MAX`` idle connections to a
  port and closes those idle for ``POOL_IDLE_S``.

Nothing here holds a lock while it waits on the network: the asker's side is
one thread per process that connects, shakes hands, reads answers and
completes futures (a caller, an event loop among them, never waits on a
connect); the caller waits on those futures with its own deadline, and
decodes the answer itself (``answer_of``).
"""

from __future__ import annotations

import concurrent.futures as cf
import errno
import hashlib
import hmac
import json
import logging
import os
import pickle
import secrets
import selectors
import socket
import struct
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .runtime import ShardUnavailable

if TYPE_CHECKING:
    from collections.abc import Callable

log = logging.getLogger("impressions.wire")

HEADER = struct.Struct(">I")
NONCE = 16
MAC = 32  # HMAC-SHA256
MAX_QUESTION = 8 << 20
MAX_ANSWER = 1 << 31
MAX_CONNECTIONS = 64
MAX_STRANGERS = 16  # connections not through the handshake yet, at most (of MAX_CONNECTIONS)
RUNNING = 4  # questions a port runs at once; more wait their turn
IDLE_S = 300.0  # a port closes a connection idle this long
FIRST_S = 5.0  # ...and one that has not completed the handshake this long after it opened
POOL_IDLE_S = 60.0  # an asker closes a connection idle this long (well before the port would)
POOL_MAX = 8  # idle connections an asker keeps to one port
CONNECT_S = 1.0  # a connection and its handshake, at most
STUCK_S = 300.0  # an asker gives up on a call not answered in this long (its caller gave up long before)
OK, FAILED = 0, 1


class PortFailed(ShardUnavailable):
    """The question did not get through a copy's port (refused, closed, no handshake, the answer lost): ask the
    copy through Ray, which says whether the copy itself is there."""


@dataclass(frozen=True)
class Address:
    """Where a copy answers: ``host:port`` for askers on other nodes, ``127.0.0.1:loopback`` for askers on
    its own node; ``token`` is the port's secret; ``ident`` names the port without giving its token away."""

    host: str | None
    port: int
    loopback: int
    token: str = field(repr=False)

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


def _mac(token: bytes, *parts: bytes) -> bytes:
    return hmac.new(token, b"".join(parts), hashlib.sha256).digest()


def _plain(x):
    """JSON's ``default``: numpy scalars as Python numbers; anything else is not sent over the wire."""
    item = getattr(x, "item", None)
    if item is not None and getattr(x, "shape", None) == ():
        return item()
    raise TypeError(f"{type(x).__name__} does not go over the wire")


def encode_question(method: str, after: int, args: tuple) -> bytes | None:
    """The question as JSON, or None when its arguments are not plain values or it is larger than a port
    takes (it then goes through Ray)."""
    try:
        body = json.dumps([method, int(after), list(args)], default=_plain, separators=(",", ":")).encode()
    except (TypeError, ValueError):
        return None
    return body if len(body) <= MAX_QUESTION else None


def frame(body: bytes) -> bytes:
    return HEADER.pack(len(body)) + body


def answer_of(value):
    """What a call's future holds, ``(status, bytes)``, as the caller takes it: the answer's bytes (as
    ``ShardBase.ask_packed`` gives them), or the copy's own exception raised."""
    status, payload = value
    if status == OK:
        return payload
    try:
        e = pickle.loads(payload)
    except Exception as err:  # noqa: BLE001 - an error that does not load is reported as such
        raise RuntimeError(f"a copy's error that could not be read: {err}") from None
    raise e if isinstance(e, Exception) else RuntimeError(repr(e))


def _exception_bytes(e: BaseException) -> bytes:
    try:
        return pickle.dumps(e, protocol=pickle.HIGHEST_PROTOCOL)
    except Exception:  # noqa: BLE001 - an exception that does not pickle is sent as its text
        return pickle.dumps(RuntimeError(f"{type(e).__name__}: {e}"), protocol=pickle.HIGHEST_PROTOCOL)


def _recv_exact(conn: socket.socket, n: int, deadline: float | None = None) -> bytes | None:
    """``n`` bytes, or None when the peer closed the connection first; with ``deadline`` (monotonic), all of
    them by then (``TimeoutError`` else), however slowly the peer sends."""
    parts, got = [], 0
    while got < n:
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("too slow")
            conn.settimeout(left)
        b = conn.recv(min(n - got, 1 << 20))
        if not b:
            return None
        parts.append(b)
        got += len(b)
    return b"".join(parts)


class QuestionPort:
    """A copy's questions on TCP: ``answer(method, after, args)`` returns the answer's bytes (or raises), run on
    the connection's own thread, ``RUNNING`` at a time.  Listens on each of ``hosts`` (port 0: the system
    picks)."""

    def __init__(self, answer: Callable[[str, int, list], bytes], hosts: list[str], name: str = "questions"):
        self.answer, self.name = answer, name
        self.token = secrets.token_hex(16)
        self._key = self.token.encode()
        self._listeners: list[socket.socket] = []
        self._conns: set = set()
        self._strangers = 0
        self._lock = threading.Lock()
        self._running = threading.BoundedSemaphore(RUNNING)
        self._closed = False
        self._accepting = 0  # accept threads alive
        self.counts = {"connections": 0, "refused": 0, "questions": 0, "bad": 0}
        ports = {}
        try:
            for host in dict.fromkeys(hosts):
                s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                self._listeners.append(s)
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                s.bind((host, 0))
                s.listen(128)
                ports[host] = s.getsockname()[1]
        except OSError:
            self.close()
            raise
        for s in self._listeners:
            self._accepting += 1
            threading.Thread(target=self._accept, args=(s,), name=f"{name}-accept", daemon=True).start()
        node = next((h for h in ports if h != "127.0.0.1"), None)
        self.address = Address(node, ports.get(node, 0), ports.get("127.0.0.1", 0), self.token)

    @property
    def serving(self) -> bool:
        """Whether every listener still accepts (a port that does not is not published)."""
        return not self._closed and self._accepting == len(self._listeners)

    def _count(self, what: str) -> None:
        with self._lock:
            self.counts[what] += 1

    def _accept(self, listener: socket.socket) -> None:
        try:
            while not self._closed:
                try:
                    conn, _ = listener.accept()
                except OSError as e:
                    if self._closed:
                        return
                    # out of descriptors or buffers a moment: keep accepting (the backlog waits meanwhile)
                    log.warning("%s: accept failed (%s); trying again", self.name, errno.errorcode.get(e.errno, e))
                    time.sleep(0.05)
                    continue
                with self._lock:
                    full = len(self._conns) >= MAX_CONNECTIONS or self._strangers >= MAX_STRANGERS
                    if not full:
                        self._conns.add(conn)
                        self._strangers += 1
                if full:
                    self._count("refused")
                    conn.close()
                    continue
                self._count("connections")
                try:
                    threading.Thread(target=self._serve, args=(conn,), name=f"{self.name}-conn", daemon=True).start()
                except RuntimeError:  # no thread to be had: the connection is closed, not left counted
                    self._forget(conn, stranger=True)
                    conn.close()
        finally:
            with self._lock:
                self._accepting -= 1

    def _forget(self, conn, stranger: bool) -> None:
        with self._lock:
            self._conns.discard(conn)
            if stranger:
                self._strangers -= 1

    def _handshake(self, conn: socket.socket) -> bool:
        """The asker proves it holds the token, then the port does (each an HMAC of both nonces), all within
        ``FIRST_S`` of the connection opening; a stranger's bytes read: its fixed-size hello only."""
        deadline = time.monotonic() + FIRST_S
        mine = secrets.token_bytes(NONCE)
        conn.settimeout(FIRST_S)
        conn.sendall(mine)
        hello = _recv_exact(conn, NONCE + MAC, deadline)
        if hello is None:
            return False
        theirs, proof = hello[:NONCE], hello[NONCE:]
        if not hmac.compare_digest(proof, _mac(self._key, b"asker", mine, theirs)):
            self._bad("a connection without this port's token")
            return False
        conn.sendall(_mac(self._key, b"port", theirs, mine))
        return True

    def _serve(self, conn: socket.socket) -> None:
        stranger = True
        try:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if not self._handshake(conn):
                return
            with self._lock:  # no stranger any more: out of their budget
                self._strangers -= 1
            stranger = False
            conn.settimeout(IDLE_S)
            while not self._closed:
                head = _recv_exact(conn, HEADER.size)
                if head is None:
                    return
                (n,) = HEADER.unpack(head)
                if n > MAX_QUESTION:
                    self._bad(f"a question of {n} bytes")
                    return
                body = _recv_exact(conn, n)
                if body is None:
                    return
                with self._running:
                    status, out = self._answer(body)
                conn.sendall(HEADER.pack(1 + len(out)) + bytes((status,)) + out)
        except OSError:
            return  # the asker went away, was too slow, or the connection idled out
        finally:
            self._forget(conn, stranger)
            conn.close()

    def _bad(self, what: str) -> None:
        self._count("bad")
        if self.counts["bad"] <= 10 or self.counts["bad"] % 1000 == 0:
            log.warning("%s: %s; connection closed (%d so far)", self.name, what, self.counts["bad"])

    def _answer(self, body: bytes) -> tuple[int, bytes]:
        self._count("questions")
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
            out = {**self.counts, "open": len(self._conns)}
        return {"port_" + k: v for k, v in out.items()}

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


# the states of an asker's call
CONNECTING, NONCE_IN, SENDING, PROOF_IN, ANSWER_IN = range(5)


class _Call:
    __slots__ = ("buf", "deadline", "endpoint", "future", "key", "nonce", "out", "sock", "state")

    def __init__(self, future, endpoint, key: bytes, out: bytes, sock=None):
        self.future, self.endpoint, self.key, self.out, self.sock = future, endpoint, key, out, sock
        self.buf = bytearray()
        self.nonce = b""
        self.state = ANSWER_IN if sock is not None else CONNECTING
        self.deadline = time.monotonic() + (STUCK_S if sock is not None else CONNECT_S)


class WireClient:
    """An asker's side: ``ask(endpoint, token, body)`` sends a question and returns a
    ``concurrent.futures.Future`` of ``(status, bytes)`` (``answer_of`` decodes it), or failing with
    ``PortFailed``.  A pooled connection sends at once from the caller; a new one is opened, shaken hands
    with and sent on by this process's one wire thread, which also reads every answer."""

    def __init__(self):
        self._sel = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._sel.register(self._wake_r, selectors.EVENT_READ, None)
        self._incoming: deque = deque()
        self._pool: dict = {}  # endpoint -> [(socket, idle since)], authenticated connections
        self._lock = threading.Lock()
        self._swept = time.monotonic()
        self._thread = threading.Thread(target=self._loop, name="impressions-wire", daemon=True)
        self._thread.start()

    def ask(self, endpoint: tuple[str, int], token: str, body: bytes) -> cf.Future:
        fut: cf.Future = cf.Future()  # left pending: a caller that gives up may cancel it
        data, key = frame(body), token.encode()
        sock = self._take(endpoint)
        if sock is not None:
            try:
                sock.settimeout(CONNECT_S)
                sock.sendall(data)
                sock.setblocking(False)
                self._hand_over(_Call(fut, endpoint, key, b"", sock))
                return fut
            except OSError:
                sock.close()
        self._hand_over(_Call(fut, endpoint, key, data))  # a new connection, made on the wire thread
        return fut

    def _hand_over(self, call: _Call) -> None:
        self._incoming.append(call)
        try:
            self._wake_w.send(b"\0")
        except BlockingIOError:
            pass  # the wake-up pipe is full: the thread is awake anyway

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
            idle = self._pool.setdefault(call.endpoint, [])
            if len(idle) < POOL_MAX:
                idle.append((call.sock, time.monotonic()))
                return
        call.sock.close()

    def _sweep(self) -> None:
        """Close pooled connections idle for ``POOL_IDLE_S`` (those to a copy nobody asks any more too)."""
        now = time.monotonic()
        self._swept = now
        old = []
        with self._lock:
            for endpoint in list(self._pool):
                idle = self._pool[endpoint]
                old += [s for s, since in idle if now - since >= POOL_IDLE_S]
                self._pool[endpoint] = [(s, since) for s, since in idle if now - since < POOL_IDLE_S]
                if not self._pool[endpoint]:
                    del self._pool[endpoint]
        for s in old:
            s.close()

    def _loop(self) -> None:
        calls: dict = {}
        while True:
            try:
                self._round(calls)
            except Exception:  # the thread every asker of this process needs must not die
                log.exception("the wire thread's round failed")

    def _round(self, calls: dict) -> None:
        wait = 0.05 if any(c.state != ANSWER_IN for c in calls.values()) else 1.0
        for key, events in self._sel.select(timeout=wait):
            if key.data is None:
                try:
                    while self._wake_r.recv(4096):
                        pass
                except BlockingIOError:
                    pass
                continue
            self._step(key.data, calls, events)
        while self._incoming:
            self._start(self._incoming.popleft(), calls)
        now = time.monotonic()
        for call in [c for c in calls.values() if now > c.deadline]:
            self._end(call, calls, PortFailed(f"no {'answer' if call.state == ANSWER_IN else 'connection'} from "
                                              f"{call.endpoint[0]}:{call.endpoint[1]} in time"))
        if now - self._swept >= 1.0:
            self._sweep()

    def _start(self, call: _Call, calls: dict) -> None:
        if call.sock is None:
            try:
                call.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                call.sock.setblocking(False)
                call.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                err = call.sock.connect_ex(call.endpoint)
                if err not in (0, errno.EINPROGRESS, errno.EWOULDBLOCK):
                    raise OSError(err, os.strerror(err))
            except OSError as e:
                if call.sock is not None:
                    call.sock.close()
                self._settle(call.future, None, PortFailed(f"no connection to {call.endpoint}: {e}"))
                return
            calls[call.sock] = call
            self._sel.register(call.sock, selectors.EVENT_WRITE, call)
            return
        calls[call.sock] = call
        self._sel.register(call.sock, selectors.EVENT_READ, call)

    def _step(self, call: _Call, calls: dict, events: int) -> None:
        if calls.get(call.sock) is not call:
            return  # ended earlier in this round
        try:
            if call.state == CONNECTING:
                err = call.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if err:
                    raise OSError(err, os.strerror(err))
                call.state = NONCE_IN
                self._sel.modify(call.sock, selectors.EVENT_READ, call)
                return
            if call.state == SENDING:
                sent = call.sock.send(call.out)
                call.out = call.out[sent:]
                if not call.out:
                    call.state = PROOF_IN
                    self._sel.modify(call.sock, selectors.EVENT_READ, call)
                return
            b = call.sock.recv(1 << 20)
        except BlockingIOError:
            return
        except OSError as e:
            self._end(call, calls, PortFailed(f"the port at {call.endpoint} went away: {e}"))
            return
        if not b:
            self._end(call, calls, PortFailed(f"the port at {call.endpoint} closed the connection"))
            return
        call.buf += b
        if call.state == NONCE_IN:
            if len(call.buf) < NONCE:
                return
            theirs, mine = bytes(call.buf[:NONCE]), os.urandom(NONCE)
            del call.buf[:NONCE]
            call.out = mine + _mac(call.key, b"asker", theirs, mine) + call.out
            call.nonce = mine + theirs  # what the port's proof is of
            call.state = SENDING
            self._sel.modify(call.sock, selectors.EVENT_WRITE, call)
            return
        if call.state == PROOF_IN:
            if len(call.buf) < MAC:
                return
            if not hmac.compare_digest(bytes(call.buf[:MAC]), _mac(call.key, b"port", call.nonce)):
                self._end(call, calls, PortFailed(f"the port at {call.endpoint} is not the copy's"))
                return
            del call.buf[:MAC]
            call.state = ANSWER_IN
            call.deadline = time.monotonic() + STUCK_S
        if len(call.buf) < HEADER.size:
            return
        (n,) = HEADER.unpack_from(call.buf)
        if n < 1 or n > MAX_ANSWER:
            self._end(call, calls, PortFailed(f"a malformed answer from {call.endpoint}"))
            return
        if len(call.buf) < HEADER.size + n:
            return
        whole = len(call.buf) == HEADER.size + n
        status, payload = call.buf[HEADER.size], bytes(memoryview(call.buf)[HEADER.size + 1:HEADER.size + n])
        self._sel.unregister(call.sock)
        del calls[call.sock]
        if whole:
            self._give_back(call)
        else:
            call.sock.close()
        self._settle(call.future, (status, payload), None)

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


def _forked() -> None:
    global _client, _client_lock
    _client, _client_lock = None, threading.Lock()  # the parent's wire thread is not in the child


os.register_at_fork(after_in_child=_forked)
