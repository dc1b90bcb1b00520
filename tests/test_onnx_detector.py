"""The example detector (tiny config) exported to ONNX and run in onnxruntime.

One export through the command line (``python -m examples.deformable_detr.export``), then:
raw per-query logits and boxes against eager PyTorch within 1e-4 at other batch and image
sizes, the post-processed detections, and ``predict --backend onnxruntime``.
"""

from __future__ import annotations


import pytest
import torch

pytest.importorskip("onnxruntime")

from examples.deformable_detr import export as export_cli  # noqa: E402
from examples.deformable_detr import predict as predict_cli  # noqa: E402
from examples.deformable_detr.api import Detector  # noqa: E402
from detector_cases import PREDICT_ARGS, assert_same_detections, images, saved_images, tiny_detector  # noqa: E402

ATOL = 1e-4
PREDICT_SIZE = dict(short_side=96, max_size=160)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(eager model, checkpoint path, ONNX path)."""
    directory = tmp_path_factory.mktemp("detector")
    model, checkpoint = tiny_detector(directory)
    onnx_path = str(directory / "tiny.onnx")
    status = export_cli.main([checkpoint, "--format", "onnx", "--output", onnx_path, "--height", "96", "--width", "128"])
    assert status == 0
    return model, checkpoint, onnx_path


@pytest.mark.parametrize("batch,height,width", [(1, 96, 128), (2, 80, 144), (3, 130, 70)])
def test_raw_outputs_match_eager(exported, batch, height, width):
    model, _, onnx_path = exported
    runner = export_cli.load_exported(onnx_path, "onnxruntime")
    diffs = export_cli.compare_with_eager(model, runner, *export_cli.example_inputs(height, width, batch))
    assert max(diffs.values()) <= ATOL, diffs


def test_detections_match_eager(exported):
    model, _, onnx_path = exported
    eager = Detector(model, **PREDICT_SIZE)
    onnx_detector = export_cli.exported_detector(onnx_path, "onnxruntime", **PREDICT_SIZE)
    want = eager.predict(images(1), threshold=0.0)
    got = onnx_detector.predict(images(1), threshold=0.0)
    for g, w in zip(got, want):
        # scores and boxes per rank; near-ties may swap ranks, so compare the sorted scores and
        # each detection's box by (label, score) match only where scores are clearly apart
        torch.testing.assert_close(g["scores"], w["scores"], atol=ATOL, rtol=0)
        apart = torch.ones_like(w["scores"], dtype=torch.bool)
        apart[1:] &= (w["scores"][:-1] - w["scores"][1:]) > 10 * ATOL
        apart[:-1] &= (w["scores"][:-1] - w["scores"][1:]) > 10 * ATOL
        assert torch.equal(g["labels"][apart], w["labels"][apart])
        torch.testing.assert_close(g["boxes"][apart], w["boxes"][apart], atol=1e-2, rtol=1e-4)  # pixels


def test_predict_command_with_onnxruntime(exported, tmp_path):
    model, checkpoint, onnx_path = exported
    paths = saved_images(tmp_path, 2)
    onnx_args = [onnx_path, *paths, "--backend", "onnxruntime", "--output-dir", str(tmp_path / "onnx"), *PREDICT_ARGS]
    assert predict_cli.main(onnx_args) == 0
    torch_args = [checkpoint, *paths, "--device", "cpu", "--output-dir", str(tmp_path / "torch"), *PREDICT_ARGS]
    assert predict_cli.main(torch_args) == 0
    assert_same_detections(tmp_path / "onnx", tmp_path / "torch", len(paths), ATOL)


def test_predict_refuses_autocast_with_exported_file(exported, tmp_path, capsys):
    _, _, onnx_path = exported
    path = str(tmp_path / "img.png")
    images(3)[0].save(path)
    status = predict_cli.main([onnx_path, path, "--backend", "onnxruntime", "--autocast", "float16", "--output-dir", str(tmp_path)])
    assert status == 2 and "autocast" in capsys.readouterr().err
