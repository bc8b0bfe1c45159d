"""The host cache (cpp/include/normengine/host_cache.h): the ops' CPU outputs of 8 MiB or more come
from cached, faulted-in blocks that go back to the cache when the tensor is freed. Values, reuse, the
fit rule, the limit, threads, fork, and the tensors' behaviour as ordinary torch tensors."""

import io
import multiprocessing
import os
import pickle
import subprocess
import sys
import threading

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import normengine as ne
from normengine import _C, errors
from conftest import rel_err

MiB = 1 << 20
ROWS, COLS = 8192, 1024  # float32: 32 MiB
SMALLEST = 8 * MiB  # the smallest output the cache serves


@pytest.fixture
def limit():
    """Restores the cache's limit after a test that changes it."""
    before = ne.cache_info()["limit_bytes"]
    yield
    ne.set_cache_limit(before)


def test_large_outputs_come_from_the_cache_and_are_reused():
    x = torch.randn(ROWS, COLS)
    s0 = ne.cache_info()
    y = ne.ops.layer_norm(x)
    assert ne.cache_info()["in_use_bytes"] == s0["in_use_bytes"] + 32 * MiB
    assert rel_err(y, F.layer_norm(x, (COLS,))) <= 1e-5
    ptr = y.data_ptr()
    del y
    assert ne.cache_info()["in_use_bytes"] == s0["in_use_bytes"]
    s1 = ne.cache_info()
    y2 = ne.ops.rms_norm(x * 3 + 1)
    assert y2.data_ptr() == ptr and ne.cache_info()["hits"] == s1["hits"] + 1
    assert rel_err(y2, F.rms_norm(x * 3 + 1, (COLS,), eps=1e-6)) <= 1e-5  # nothing stale left in the block


