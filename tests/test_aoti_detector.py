"""The example detector (tiny config) as an AOTInductor package, run in fresh processes.

One export through the command line (``python -m examples.deformable_detr.export CKPT --format
aoti --quick-compile``: dynamic batch and image size, unoptimised kernels so that it compiles in
about a minute), then in new Python processes: the raw per-query logits and boxes against eager
PyTorch within 1e-4 at the export size and two others, and ``predict`` on the package against
``predict`` on the checkpoint: the package carries the checkpoint's image size rule and class names
(the demo's 128/213 and shape names), so the two agree with no option given.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from examples.deformable_detr import export as export_cli
from examples.deformable_detr import predict as predict_cli
from examples.deformable_detr.inference_settings import from_metadata
from detector_cases import CLASS_NAMES, PREDICT_ARGS, assert_same_detections, saved_images, tiny_detector

pytestmark = pytest.mark.slow

ATOL = 1e-4
SIZES = [(1, 96, 128), (2, 80, 144), (3, 130, 70)]  # (batch, height, width): the export size, then others
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def package(tmp_path_factory):
    """(eager model, checkpoint path, package path)."""
    directory = tmp_path_factory.mktemp("aoti_detector")
    model, checkpoint = tiny_detector(directory)
    path = str(directory / "tiny.pt2")
    argv = [checkpoint, "--format", "aoti", "--quick-compile", "--output", path, "--height", "96", "--width", "128",
            "--no-check"]
    assert export_cli.main(argv) == 0
    return model, checkpoint, path


def run_fresh(args: list[str]) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    # this process's import path (msda built in place or installed; the repository for examples/)
    env["PYTHONPATH"] = os.pathsep.join([REPO, *(p for p in sys.path if p)])
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, timeout=600, cwd=REPO)


RAW_OUTPUTS = """
    import sys
    import torch
    from examples.deformable_detr import export
    model = export.load_exported(sys.argv[1])  # .pt2: aoti; imports msda (examples' modules), then the package
    with torch.no_grad():
        outputs = [model(*export.example_inputs(h, w, b)) for b, h, w in {sizes}]
    torch.save({{"outputs": outputs, "metadata": model.metadata}}, sys.argv[2])
"""


def test_raw_outputs_in_fresh_process_match_eager(package, tmp_path):
    model, _, path = package
    out_path = str(tmp_path / "outputs.pt")
    done = run_fresh(["-c", textwrap.dedent(RAW_OUTPUTS.format(sizes=SIZES)), path, out_path])
    assert done.returncode == 0, done.stderr[-3000:]
    saved = torch.load(out_path)
    got = saved["outputs"]
    settings = from_metadata(saved["metadata"])
    assert (settings.short_side, settings.max_size, list(settings.class_names)) == (128, 213, CLASS_NAMES)
    with torch.no_grad():
        for (batch, height, width), outputs in zip(SIZES, got):
            want = model(*export_cli.example_inputs(height, width, batch))
            for key in export_cli.OUTPUT_NAMES:
                assert outputs[key].shape == want[key].shape
                torch.testing.assert_close(outputs[key], want[key], atol=ATOL, rtol=0, msg=f"{key} at {height}x{width}")


def test_predict_command_with_aoti(package, tmp_path):
    _, checkpoint, path = package
    paths = saved_images(tmp_path, 2)
    module = "examples.deformable_detr.predict"
    # no --backend: .pt2 is an AOTInductor package; no size or names: the ones it records
    done = run_fresh(["-m", module, path, *paths, "--output-dir", str(tmp_path / "aoti"), *PREDICT_ARGS])
    assert done.returncode == 0 and "note:" not in done.stderr, done.stderr[-3000:]
    torch_args = [checkpoint, *paths, "--device", "cpu", "--output-dir", str(tmp_path / "torch"), *PREDICT_ARGS]
    assert predict_cli.main(torch_args) == 0
    assert_same_detections(tmp_path / "aoti", tmp_path / "torch", len(paths), ATOL)
