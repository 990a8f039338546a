"""Buffer pools, pooled and multishot receives, multishot accept and
zero-copy sends (issue 18): the contract on every backend.

Scenarios after liburing's test/recv-multishot.c (results in order, the
last without IORING_CQE_F_MORE, ENOBUFS when the ring is empty, cancel)
and test/accept.c (multishot accept of several connections, cancel), and
after the zero-byte receive of IOCP servers (no buffer held while idle).
"""
from __future__ import annotations

import errno
import gc
import socket
import sys
import threading
import time

import pytest

import fastiocp

from conftest import ON_LINUX, ON_WINDOWS, UNDER_ASAN, loopback_tcp_pair, rss_bytes

ENOBUFS = (errno.ENOBUFS, getattr(errno, "WSAENOBUFS", -1))


def take(port, want, timeout=10.0):
    """Dequeues until want(c) holds for a completion; returns all taken."""
    got = []
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        assert left > 0, f"timed out; got {got!r}"
        c = port.get(timeout=left)
        if c is None:
            continue
        got.append(c)
        if want(c):
            return got


def test_pool_arguments():
    with pytest.raises(ValueError):
        fastiocp.BufferPool(0, 1)
    with pytest.raises(ValueError):
        fastiocp.BufferPool(16, 0)
    with pytest.raises(ValueError):
        fastiocp.BufferPool(16, fastiocp.POOL_MAX + 1)
    with pytest.raises(TypeError):
        fastiocp.BufferPool("16", 1)
    pool = fastiocp.BufferPool(1024, 4)
    assert (pool.size, pool.count, pool.in_use) == (1024, 4, 0)
    assert "size=1024" in repr(pool)


def test_pooled_recv_delivers_data_in_a_pool_buffer(port, sockpair):
    a, b = sockpair
    pool = fastiocp.BufferPool(4096, 4)
    port.register(a, key="k")
    c = port.recv(a, pool, context="ctx")
    assert c.buffer is pool  # what the operation uses while it waits
    b.sendall(b"hello")
    (got,) = take(port, lambda c: True)
    assert got is c
    assert (got.key, got.context, got.nbytes, got.error, got.more) == ("k", "ctx", 5, None, False)
    assert isinstance(got.buffer, fastiocp.PooledBuffer)
    assert bytes(got.buffer) == b"hello" and len(got.buffer) == 5
    assert got.result() == 5
    assert pool.in_use == 1
    got.release()
    assert pool.in_use == 0 and got.buffer.released and len(got.buffer) == 0
    got.release()  # idempotent
    with pytest.raises(ValueError):
        memoryview(got.buffer)


def test_pooled_recv_end_of_stream_holds_no_buffer(port, sockpair):
    a, b = sockpair
    pool = fastiocp.BufferPool(64, 2)
    port.register(a)
    c = port.recv(a, pool)
    b.close()
    (got,) = take(port, lambda c: True)
    assert got is c and got.nbytes == 0 and got.error is None
    assert got.buffer is None and pool.in_use == 0


def test_one_buffer_is_reused_after_release(port, sockpair):
    a, b = sockpair
    pool = fastiocp.BufferPool(64, 1)
    port.register(a)
    for i in range(20):
        c = port.recv(a, pool)
        b.sendall(b"msg%d" % i)
        take(port, lambda x: x is c)
        assert bytes(c.buffer) == b"msg%d" % i
        c.release()
    assert pool.in_use == 0


def test_a_memoryview_keeps_the_buffer(port, sockpair):
    a, b = sockpair
    pool = fastiocp.BufferPool(64, 1)
    port.register(a)
    c = port.recv(a, pool)
    b.sendall(b"abc")
    take(port, lambda x: x is c)
    view = memoryview(c.buffer)
    with pytest.raises(BufferError):
        c.release()
    assert bytes(view[1:]) == b"bc"
    view.release()
    c.release()
    assert pool.in_use == 0


def test_buffer_goes_back_when_collected(port, sockpair):
    a, b = sockpair
    pool = fastiocp.BufferPool(64, 2)
    port.register(a)
    c = port.recv(a, pool)
    b.sendall(b"x")
    take(port, lambda x: x is c)
    data = memoryview(c.buffer)
    del c
    gc.collect()
    assert pool.in_use == 1  # the memoryview keeps it
    del data
    gc.collect()
    assert pool.in_use == 0


