"""Questions on a copy's own port (``actors.wire``), in-process on 127.0.0.1: the answer and the copy's own
exceptions come back as through Ray; a question without the port's token, too large, or malformed is never
answered (nor read as code); a copy gone fails the call at once; connections are pooled, bounded, and
survive answers nobody waited for."""

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
from impressions.actors.runtime import ShardUnavailable
from impressions.actors.wire import QuestionPort, WireClient, encode_question, frame


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
    body = encode_question(method, after, args)
    return client.ask(port.address.route("127.0.0.1"), token or port.token, body)


def test_answers_and_the_copys_own_exceptions_come_back():
    p = QuestionPort(Copy().answer, ["127.0.0.1"])
    c = WireClient()
    try:
        assert p.address.host is None and p.address.route("10.0.0.9") == ("127.0.0.1", p.address.loopback)
        got = pickle.loads(_ask(c, p, "echo", 7, ([None, "ad-1"], np.int64(5), 9, 1.5)).result(5))
        assert got == (7, [[None, "ad-1"], 5, 9, 1.5])  # numpy scalars as numbers, tuples as lists
        with pytest.raises(Behind, match="not 9"):
            _ask(c, p, "behind").result(5)
        with pytest.raises(ValueError, match="not a question"):
            _ask(c, p, "__init__").result(5)
        # every call reused the one connection
        assert p.stats()["port_connections"] == 1 and p.stats()["port_questions"] == 3
    finally:
        p.close()


def test_arguments_that_are_not_plain_values_do_not_go_over_the_wire():
    assert encode_question("series", 0, ([None], np.arange(3))) is None
    assert encode_question("query", 0, (object(),)) is None
    assert json.loads(encode_question("overlap", 4, ((["a"], None), (["b"], "p"), 1, 2))) == \
        ["overlap", 4, [[["a"], None], [["b"], "p"], 1, 2]]


def test_a_question_without_the_token_is_not_read(port):
    c = WireClient()
    with pytest.raises(ShardUnavailable, match="closed the connection|went away"):
        _ask(c, port, "echo", token="0" * wire.TOKEN_LEN).result(5)
    assert port.copy.asked == [] and port.stats()["port_bad"] == 1
    # nor a pickle, whatever it says: the body is JSON or an error, never code
    evil = pickle.dumps(("echo", 0, []))
    with pytest.raises(ValueError, match="JSON|Expecting|decode"):
        c.ask(port.address.route(None), port.token, evil).result(5)
    assert port.copy.asked == []
    with pytest.raises(ValueError, match="a question is"):
        c.ask(port.address.route(None), port.token, b'{"method": "echo"}').result(5)
    assert pickle.loads(_ask(c, port, "echo", 1, (2,)).result(5)) == (1, [2])  # the port still serves


def test_a_question_too_large_closes_the_connection_unread(port):
    s = socket.create_connection(port.address.route(None), timeout=5)
    s.sendall(struct.pack(">I", wire.MAX_QUESTION + wire.TOKEN_LEN + 1) + port.token.encode())
    try:
        assert s.recv(10) == b""  # closed, nothing answered
    except ConnectionResetError:
        pass  # closed with the token unread in its buffer: the same
    s.close()
    assert port.copy.asked == [] and port.stats()["port_bad"] == 1


def test_a_copy_gone_fails_the_call_at_once():
    p = QuestionPort(Copy().answer, ["127.0.0.1"])
    where = p.address.route(None)
    c = WireClient()
    assert pickle.loads(c.ask(where, p.token, encode_question("echo", 1, ())).result(5)) == (1, [])
    p.close()  # its pooled connection is closed under the asker
    time.sleep(0.1)
    t = time.monotonic()
    with pytest.raises(ShardUnavailable):
        c.ask(where, p.token, encode_question("echo", 1, ())).result(5)
    assert time.monotonic() - t < 1.0


def test_an_answer_nobody_waited_for_keeps_the_connection_and_the_next_answer_right(port):
    c = WireClient()
    slow = _ask(c, port, "sleep", 0, (0.3, "late"))
    slow.cancel()  # the asker gave up (another copy answered): the port answers anyway
    assert pickle.loads(_ask(c, port, "echo", 2, ("now",)).result(5)) == (2, ["now"])  # on a second connection
    time.sleep(0.5)
    assert pickle.loads(_ask(c, port, "echo", 3, ()).result(5)) == (3, [])
    assert port.stats()["port_connections"] == 2


def test_many_askers_at_once_each_get_their_own_answer(port):
    c = WireClient()
    wrong = []

    def asker(t):
        for i in range(50):
            got = pickle.loads(_ask(c, port, "echo", i, (t,)).result(5))
            if got != (i, [t]):
                wrong.append((t, i, got))
    threads = [threading.Thread(target=asker, args=(t,)) for t in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not wrong and len(port.copy.asked) == 400
    assert port.stats()["port_connections"] <= 8


def test_connections_beyond_the_bound_are_refused_not_queued(port, monkeypatch):
    monkeypatch.setattr(wire, "MAX_CONNECTIONS", 2)
    held = [socket.create_connection(port.address.route(None), timeout=5) for _ in range(2)]
    time.sleep(0.1)
    extra = socket.create_connection(port.address.route(None), timeout=5)
    extra.settimeout(5)
    assert extra.recv(10) == b""
    assert port.stats()["port_refused"] == 1
    for s in held + [extra]:
        s.close()


def test_a_framed_question_is_what_the_port_reads():
    assert frame("a" * 32, b"xy") == struct.pack(">I", 34) + b"a" * 32 + b"xy"


def test_a_connection_that_shows_no_token_is_dropped_soon(port, monkeypatch):
    monkeypatch.setattr(wire, "FIRST_S", 0.3)
    s = socket.create_connection(port.address.route(None), timeout=5)
    s.sendall(b"\0\0")  # a stranger that says next to nothing, holding a connection
    t = time.monotonic()
    assert s.recv(10) == b""
    assert time.monotonic() - t < 2.0
    s.close()
    time.sleep(0.1)
    assert port.stats()["port_open"] == 0
    c = WireClient()  # an asker with the token keeps its connection past that
    assert pickle.loads(_ask(c, port, "echo", 1, ()).result(5)) == (1, [])
    time.sleep(0.5)
    assert pickle.loads(_ask(c, port, "echo", 2, ()).result(5)) == (2, [])
    assert port.stats()["port_connections"] == 2
