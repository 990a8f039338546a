"""CompletionPort.resubmit(): dequeued completions started again in one call."""
from __future__ import annotations

import socket

import pytest

import fastiocp
from conftest import ON_LINUX, ON_WINDOWS, assert_no_growth, collect, loopback_udp_pair

BLOCK = 512


@pytest.fixture
def data_file(tmp_path):
    path = tmp_path / "data.bin"
    path.write_bytes(bytes(i % 251 for i in range(64 * BLOCK)))
    return path


def test_reads_keep_object_buffer_context_and_follow_new_offsets(port, data_file):
    expected = data_file.read_bytes()
    with fastiocp.open(data_file, "rb") as f:
        port.register(f, key="k")
        firsts = [port.read(f, bytearray(BLOCK), i * BLOCK, context=i) for i in range(8)]
        done = collect(port, 8)
        buffers = {c.context: c.buffer for c in done}
        for round_ in range(1, 4):
            offsets = [((c.context + 8 * round_) % 64) * BLOCK for c in done]
            assert port.resubmit(done, offsets) is None
            assert port.pending == 8 and not any(c.done for c in done)
            again = collect(port, 8)
            assert {id(c) for c in again} == {id(c) for c in firsts}
            for c in again:
                off = ((c.context + 8 * round_) % 64) * BLOCK
                assert c.done and c.error is None and c.key == "k"
                assert c.nbytes == BLOCK and c.result() == BLOCK
                assert c.buffer is buffers[c.context]
                assert bytes(c.buffer) == expected[off : off + BLOCK]
            done = again


def test_writes_at_new_offsets(port, tmp_path):
    path = tmp_path / "out.bin"
    with fastiocp.open(path, "w+b") as f:
        port.register(f)
        port.write(f, b"ab", 0, context="bytes")
        port.write(f, bytearray(b"cd"), 2, context="bytearray")
        done = sorted(collect(port, 2), key=lambda c: c.context)
        port.resubmit(done, [20, 10])  # bytearray -> 20, bytes -> 10
        assert sorted(c.nbytes for c in collect(port, 2)) == [2, 2]
    assert path.read_bytes()[:22] == b"abcd" + b"\0" * 6 + b"ab" + b"\0" * 8 + b"cd"


def test_receives_rearmed_and_a_cancelled_one_starts_clean(port, sockpair):
    a, b = sockpair
    port.register(a, key="a")
    port.register(b, key="b")
    op = port.recv(b, bytearray(16), context="r")
    assert op.cancel() is True
    (c,) = collect(port, 1)
    assert c.cancelled and c.error is not None
    for i in range(3):
        port.resubmit([c])
        assert not c.done and not c.cancelled and c.error is None
        a.sendall(b"ping%d" % i)
        (c,) = collect(port, 1)
        assert c is op and c.error is None and not c.cancelled and c.key == "b"
        assert c.context == "r" and bytes(c.buffer[: c.nbytes]) == b"ping%d" % i


def test_sends_and_receives_together_with_none_offsets(port, sockpair):
    a, b = sockpair
    port.register(a)
    port.register(b)
    port.send(a, b"xy", context="send")
    port.recv(b, bytearray(2), context="recv")
    done = collect(port, 2)
    got = b""
    for _ in range(3):
        port.resubmit(iter(done), (None for _ in done))  # any iterables
        done = collect(port, 2)
        assert {c.context: c.nbytes for c in done} == {"send": 2, "recv": 2}
        got += bytes(next(c for c in done if c.context == "recv").buffer)
    assert got == b"xy" * 3


def test_accepts_rearmed(port):
    lsock = socket.create_server(("127.0.0.1", 0))
    port.register(lsock, key="listener")
    op = port.accept(lsock, context="acc")
    peers, accepted = [], []
    try:
        for _ in range(3):
            peers.append(socket.create_connection(lsock.getsockname()))
            (c,) = collect(port, 1)
            assert c is op and c.error is None and c.context == "acc" and c.key == "listener"
            conn, addr = c.result()
            accepted.append(conn)
            assert addr == peers[-1].getsockname() and c.address == addr
            port.resubmit([c])
            assert not c.done and c.address is None
        op.cancel()
        (c,) = collect(port, 1)
        assert c.cancelled
    finally:
        for s in peers + accepted + [lsock]:
            s.close()


def test_recvfrom_rearmed(port):
    rx, tx = loopback_udp_pair()
    with rx, tx:
        port.register(rx)
        port.recvfrom(rx, bytearray(32), context="dgram")
        for i in range(3):
            tx.sendto(b"d%d" % i, rx.getsockname())
            (c,) = collect(port, 1)
            n, addr = c.result()
            assert bytes(c.buffer[:n]) == b"d%d" % i and addr == tx.getsockname()
            port.resubmit([c], [None])
        c.cancel()
        assert collect(port, 1)[0].cancelled