def test_empty_pool_completes_with_enobufs_and_loses_nothing(port, sockpair):
    a, b = sockpair
    pool = fastiocp.BufferPool(64, 1)
    port.register(a)
    first = port.recv(a, pool)
    b.sendall(b"one")
    take(port, lambda x: x is first)
    assert bytes(first.buffer) == b"one"  # holds the pool's only buffer
    second = port.recv(a, pool)
    b.sendall(b"two")
    take(port, lambda x: x is second)
    assert isinstance(second.error, OSError) and second.error.errno in ENOBUFS
    assert "release buffers" in str(second.error)
    assert second.nbytes == 0 and second.buffer is None
    with pytest.raises(OSError):
        second.result()
    first.release()
    third = port.recv(a, pool)
    take(port, lambda x: x is third)
    assert bytes(third.buffer) == b"two"


def test_multishot_recv_delivers_every_byte_in_order_then_ends(port, sockpair):
    a, b = sockpair
    pool = fastiocp.BufferPool(256, 64)  # one per message at most: never dry
    port.register(a, key="ms")
    c = port.recv(a, pool, context="ctx", multishot=True)
    sent = bytearray()
    received = bytearray()
    results = []
    for i in range(30):
        msg = b"%03d:" % i + b"x" * (i % 7)
        b.sendall(msg)
        sent += msg
        if i % 3 == 0:
            time.sleep(0.002)
    b.close()
    for got in take(port, lambda x: x is c):
        results.append(got)
        if got.nbytes:
            received += bytes(got.buffer)
            got.release()
    assert received == sent
    *children, last = results
    assert last is c and not last.more and last.nbytes == 0 and last.error is None
    assert children and all(x.more and x is not c for x in children)
    assert all((x.key, x.context, x.op) == ("ms", "ctx", "recv") for x in results)
    assert pool.in_use == 0


def test_receives_landing_at_once_all_get_buffers(port):
    """More receives complete in one wait than the io_uring buffer ring
    starts with (it keeps only recently used buffers, POOL_RING_DEPTH):
    each still gets a buffer, none ENOBUFS, while the pool has some."""
    pool = fastiocp.BufferPool(256, 64)
    pairs = [socket.socketpair() for _ in range(40)]
    try:
        ops = {}
        for a, _ in pairs:
            port.register(a)
            ops[port.recv(a, pool, context=a.fileno())] = a
        for i, (_, b) in enumerate(pairs):
            b.sendall(b"%04d" % i)
        time.sleep(0.05)  # all of them in before the first wait
        got = {}
        deadline = time.monotonic() + 10
        while len(got) < len(ops):
            assert time.monotonic() < deadline, f"timed out with {len(got)}"
            for c in port.get_many(64, timeout=1) or ():
                assert c.error is None, c.error
                got[c.context] = bytes(c.buffer)
        assert sorted(got.values()) == [b"%04d" % i for i in range(40)]
        assert pool.in_use == 40
    finally:
        for a, b in pairs:
            a.close()
            b.close()


def test_multishot_recv_goes_on_while_the_receiver_holds_buffers(port, sockpair):
    """A multishot receive whose buffers the receiver keeps (the ring must
    be topped up from the pool as it is used) ends with ENOBUFS only when
    the whole pool is held."""
    a, b = sockpair
    pool = fastiocp.BufferPool(64, 32)
    port.register(a)
    c = port.recv(a, pool, multishot=True)
    held = []
    for i in range(32):
        b.sendall(b"%02d" % i)
        held += [x for x in take(port, lambda x: x.nbytes > 0 or x is c) if x.nbytes]
        assert not (c.error is not None and len(held) < 32), (c.error, len(held))
    assert b"".join(bytes(x.buffer) for x in held) == b"".join(b"%02d" % i for i in range(32))
    assert pool.in_use == 32
    b.sendall(b"rest")
    if not c.error:
        take(port, lambda x: x is c)
    assert c.error is not None and c.error.errno in ENOBUFS and not c.more
    for x in held:
        x.release()
    r = port.recv(a, pool)
    take(port, lambda x: x is r)
    assert bytes(r.buffer) == b"rest"


@pytest.mark.skipif(not ON_LINUX or UNDER_ASAN,
                    reason="counts resident pages (Linux; ASan's quarantine keeps freed memory resident)")