def test_outputs_below_8_mib_do_not_touch_the_cache():
    s0 = ne.cache_info()
    y = ne.ops.layer_norm(torch.randn(SMALLEST // (4 * COLS) - 1, COLS))  # one row short
    s1 = ne.cache_info()
    assert (s1["hits"], s1["misses"], s1["in_use_bytes"]) == (s0["hits"], s0["misses"], s0["in_use_bytes"])
    z = ne.ops.layer_norm(torch.randn(SMALLEST // (4 * COLS), COLS))  # exactly the smallest
    assert ne.cache_info()["in_use_bytes"] == s0["in_use_bytes"] + SMALLEST
    del y, z


def test_cached_outputs_in_autograd():
    x = torch.randn(ROWS, COLS, requires_grad=True)
    r = torch.randn(ROWS, COLS, requires_grad=True)
    w = torch.randn(COLS, requires_grad=True)
    g = torch.randn(ROWS, COLS)
    y, h = ne.ops.add_layer_norm(x, r, w)
    (y * g).sum().backward()
    grads = [t.grad.clone() for t in (x, r, w)]
    for t in (x, r, w):
        t.grad = None
    (F.layer_norm(x + r, (COLS,), w) * g).sum().backward()
    for got, t in zip(grads, (x, r, w)):
        assert rel_err(got, t.grad) <= 1e-4
    assert torch.equal(h, (x + r).detach())


def test_fit_rule():
    # sizes round up to 2 MiB; a block is reused for a request it holds with at most a quarter to spare
    ne.empty_cache()
    b = _C.HostBuffer(64 * MiB)
    big = b.address
    del b
    small = _C.HostBuffer(40 * MiB)
    assert small.address != big and small.capacity == 40 * MiB
    fits = _C.HostBuffer(52 * MiB)  # 64 - 52 = 12 <= 13: the 64 MiB block
    assert fits.address == big and fits.capacity == 64 * MiB
    odd = _C.HostBuffer(3)
    assert odd.capacity == 2 * MiB and odd.address % (2 * MiB) == 0
    del small, fits, odd


def test_limit_and_empty_cache(limit):
    ne.empty_cache()
    ne.set_cache_limit(40 * MiB)
    bufs = [_C.HostBuffer(32 * MiB) for _ in range(3)]
    del bufs
    info = ne.cache_info()
    assert info["cached_bytes"] == 32 * MiB and info["limit_bytes"] == 40 * MiB  # the other two unmapped
    ne.set_cache_limit(0)
    assert ne.cache_info()["cached_bytes"] == 0
    s0 = ne.cache_info()
    x = torch.randn(ROWS, COLS)
    y = ne.ops.layer_norm(x)  # the cache off: torch.empty
    assert ne.cache_info() == s0 and rel_err(y, F.layer_norm(x, (COLS,))) <= 1e-5
    del y
    buf = _C.HostBuffer(ROWS)  # the cache itself still serves, caching nothing
    del buf
    assert ne.cache_info()["cached_bytes"] == 0
    ne.set_cache_limit(1 << 30)
    y = ne.ops.layer_norm(torch.randn(ROWS, COLS))
    del y
    assert ne.empty_cache() == 32 * MiB and ne.cache_info()["cached_bytes"] == 0


def test_environment_sets_the_limit():
    code = "import normengine as ne; print(ne.cache_info()['limit_bytes'])"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for mb in ("0", "96"):
        out = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, NORMENGINE_CPU_CACHE_MB=mb),
                             capture_output=True, text=True, cwd=root)
        assert out.returncode == 0, out.stderr
        assert int(out.stdout) == int(mb) * MiB


def test_threads_get_disjoint_blocks():
    errors_seen = []

    def work(k):
        try:
            for i in range(12):
                t = torch.frombuffer(_C.HostBuffer((32 + 2 * ((k + i) % 5)) * MiB), dtype=torch.int32)
                t[::4096].fill_(k)
                if not bool((t[::4096] == k).all()):
                    errors_seen.append(f"thread {k}: block shared with another thread")
                del t
        except Exception as e:  # pragma: no cover - reported below
            errors_seen.append(repr(e))

    s0 = ne.cache_info()["in_use_bytes"]
    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors_seen, errors_seen
    assert ne.cache_info()["in_use_bytes"] == s0


def _child(q):
    # numpy input: torch's own OpenMP pool is not fork-safe (a torch op on a large tensor in a forked child
    # of a process that has used it hangs); normengine's pool is remade in the child (core/parallel.cpp)
    x = torch.from_numpy(np.tile(np.arange(COLS, dtype=np.float32), (ROWS, 1)))
    y = ne.ops.layer_norm(x)
    q.put((float(y[5, 1]), ne.cache_info()["misses"] + ne.cache_info()["hits"]))


@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork")
def test_forked_child_runs_threaded_ops():
    """A child forked after the ops have run (a fork-started DataLoader worker) gets a thread pool and a
    cache of its own; the parent's cached block is inherited and usable."""
    y = ne.ops.layer_norm(torch.randn(ROWS, COLS))
    del y  # a cached block the child inherits
    s0 = ne.cache_info()
    ctx = multiprocessing.get_context("fork")
    q = ctx.Queue()
    p = ctx.Process(target=_child, args=(q,))
    p.start()
    got, requests = q.get(timeout=60)
    p.join(60)
    assert p.exitcode == 0 and requests == s0["misses"] + s0["hits"] + 1
    want = F.layer_norm(torch.arange(COLS, dtype=torch.float32)[None], (COLS,))[0, 1].item()
    assert abs(got - want) <= 1e-5


def test_cached_tensors_behave_as_tensors():
    y = ne.ops.layer_norm(torch.randn(ROWS, COLS))
    assert y.is_contiguous() and y._base is None and y.shape == (ROWS, COLS)
    assert torch.equal(pickle.loads(pickle.dumps(y)), y)
    buf = io.BytesIO()
    torch.save(y, buf)
    buf.seek(0)
    assert torch.equal(torch.load(buf), y)
    assert torch.equal(torch.from_numpy(y.numpy()), y)
    z = y.clone().share_memory_()
    assert z.is_shared() and torch.equal(z, y)
    with pytest.raises(RuntimeError, match="not resizable"):  # as torch.from_numpy's tensors
        y.resize_(ROWS + 1, COLS)
    del y, z


def test_bad_arguments():
    with pytest.raises(errors.ArgumentError, match="nbytes"):
        _C.HostBuffer(-1)
    with pytest.raises(errors.ArgumentError, match="nbytes"):
        ne.set_cache_limit("1G")
    for bad in (-5, 2**70):
        with pytest.raises(errors.ArgumentError, match="nbytes"):
            ne.set_cache_limit(bad)
    with pytest.raises(errors.ArgumentError, match="limit"):
        _C.host_cache_set_limit(-5)


def test_concurrent_ops_on_cached_outputs():
    """Threads running large ops at once (each one's output from the cache, blocks going back and forth
    between them): every result right."""
    xs = [torch.randn(ROWS, COLS) for _ in range(3)]
    wants = [F.layer_norm(x, (COLS,)) for x in xs]
    failures = []

    def work(i):
        for _ in range(4):
            y = ne.ops.layer_norm(xs[i])
            if rel_err(y, wants[i]) > 1e-5:
                failures.append(i)
            del y

    threads = [threading.Thread(target=work, args=(i,)) for i in range(3)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not failures
