"""AOTInductor: a package of one MSDeformAttn layer, loaded in a fresh process.

The package calls msda's kernel through the dispatcher (``msda::ms_deform_attn_forward``), so
the loading process must have msda's ops registered: with ``import msda`` it gives the eager
output; without it, loading or calling fails (what a C++ deployment must reproduce by loading
msda's op library).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

import msda
from cases import level_tables

SHAPES = [(6, 4), (3, 2)]


def layer_inputs(N: int, Lq: int, seed: int) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(seed)
    spatial_shapes, starts = level_tables(SHAPES)
    S = int((spatial_shapes[:, 0] * spatial_shapes[:, 1]).sum())
    return (
        torch.randn(N, Lq, 16, generator=gen),
        torch.rand(N, Lq, len(SHAPES), 2, generator=gen),
        torch.randn(N, S, 16, generator=gen),
        spatial_shapes,
        starts,
    )


@pytest.fixture(scope="module")
def package(tmp_path_factory) -> tuple[str, str]:
    """(package path, path of saved inputs and eager outputs at two batch/query sizes)."""
    torch.manual_seed(0)
    layer = msda.MSDeformAttn(d_model=16, n_levels=2, n_heads=2, n_points=2).eval()
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    directory = tmp_path_factory.mktemp("aoti")
    batch, queries = torch.export.Dim("batch"), torch.export.Dim("queries")
    dynamic = ({0: batch, 1: queries}, {0: batch, 1: queries}, {0: batch}, None, None)
    with torch.no_grad():
        program = torch.export.export(layer, layer_inputs(2, 5, 0), dynamic_shapes=dynamic)
        assert torch.ops.msda.ms_deform_attn_forward.default in {n.target for n in program.graph.nodes}
        path = torch._inductor.aoti_compile_and_package(
            program,
            package_path=str(directory / "layer.pt2"),
            # the fastest compile: this checks the path, not the generated code's speed
            inductor_configs={"aot_inductor.compile_wrapper_opt_level": "O0"},
        )
        cases = [layer_inputs(2, 5, 1), layer_inputs(3, 9, 2)]
        expected = [layer(*args) for args in cases]
    io_path = str(directory / "io.pt")
    torch.save({"cases": cases, "expected": expected}, io_path)
    return path, io_path


def run_fresh(code: str, *argv: str) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    # the repository's src/ and tests/ as this process sees them (msda built in place or installed)
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), *argv], capture_output=True, text=True, env=env, timeout=300
    )


LOAD_AND_RUN = """
    import sys
    import torch
    {import_msda}
    data = torch.load(sys.argv[2])
    runner = torch._inductor.aoti_load_package(sys.argv[1])
    with torch.no_grad():
        for args, want in zip(data["cases"], data["expected"]):
            got = runner(*args)
            print((got - want).abs().max().item())
"""


def test_package_in_fresh_process_matches_eager(package):
    result = run_fresh(LOAD_AND_RUN.format(import_msda="import msda"), *package)
    assert result.returncode == 0, result.stderr[-3000:]
    diffs = [float(line) for line in result.stdout.split()]
    assert len(diffs) == 2 and max(diffs) <= 1e-5, diffs


def test_package_needs_msda_ops_registered(package):
    # without msda's ops the package cannot run: the deployment must load them first
    result = run_fresh(LOAD_AND_RUN.format(import_msda=""), *package)
    assert result.returncode != 0
    assert "msda" in result.stderr
