"""Questions on a copy's own port (``actors.wire``), in-process on 127.0.0.1: the answer and the copy's own
exceptions come back as through Ray; a connection that does not prove it holds the token is closed before
anything of it but its hello is read, however slowly it sends; an asker reads no answer from a port that
cannot prove it holds the token; a question too large or malformed is refused; a port gone fails the call at
once with ``PortFailed``; connections are pooled, bounded on both sides, and survive answers nobody waited
for."""

from __future__ import annotations

import json
import pickle
import socket
import struct
import threading
import time

import numpy as np
import pytest

from impressions.actors import wire
from impressions.actors.base import Behind
from impressions.actors.wire import PortFailed, QuestionPort, WireClient, answer_of, encode_question


class Copy:
    """What a copy's port calls: answers ``echo`` with its arguments, ``sleep`` after a while, raises otherwise."""

    def __init__(self):
        self.asked = []

    def answer(self, method, after, args):
        self.asked.append((method, after, args))
        if method == "echo":
            return pickle.dumps((after, args))
        if method == "sleep":
            time.sleep(args[0])
            return pickle.dumps(args[1])
        if method == "behind":
            raise Behind("reader 0 of shard 0 holds the log up to entry 3, not 9")
        raise ValueError(f"{method!r} is not a question a shard answers")


@pytest.fixture
def port():
    copy = Copy()
    p = QuestionPort(copy.answer, ["127.0.0.1"])
    p.copy = copy
    yield p
    p.close()


def _ask(client, port, method, after=0, args=(), token=None):
    return client.ask(port.address.route("127.0.0.1"), token or port.token, encode_question(method, after, args))


def _got(fut):
    return pickle.loads(answer_of(fut.result(5)))


def _shake(port) -> socket.socket:
    """A raw connection through the handshake, as an asker that holds the token opens one."""
    s = socket.create_connection(port.address.route(None), timeout=5)
    theirs = s.recv(wire.NONCE)
    mine = b"n" * wire.NONCE
    s.sendall(mine + wire._mac(port.token.encode(), b"asker", theirs, mine))
    assert s.recv(wire.MAC) == wire._mac(port.token.encode(), b"port", mine, theirs)
    return s


def _closed(s: socket.socket) -> bool:
    try:
        return s.recv(100) == b""
    except ConnectionResetError:
        return True  # closed with our bytes unread: the same


def test_answers_and_the_copys_own_exceptions_come_back(port):
    c = WireClient()
    assert port.address.host is None and port.address.route("10.0.0.9") == ("127.0.0.1", port.address.loopback)
    assert _got(_ask(c, port, "echo", 7, ([None, "ad-1"], np.int64(5), 9, 1.5))) == (7, [[None, "ad-1"], 5, 9, 1.5])
    with pytest.raises(Behind, match="not 9"):
        _got(_ask(c, port, "behind"))
    with pytest.raises(ValueError, match="not a question"):
        _got(_ask(c, port, "__init__"))
    st = port.stats()  # every call reused the one connection
    assert st["port_connections"] == 1 and st["port_questions"] == 3 and st["port_bad"] == 0
    assert port.token not in repr(port.address)


