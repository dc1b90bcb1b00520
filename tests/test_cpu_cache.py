"""The CPU output cache (csrc/cpu/output_cache.h, msda.cpu_cache): large
outputs reuse blocks that earlier outputs gave back, and nothing else changes.

The shapes here are chosen so that the output and every gradient are at least
1 MiB (smaller ones are not cached). The junk tests are the ones that matter
most: a reused block still holds whatever its last tensor held, so every
element the kernels return must be written by this call.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading

import pytest
import torch

import msda
import msda.cpu_cache as cpu_cache
from cases import make_case, run_op

pytestmark = pytest.mark.skipif(not msda._extension.AVAILABLE, reason="the cache belongs to the compiled extension")

MIB = 1 << 20
# Output 2048 x 256 float32 = 2 MiB; value 64x64 + 32x32 = 5120 rows x 256 = 5 MiB;
# locations 2048 x 8 x 2 x 4 x 2 float32 = 1 MiB.
LARGE = dict(N=1, Lq=2048, M=8, D=32, shapes=[(64, 64), (32, 32)], P=4)
# The same in a decoder's proportions (few samples per row of value): the
# backward's in-place path instead of per-head copies.
LARGE_DECODER = dict(N=1, Lq=512, M=8, D=32, shapes=[(96, 96), (48, 48)], P=4)


@pytest.fixture(autouse=True)
def default_limit():
    previous = cpu_cache.set_limit(256)
    cpu_cache.release()
    yield
    cpu_cache.set_limit(previous)
    cpu_cache.release()


def _case(problem, dtype=torch.float32, seed=3):
    return make_case(**problem, seed=seed, value_dtype=dtype)


def _forward(case):
    with torch.no_grad():
        return msda.ms_deform_attn(case.value, case.spatial_shapes, case.level_start_index,
                                   case.sampling_locations, case.attention_weights)


def test_a_released_output_is_reused():
    case = _case(LARGE)
    first = _forward(case)
    address = first.data_ptr()
    assert first.numel() * first.element_size() >= MIB
    before = cpu_cache.stats()
    del first
    assert cpu_cache.stats().idle_blocks == before.idle_blocks + 1
    second = _forward(case)
    after = cpu_cache.stats()
    assert second.data_ptr() == address
    assert after.reuses == before.reuses + 1
    assert after.fresh_blocks == before.fresh_blocks


def test_small_outputs_are_not_cached():
    case = _case(dict(N=1, Lq=30, M=2, D=8, shapes=[(6, 5)], P=2))
    before = cpu_cache.stats()
    del_me = _forward(case)
    del del_me
    after = cpu_cache.stats()
    assert (after.idle_blocks, after.fresh_blocks, after.reuses) == (
        before.idle_blocks, before.fresh_blocks, before.reuses)


@pytest.mark.parametrize("problem", [LARGE, LARGE_DECODER], ids=["encoder-like", "decoder-like"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_junk_in_reused_blocks_never_reaches_the_results(problem, dtype):
    case = _case(problem, dtype)
    cpu_cache.set_limit(0)  # the results from fresh memory only
    want_out, want_grads = run_op(msda.ms_deform_attn, case)
    cpu_cache.set_limit(256)
    for junk in (float("nan"), 1e30):
        out, grads = run_op(msda.ms_deform_attn, case)
        # Fill everything this call returned with junk, then give it back.
        large = 0
        for t in (out, *grads):
            t.fill_(junk)
            large += t.numel() * t.element_size() >= MIB
        del out, grads, t
        assert large >= 1
        assert cpu_cache.stats().idle_blocks >= large  # each large result went back to the cache
        reuses = cpu_cache.stats().reuses
        out, grads = run_op(msda.ms_deform_attn, case)
        assert cpu_cache.stats().reuses > reuses
        assert torch.equal(out, want_out)
        for got, want in zip(grads, want_grads):
            assert torch.equal(got, want)


def test_the_limit_bounds_the_idle_blocks_oldest_out_first():
    case = _case(LARGE)
    outs = [_forward(case) for _ in range(4)]
    block = outs[0].numel() * outs[0].element_size()
    addresses = [o.data_ptr() for o in outs]
    cpu_cache.set_limit(2.5 * block / MIB)  # room for two blocks
    for i in range(len(outs)):  # released in order: 0 is the oldest idle block
        outs[i] = None
    stats = cpu_cache.stats()
    assert stats.idle_blocks == 2
    assert stats.idle_bytes <= stats.limit_bytes
    # The two released last are kept: the next two outputs are those.
    assert _forward(case).data_ptr() in addresses[2:]
    assert cpu_cache.release() > 0
    assert cpu_cache.stats().idle_bytes == 0


def test_limit_zero_turns_caching_off():
    case = _case(LARGE)
    assert cpu_cache.set_limit(0) == 256
    out = _forward(case)
    del out
    assert cpu_cache.stats().idle_bytes == 0
    assert cpu_cache.release() == 0


@pytest.mark.parametrize("bad", [-1, float("nan"), "64"])
def test_set_limit_refuses_what_is_not_a_size(bad):
    with pytest.raises((ValueError, TypeError)):
        cpu_cache.set_limit(bad)


def test_concurrent_callers_get_their_own_blocks():
    # Threads that allocate and free outputs of two sizes at once: every
    # result stays right (a block handed to two tensors would mix them).
    cases = [_case(LARGE, seed=s) for s in (1, 2)] + [_case(LARGE_DECODER, seed=3)]
    want = [_forward(c) for c in cases]
    errors: list[str] = []

    def work(k: int) -> None:
        for i in range(6):
            j = (k + i) % len(cases)
            got = _forward(cases[j])
            if not torch.equal(got, want[j]):
                errors.append(f"thread {k} round {i}: case {j} differs")

    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []


@pytest.mark.parametrize(
    "setting, want_mib",
    # Unset, a fraction, and a value that is not a size (each needs a fresh process).
    [("", 256), ("1.5", 1.5), ("lots", 0)],
)
def test_environment_sets_the_limit(setting, want_mib):
    code = "import msda.cpu_cache as c; print(c.stats().limit_bytes)"
    env = dict(os.environ, MSDA_CPU_CACHE_MB=setting)
    got = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert int(got.stdout.strip()) == int(want_mib * MIB)
    # A value that turned the cache off without meaning to is named in a warning.
    assert ("MSDA_CPU_CACHE_MB='lots' is not a size" in got.stderr) == (setting == "lots")


def test_a_forked_child_can_allocate():
    # fork() while the parent holds blocks: the child's copy of the cache works.
    import multiprocessing

    case = _case(LARGE)
    kept = _forward(case)
    del kept  # one idle block, inherited by the child
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(1) as pool:
        ok = pool.apply(_child_forward_matches, (case.value, case.spatial_shapes, case.level_start_index,
                                                 case.sampling_locations, case.attention_weights))
    assert ok


def _child_forward_matches(value, shapes, starts, loc, attn) -> bool:
    # One thread, as DataLoader workers run: OpenMP's thread pool does not
    # survive fork() (a forked child that starts a parallel region hangs,
    # with or without msda's cache).
    torch.set_num_threads(1)
    first = msda.ms_deform_attn(value, shapes, starts, loc, attn)
    want = first.clone()
    del first
    return torch.equal(msda.ms_deform_attn(value, shapes, starts, loc, attn), want)


def test_torch_profiler_still_sees_large_outputs():
    case = _case(LARGE)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        out = _forward(case)
    allocated = sum(e.cpu_memory_usage for e in prof.events() if e.name == "msda::ms_deform_attn_forward")
    assert allocated >= out.numel() * out.element_size()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int64])
def test_empty_takes_large_blocks_from_the_cache(dtype):
    size = (1024, 300)  # 1.2 MiB at 4 bytes, 600 KiB at 2: cached or not by bytes
    t = cpu_cache.empty(size, dtype)
    assert t.shape == size and t.dtype == dtype and t.is_contiguous() and t.device.type == "cpu"
    cached = t.numel() * t.element_size() >= MIB
    address, before = t.data_ptr(), cpu_cache.stats()
    del t
    assert cpu_cache.stats().idle_blocks == before.idle_blocks + cached
    again = cpu_cache.empty(list(size), dtype)
    if cached:
        assert again.data_ptr() == address
    assert cpu_cache.stats().reuses == before.reuses + cached
    # Every element is writable: a sum written into it equals the plain sum.
    a, b = torch.arange(again.numel()).view(size).to(dtype), torch.ones(size, dtype=dtype)
    assert torch.equal(torch.add(a, b, out=again), a + b)


def test_empty_refuses_a_negative_size():
    with pytest.raises(RuntimeError, match=r"size\[1\] must be >= 0, got -2"):
        cpu_cache.empty((4, -2))