def test_sendto_and_connect_are_refused(port):
    a = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        a.bind(("127.0.0.1", 0))
        port.register(a)
        port.sendto(a, b"x", a.getsockname())
        sent = collect(port, 1)[0]
        with pytest.raises(ValueError, match="not 'sendto'"):
            port.resubmit([sent])
        assert port.pending == 0 and sent.done
    finally:
        a.close()


def test_inside_a_batch(port, sockpair):
    a, b = sockpair
    port.register(a)
    port.register(b)
    port.send(a, b"z")
    port.recv(b, 1)
    done = collect(port, 2)
    with port.batch():
        port.resubmit(done)
    assert sorted(c.op for c in collect(port, 2)) == ["recv", "send"]


def test_empty_is_a_no_op(port):
    port.resubmit([])
    port.resubmit([], [])
    assert port.pending == 0


def _dequeued_read(port, f, offset=0):
    port.read(f, bytearray(BLOCK), offset)
    (c,) = collect(port, 1)
    return c


def test_refusals_submit_nothing_and_leave_completions_usable(port, data_file, sockpair):
    a, b = sockpair
    with fastiocp.open(data_file, "rb") as f:
        port.register(f)
        port.register(b)
        c1, c2 = _dequeued_read(port, f), _dequeued_read(port, f)
        in_flight = port.recv(b, 4)
        port.post(context="p")
        (posted,) = collect(port, 1)
        cases = [
            (TypeError, "offsets is required", ([c1, c2],), {}),
            (ValueError, "offsets has 1 items for 2", ([c1, c2], [0]), {}),
            (ValueError, "appears twice", ([c1, c1], [0, 0]), {}),
            (TypeError, "must hold Completion", ([c1, "no"], [0, 0]), {}),
            (fastiocp.InvalidStateError, "in flight", ([c1, in_flight], [0, None]), {}),
            (ValueError, "read, write, recv, send, recvfrom and accept", ([c1, posted], [0, None]), {}),
            (ValueError, "offset must be >= 0", ([c1, c2], [0, -1]), {}),
            (TypeError, "offset must be an int", ([c1, c2], [0, "0"]), {}),
            (TypeError, "not iterable", (5,), {}),
            (TypeError, "missing required argument", (), {}),
        ]
        for exc, text, args, kwargs in cases:
            with pytest.raises(exc, match=text):
                port.resubmit(*args, **kwargs)
            assert port.pending == 1  # only the receive in flight
            assert c1.done and c2.done
        port.unregister(f)
        with pytest.raises(ValueError, match="not registered"):
            port.resubmit([c1, c2], [0, BLOCK])
        assert port.pending == 1 and c1.done and c2.done
        port.register(f)
        port.resubmit([c1, c2], offsets=[BLOCK, 2 * BLOCK])
        assert sorted(c.nbytes for c in collect(port, 2)) == [BLOCK, BLOCK]
        in_flight.cancel()
        collect(port, 1)


def test_after_close(backend, data_file):
    port = fastiocp.CompletionPort(backend=backend)
    with fastiocp.open(data_file, "rb") as f:
        port.register(f)
        c = _dequeued_read(port, f)
        port.close()
        with pytest.raises(fastiocp.PortClosedError):
            port.resubmit([c], [0])
        assert c.done


def test_buffer_pinned_again_and_released_by_close(backend, sockpair):
    """Invariants 2 and 4 for a resubmitted operation: its buffer cannot be
    resized while it is in flight, and close() completes it and lets go."""
    a, b = sockpair
    port = fastiocp.CompletionPort(backend=backend)
    port.register(b)
    buf = bytearray(16)
    port.recv(b, buf)
    a.sendall(b"x")
    (c,) = collect(port, 1)
    buf.extend(b"free")  # dequeued: released
    del buf[16:]
    port.resubmit([c])
    with pytest.raises(BufferError):
        buf.extend(b"more")
    port.close()
    assert c.done and c.cancelled and isinstance(c.error, OSError)
    buf.extend(b"free again")


@pytest.mark.skipif(not (ON_LINUX or ON_WINDOWS), reason="reads RSS and fd counts from /proc (Linux) or handle counts and the working set from Win32 (Windows) only")
def test_no_growth_over_20k_resubmit_cycles(port, sockpair):
    """Invariant 5: the same two completions (a receive and a send) cycled
    through resubmit() keep memory and handle counts flat."""
    a, b = sockpair
    port.register(a)
    port.register(b)
    port.recv(b, bytearray(64), context="r")
    port.send(a, b"0123456789", context="s")
    pair = collect(port, 2)

    def cycles(n: int) -> None:
        nonlocal pair
        for _ in range(n):
            port.resubmit(pair)
            pair = collect(port, 2)
            assert sorted(c.nbytes for c in pair) == [10, 10]

    assert_no_growth(cycles, 2_000, 20_000)
    assert port.pending == 0