def test_a_large_pool_keeps_reusing_few_buffers(port, sockpair):
    """A pool's memory becomes resident only for the buffers that
    received: receiving and giving back one at a time reuses a few of
    them (warm in the CPU's caches) rather than cycling through the
    whole pool (512 x 64 KiB here, 2 MiB of pages if each were touched)."""
    a, b = sockpair
    pool = fastiocp.BufferPool(64 * 1024, 512)
    port.register(a)
    c = port.recv(a, pool)
    b.sendall(b"warm")
    take(port, lambda x: x is c)
    c.release()
    before = rss_bytes()
    for i in range(600):
        c = port.recv(a, pool)
        b.sendall(b"x" * 100)
        take(port, lambda x: x is c)
        assert c.nbytes == 100
        c.release()
    assert rss_bytes() - before < 1024 * 1024


def test_multishot_recv_cancel_ends_it(port, sockpair):
    a, b = sockpair
    pool = fastiocp.BufferPool(64, 4)
    port.register(a)
    c = port.recv(a, pool, multishot=True)
    b.sendall(b"before")
    first = take(port, lambda x: x.nbytes > 0)[-1]
    assert first.more and bytes(first.buffer) == b"before"
    first.release()
    assert c.cancel() is True
    got = take(port, lambda x: x is c)
    assert got[-1].cancelled and not got[-1].more
    assert pool.in_use == 0


def test_multishot_recv_ends_with_enobufs_when_the_pool_runs_dry(port, sockpair):
    a, b = sockpair
    pool = fastiocp.BufferPool(16, 2)
    port.register(a)
    c = port.recv(a, pool, multishot=True)
    held = []
    sent = b"".join(b"%015d|" % i for i in range(8))  # 8 x 16 bytes
    received = bytearray()
    b.sendall(sent[:16])
    held += take(port, lambda x: x.nbytes > 0)
    b.sendall(sent[16:32])
    held += take(port, lambda x: x.nbytes > 0 or x is c)
    b.sendall(sent[32:])
    end = take(port, lambda x: x is c)
    for x in held + end:
        if x.nbytes:
            received += bytes(x.buffer)
    assert c.error is not None and c.error.errno in ENOBUFS and not c.more
    for x in held + end:
        x.release()
    # Nothing was lost: the rest is still in the socket.
    while len(received) < len(sent):
        r = port.recv(a, pool)
        take(port, lambda x: x is r)
        assert r.nbytes > 0
        received += bytes(r.buffer)
        r.release()
    assert received == sent


def test_multishot_and_timeout_or_plain_buffer_are_refused(port, sockpair):
    a, _ = sockpair
    port.register(a)
    pool = fastiocp.BufferPool(16, 1)
    with pytest.raises(ValueError, match="BufferPool"):
        port.recv(a, bytearray(16), multishot=True)
    with pytest.raises(ValueError, match="timeout"):
        port.recv(a, pool, multishot=True, timeout=1)
    with pytest.raises(ValueError, match="timeout"):
        port.accept(a, multishot=True, timeout=1)
    assert port.pending == 0


def test_pooled_receive_is_resubmitted_with_the_pool(port, sockpair):
    """resubmit() starts a finished pooled receive again: it takes a
    buffer of the pool again; its last buffer stays with its holder."""
    a, b = sockpair
    port.register(a)
    pool = fastiocp.BufferPool(16, 2)
    c = port.recv(a, pool)
    b.sendall(b"1")
    take(port, lambda x: x is c)
    first = c.buffer
    port.resubmit([c])
    assert c.buffer is pool and not c.done
    b.sendall(b"2")
    take(port, lambda x: x is c)
    assert bytes(first) == b"1" and bytes(c.buffer) == b"2"
    assert pool.in_use == 2
    first.release()
    c.release()
    assert pool.in_use == 0


def test_multishot_completions_cannot_be_resubmitted(port, sockpair):
    a, b = sockpair
    port.register(a)
    pool = fastiocp.BufferPool(16, 4)
    c = port.recv(a, pool, multishot=True)
    b.sendall(b"z")
    child = take(port, lambda x: x.nbytes > 0)[-1]
    with pytest.raises(ValueError, match="multishot"):
        port.resubmit([child])
    child.release()
    c.cancel()
    take(port, lambda x: x is c)
    with pytest.raises(ValueError, match="multishot"):
        port.resubmit([c])