def test_what_does_not_go_over_the_wire_goes_through_ray():
    assert encode_question("series", 0, ([None], np.arange(3))) is None
    assert encode_question("query", 0, (object(),)) is None
    assert encode_question("reach", 0, (["k" * 100] * (wire.MAX_QUESTION // 100), None, 1, 2)) is None
    assert json.loads(encode_question("overlap", 4, ((["a"], None), (["b"], "p"), 1, 2))) == \
        ["overlap", 4, [[["a"], None], [["b"], "p"], 1, 2]]


def test_a_connection_without_the_token_is_closed_unread(port):
    c = WireClient()
    with pytest.raises(PortFailed):
        _ask(c, port, "echo", token="0" * 32).result(5)
    assert port.copy.asked == [] and port.stats()["port_bad"] == 1
    # with it, a body that is not JSON is an error, never code: a question is read as JSON only
    evil = pickle.dumps(("echo", 0, []))
    with pytest.raises(ValueError, match="JSON|Expecting|decode"):
        answer_of(c.ask(port.address.route(None), port.token, evil).result(5))
    with pytest.raises(ValueError, match="a question is"):
        answer_of(c.ask(port.address.route(None), port.token, b'{"method": "echo"}').result(5))
    assert port.copy.asked == []
    assert _got(_ask(c, port, "echo", 1, (2,))) == (1, [2])  # the port still serves


def test_an_asker_reads_no_answer_from_a_port_without_the_token():
    """A port that is not the copy's (another process on its number after the copy died) cannot prove it
    holds the token: the asker fails the call and reads nothing of it (a pickle there would run code)."""
    impostor = socket.socket()
    impostor.bind(("127.0.0.1", 0))
    impostor.listen(4)
    seen = []

    def serve():
        conn, _ = impostor.accept()
        conn.sendall(b"x" * wire.NONCE)
        seen.append(conn.recv(1000))
        conn.sendall(b"y" * wire.MAC + struct.pack(">I", 5) + b"\1boom")
        time.sleep(0.5)
        conn.close()
    threading.Thread(target=serve, daemon=True).start()
    with pytest.raises(PortFailed, match="not the copy's"):
        WireClient().ask(impostor.getsockname(), "a" * 32, encode_question("echo", 0, ())).result(5)
    assert seen and b"a" * 32 not in seen[0]  # the token itself never went over the wire
    impostor.close()


def test_a_stranger_is_dropped_soon_however_slowly_it_sends(port, monkeypatch):
    monkeypatch.setattr(wire, "FIRST_S", 0.5)
    s = socket.create_connection(port.address.route(None), timeout=5)
    s.recv(wire.NONCE)
    t = time.monotonic()
    for _ in range(5):  # a byte every 0.2 s: each read is quick, the hello never complete
        try:
            s.sendall(b"\0")
        except OSError:
            break
        time.sleep(0.2)
    assert _closed(s) and time.monotonic() - t < 1.5
    s.close()
    time.sleep(0.1)
    assert port.stats()["port_open"] == 0
    c = WireClient()  # an asker that shook hands keeps its connection past that
    assert _got(_ask(c, port, "echo", 1, ())) == (1, [])
    time.sleep(0.6)
    assert _got(_ask(c, port, "echo", 2, ())) == (2, [])
    assert port.stats()["port_connections"] == 2  # the stranger's and the asker's one


def test_strangers_have_a_budget_of_their_own(port, monkeypatch):
    monkeypatch.setattr(wire, "MAX_STRANGERS", 2)
    held = [socket.create_connection(port.address.route(None), timeout=5) for _ in range(2)]
    for s in held:
        s.recv(wire.NONCE)
    extra = socket.create_connection(port.address.route(None), timeout=5)
    assert _closed(extra)
    assert port.stats()["port_refused"] == 1
    # an asker through the handshake is no stranger: with the strangers gone it connects
    for s in held + [extra]:
        s.close()
    time.sleep(0.1)
    assert _got(_ask(WireClient(), port, "echo", 3, ())) == (3, [])


def test_a_question_too_large_closes_the_connection_unread(port):
    s = _shake(port)
    s.sendall(struct.pack(">I", wire.MAX_QUESTION + 1) + b"{")
    assert _closed(s)
    s.close()
    assert port.copy.asked == [] and port.stats()["port_bad"] == 1


def test_a_port_gone_fails_the_call_at_once():
    p = QuestionPort(Copy().answer, ["127.0.0.1"])
    where = p.address.route(None)
    c = WireClient()
    assert pickle.loads(answer_of(c.ask(where, p.token, encode_question("echo", 1, ())).result(5))) == (1, [])
    p.close()  # its pooled connection is closed under the asker
    time.sleep(0.1)
    t = time.monotonic()
    with pytest.raises(PortFailed):
        c.ask(where, p.token, encode_question("echo", 1, ())).result(5)
    assert time.monotonic() - t < 1.0


def test_an_answer_nobody_waited_for_keeps_the_connection_and_the_next_answer_right(port):
    c = WireClient()
    slow = _ask(c, port, "sleep", 0, (0.3, "late"))
    time.sleep(0.05)
    slow.cancel()  # the asker gave up (another copy answered): the port answers anyway
    assert _got(_ask(c, port, "echo", 2, ("now",))) == (2, ["now"])  # on a second connection
    time.sleep(0.5)
    assert _got(_ask(c, port, "echo", 3, ())) == (3, [])
    assert port.stats()["port_connections"] == 2


def test_many_askers_at_once_each_get_their_own_answer_and_few_run_at_once(port):
    c = WireClient()
    wrong = []

    def asker(t):
        for i in range(50):
            got = _got(_ask(c, port, "echo", i, (t,)))
            if got != (i, [t]):
                wrong.append((t, i, got))
    threads = [threading.Thread(target=asker, args=(t,)) for t in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not wrong and len(port.copy.asked) == 400
    assert port.stats()["port_connections"] <= 8
    # at most RUNNING questions run at once; the others wait their turn, answered all the same
    t = time.monotonic()
    slow = [_ask(c, port, "sleep", 0, (0.2, i)) for i in range(2 * wire.RUNNING)]
    assert [_got(f) for f in slow] == list(range(2 * wire.RUNNING))
    assert time.monotonic() - t >= 0.4


def test_an_asker_keeps_few_idle_connections_and_closes_them_in_time(port, monkeypatch):
    monkeypatch.setattr(wire, "POOL_IDLE_S", 0.5)
    c = WireClient()
    burst = [_ask(c, port, "sleep", 0, (0.1, i)) for i in range(12)]
    assert [_got(f) for f in burst] == list(range(12))
    time.sleep(0.2)
    assert sum(len(v) for v in c._pool.values()) == wire.POOL_MAX
    assert port.stats()["port_open"] == wire.POOL_MAX
    time.sleep(1.8)  # swept by the wire thread, nobody asking
    assert not c._pool
    time.sleep(0.2)
    assert port.stats()["port_open"] == 0
