"""More than 2**31 value elements are indexed correctly (64-bit offsets).

value is (2, 2**27, 1, 17) bfloat16: 4.6e9 elements, 9.1 GB of address space
from one torch.empty, of which only the sampled rows are ever written, so
its untouched pages cost no memory. Both the offset of batch 1
((n*S*M + m)*D = 2.3e9) and the offset of the last rows within a batch pass
2**31, so a 32-bit truncation of either reads the wrong row (or faults).

The forwards run in every test run, each in a subprocess whose memory is
capped: address space at value's size plus 6 GiB (torch's own mappings), and
its peak resident memory must stay under MAX_RSS_MB. The backwards must fill
an 18 GB float32 grad_value, so they run only with MSDA_TEST_LARGE=1.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
H, W, D = 2**15, 2**12, 17  # powers of two: the pixel centres below are exact
S = H * W
VALUE_BYTES = 2 * S * D * 2
MAX_RSS_MB = 1500  # torch itself is about 400 MB; a copy of value would be 9 GB
large = pytest.mark.skipif(os.environ.get("MSDA_TEST_LARGE") != "1",
                           reason="set MSDA_TEST_LARGE=1 (the backward writes an 18 GB grad_value)")

# The script run in the subprocess: builds the problem, runs forward (and
# backward with "backward" in argv) through the op named in argv, prints JSON.
SCRIPT = textwrap.dedent(
    """
    import json, resource, sys
    import torch
    H, W, D, op_name, with_backward = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5] == "1"
    S = H * W
    value = torch.empty(2, S, 1, D, dtype=torch.bfloat16)  # untouched pages: no memory
    marks = torch.arange(1, D + 1, dtype=torch.bfloat16)
    # (row, pixel x, pixel y) sampled: first pixel, first pixel of the last row, last pixel.
    pixels = [(0, 0, 0), (S - W, 0, H - 1), (S - 1, W - 1, H - 1)]
    for n in range(2):
        for i, (row, _, _) in enumerate(pixels):
            value[n, row, 0] = marks * (3 * n + i + 1)
    loc = torch.tensor([[(x + 0.5) / W, (y + 0.5) / H] for _, x, y in pixels], dtype=torch.float32)
    assert torch.equal(loc[:, 0] * W - 0.5, torch.tensor([float(x) for _, x, _ in pixels]))  # exact centres
    loc = loc.view(1, 3, 1, 1, 1, 2).expand(2, 3, 1, 1, 1, 2).contiguous()
    attn = torch.ones(2, 3, 1, 1, 1, dtype=torch.float32)
    shapes, starts = torch.tensor([[H, W]]), torch.tensor([0])
    if op_name == "cpu":
        import msda
        forward = lambda *a: torch.ops.msda.ms_deform_attn_forward(*a)
        backward = lambda *a: torch.ops.msda.ms_deform_attn_backward(*a)
    else:
        sys.path.insert(0, op_name)
        from build import load_emulation
        emu = load_emulation()
        forward, backward = emu.forward, emu.backward
    out = forward(value, shapes, starts, loc, attn)
    want = torch.stack([torch.stack([marks * (3 * n + i + 1) for i in range(3)]) for n in range(2)])
    result = {"forward_exact": bool(torch.equal(out, want))}
    if with_backward:
        grad_value, _, _ = backward(value, shapes, starts, loc, attn, torch.ones_like(out))
        rows = [row for row, _, _ in pixels]
        result["backward_exact"] = bool(grad_value[:, rows, 0].eq(1).all() and grad_value.float().sum() == 2 * 3 * D)
    result["max_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(result))
    """
)


def run_capped(op: str, backward: bool) -> dict:
    limit = None if backward else VALUE_BYTES + (6 << 30)

    def cap():
        import resource

        if limit is not None:
            resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(H), str(W), str(D), op, "1" if backward else "0"],
        capture_output=True, text=True, preexec_fn=cap, timeout=1800, cwd=HERE,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


OPS = {"cpu": "cpu", "emulated-cuda": os.path.join(HERE, "cuda_emulation")}


def test_problem_passes_2_31_in_both_offsets():
    assert S * D > 2**31 and 2 * S * D > 2**32


@pytest.mark.parametrize("op", OPS)
def test_forward_with_more_than_2_31_elements(op):
    result = run_capped(OPS[op], backward=False)
    assert result["forward_exact"]
    assert result["max_rss_mb"] < MAX_RSS_MB, f"peak resident memory {result['max_rss_mb']:.0f} MB"


@large
@pytest.mark.parametrize("op", OPS)
def test_backward_with_more_than_2_31_elements(op):
    result = run_capped(OPS[op], backward=True)
    assert result["forward_exact"] and result["backward_exact"]


@large
def test_autograd_with_more_than_2_31_elements():
    # Through msda.ms_deform_attn and autograd, in bfloat16 with S * D > 2**31.
    import msda

    H1, W1, D1 = 2**15, 2**12 + 64, 17
    S1 = H1 * W1
    assert S1 * D1 > 2**31
    value = torch.zeros(1, S1, 1, D1, dtype=torch.bfloat16)
    marks = torch.arange(1, D1 + 1, dtype=torch.bfloat16)
    value[0, S1 - 1, 0] = marks  # last pixel
    value[0, S1 - W1, 0] = 2 * marks  # first pixel of the last row
    loc = torch.tensor([[(W1 - 0.5) / W1, (H1 - 0.5) / H1], [0.5 / W1, (H1 - 0.5) / H1]], dtype=torch.float32)
    loc = loc.view(1, 2, 1, 1, 1, 2)
    attn = torch.ones(1, 2, 1, 1, 1, dtype=torch.float32)
    value.requires_grad_()
    out = msda.ms_deform_attn(value, torch.tensor([[H1, W1]]), torch.tensor([0]), loc, attn)
    assert torch.equal(out[0, 0], marks) and torch.equal(out[0, 1], 2 * marks)
    out.sum().backward()
    assert value.grad[0, S1 - 1, 0].eq(1).all() and value.grad[0, S1 - W1, 0].eq(1).all()
    assert value.grad.float().sum().item() == 2 * D1