def test_pool_serves_one_port_until_it_closes(backend, sockpair):
    a, b = sockpair
    pool = fastiocp.BufferPool(16, 2)
    with fastiocp.CompletionPort(backend=backend) as p1:
        p1.register(a)
        c = p1.recv(a, pool)
        b.sendall(b"1")
        take(p1, lambda x: x is c)
        with fastiocp.CompletionPort(backend=backend) as p2:
            p2.register(b)
            with pytest.raises(ValueError, match="another CompletionPort"):
                p2.recv(b, pool)
            assert p2.pending == 0
    # p1 is closed: c's buffer is still readable, and the pool is free. (A
    # fresh pair: on Windows a socket stays with its first port.)
    assert bytes(c.buffer) == b"1"
    client, server = loopback_tcp_pair()
    with fastiocp.CompletionPort(backend=backend) as p3:
        p3.register(server)
        r = p3.recv(server, pool)
        client.sendall(b"2")
        take(p3, lambda x: x is r)
        assert bytes(r.buffer) == b"2"
        r.release()
    c.release()
    assert pool.in_use == 0
    client.close()
    server.close()


def test_close_with_multishots_pending_and_buffers_held(backend):
    pool = fastiocp.BufferPool(64, 4)
    lsock = socket.create_server(("127.0.0.1", 0))
    client, server = loopback_tcp_pair()
    port = fastiocp.CompletionPort(backend=backend)
    port.register(server)
    port.register(lsock)
    r = port.recv(server, pool, multishot=True)
    acc = port.accept(lsock, multishot=True)
    client.sendall(b"held")
    held = take(port, lambda x: x.nbytes > 0)[-1]
    client.sendall(b"queued")  # may be queued, undelivered, at close
    time.sleep(0.05)
    port.close()
    assert r.done and acc.done and not r.more and not acc.more
    assert bytes(held.buffer) == b"held"
    held.release()
    del held
    gc.collect()
    assert pool.in_use == 0
    for s in (lsock, client, server):
        s.close()


def test_multishot_accept_takes_each_connection(port):
    lsock = socket.create_server(("127.0.0.1", 0), backlog=16)
    port.register(lsock, key="L")
    c = port.accept(lsock, context="acc", multishot=True)
    clients = [socket.create_connection(lsock.getsockname()) for _ in range(5)]
    accepted = []
    while len(accepted) < 5:
        got = take(port, lambda x: True)[0]
        assert got is not c and got.more and got.error is None, got.error
        assert (got.key, got.context, got.op) == ("L", "acc", "accept")
        accepted.append(got.result())
    peers = sorted(addr for _, addr in accepted)
    assert peers == sorted(cl.getsockname() for cl in clients)
    for sock, addr in accepted:
        sock.sendall(b"hi")
    for cl in clients:
        assert cl.recv(2) == b"hi"
    assert c.cancel() is True
    end = take(port, lambda x: x is c)
    assert end[-1].cancelled and not end[-1].more
    for extra in end[:-1]:  # a connection that raced the cancel
        extra.result()[0].close()
    for sock, _ in accepted:
        sock.close()
    for cl in clients:
        cl.close()
    lsock.close()


def test_zerocopy_send_sends_every_byte(port, tcp_pair):
    client, server = tcp_pair
    port.register(client)
    data = bytes(range(256)) * 4096  # 1 MiB
    received = bytearray()

    def reader():
        while len(received) < len(data):
            chunk = server.recv(1 << 16)
            if not chunk:
                break
            received.extend(chunk)

    t = threading.Thread(target=reader)
    t.start()
    view = memoryview(data)
    while view:
        c = port.send(client, view, zerocopy=True)
        take(port, lambda x: x is c)
        assert c.error is None and c.nbytes > 0
        view = view[c.nbytes:]
    t.join(10)
    assert bytes(received) == data


def test_multishot_results_reach_many_threads_exactly_once(port, sockpair):
    """Children and their final result dequeued by four threads at once:
    every byte once, none after the final (the parent stays alive for
    children finished after it)."""
    a, b = sockpair
    pool = fastiocp.BufferPool(4096, 256)  # never runs dry here
    port.register(a)
    c = port.recv(a, pool, multishot=True)
    total = 200_000 if not ON_WINDOWS else 20_000
    counts = []
    lock = threading.Lock()

    def worker():
        n = 0
        while True:
            got = port.get(timeout=10)
            if got is None:
                break
            n += got.nbytes
            got.release()
            if got is c:
                port.post(key="stop")
                port.post(key="stop")
                port.post(key="stop")
                break
            if got.key == "stop":
                break
        with lock:
            counts.append(n)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    payload = b"y" * total
    view = memoryview(payload)
    while view:
        n = b.send(view[:8192])
        view = view[n:]
    b.close()
    for t in threads:
        t.join(30)
    assert sum(counts) == total
    assert not c.more and c.error is None
    gc.collect()
    assert pool.in_use == 0
