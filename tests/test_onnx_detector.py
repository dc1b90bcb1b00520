"""The example detector (tiny config) exported to ONNX and run in onnxruntime.

One export through the command line (``python -m examples.deformable_detr.export``), then:
raw per-query logits and boxes against eager PyTorch within 1e-4 at other batch and image
sizes, the post-processed detections, and ``predict`` on the ONNX file against ``predict`` on the
checkpoint: the file carries the checkpoint's image size rule and class names (the demo's 128/213
and shape names), so the two give the same detections with no option given.
"""

from __future__ import annotations


import pytest
import torch

pytest.importorskip("onnxruntime")

from examples.deformable_detr import export as export_cli  # noqa: E402
from examples.deformable_detr import predict as predict_cli  # noqa: E402
from examples.deformable_detr.api import Detector  # noqa: E402
from examples.deformable_detr.inference_settings import PREFIX  # noqa: E402
from detector_cases import (  # noqa: E402
    CLASS_NAMES,
    DEMO_SETTINGS,
    PREDICT_ARGS,
    assert_same_detections,
    images,
    saved_images,
    tiny_detector,
)

onnx = pytest.importorskip("onnx")

ATOL = 1e-4


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


def test_file_records_the_checkpoints_settings(exported):
    model, checkpoint, onnx_path = exported
    props = {p.key: p.value for p in onnx.load(onnx_path, load_external_data=False).metadata_props}
    assert props[PREFIX + "short_side"] == "128" and props[PREFIX + "max_size"] == "213"
    assert props[PREFIX + "variant"] == "base"
    detector = Detector.from_exported(onnx_path)  # the backend from the suffix
    from_checkpoint = Detector.from_checkpoint(checkpoint, device="cpu")
    for d in (detector, from_checkpoint):
        assert (d.short_side, d.max_size, d.class_names) == (128, 213, CLASS_NAMES)
    assert detector.mean == from_checkpoint.mean and detector.std == from_checkpoint.std
    with pytest.raises(ValueError, match="an export of variant 'base', not 'two_stage'"):
        Detector.from_exported(onnx_path, variant="two_stage")


def test_detections_match_eager(exported):
    model, _, onnx_path = exported
    size = dict(short_side=DEMO_SETTINGS["short_side"], max_size=DEMO_SETTINGS["max_size"])
    eager = Detector(model, class_names=CLASS_NAMES, **size)
    onnx_detector = export_cli.exported_detector(onnx_path, "onnxruntime")
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
        assert [n for n, a in zip(g["names"], apart) if a] == [n for n, a in zip(w["names"], apart) if a]
        torch.testing.assert_close(g["boxes"][apart], w["boxes"][apart], atol=1e-2, rtol=1e-4)  # pixels


def test_predict_command_with_onnxruntime(exported, tmp_path, capsys):
    model, checkpoint, onnx_path = exported
    paths = saved_images(tmp_path, 2)
    # no --backend: .onnx runs in onnxruntime; no size or names: the ones the file records
    assert predict_cli.main([onnx_path, *paths, "--output-dir", str(tmp_path / "onnx"), *PREDICT_ARGS]) == 0
    torch_args = [checkpoint, *paths, "--device", "cpu", "--output-dir", str(tmp_path / "torch"), *PREDICT_ARGS]
    assert predict_cli.main(torch_args) == 0
    assert "note:" not in capsys.readouterr().err
    assert_same_detections(tmp_path / "onnx", tmp_path / "torch", len(paths), ATOL)


def test_file_without_settings_runs_with_a_note_and_the_options(exported, tmp_path, capsys):
    """A file exported before the settings were recorded: defaults and a note; the options restore them."""
    _, checkpoint, onnx_path = exported
    proto = onnx.load(onnx_path)
    kept = [(p.key, p.value) for p in proto.metadata_props if not p.key.startswith(PREFIX)]
    del proto.metadata_props[:]
    for key, value in kept:
        proto.metadata_props.add(key=key, value=value)
    old = str(tmp_path / "old.onnx")
    onnx.save(proto, old)
    paths = saved_images(tmp_path, 2)
    assert predict_cli.main([old, paths[0], "--output-dir", str(tmp_path / "plain"), *PREDICT_ARGS]) == 0
    err = capsys.readouterr().err
    assert "note:" in err and "does not record its image size and class names" in err and "--short-side" in err
    names = tmp_path / "names.txt"
    names.write_text("\n".join(CLASS_NAMES) + "\n")
    size = ["--short-side", "128", "--max-size", "213", "--class-names", str(names)]
    assert predict_cli.main([old, *paths, "--output-dir", str(tmp_path / "old"), *size, *PREDICT_ARGS]) == 0
    assert "note:" not in capsys.readouterr().err
    torch_args = [checkpoint, *paths, "--device", "cpu", "--output-dir", str(tmp_path / "torch"), *PREDICT_ARGS]
    assert predict_cli.main(torch_args) == 0
    assert_same_detections(tmp_path / "old", tmp_path / "torch", len(paths), ATOL)


def test_predict_names_the_backend_for_an_unknown_suffix(exported, tmp_path, capsys):
    _, _, onnx_path = exported
    renamed = str(tmp_path / "model.bin")
    onnx.save(onnx.load(onnx_path), renamed)  # the weights (beside the exported file) inside the copy
    path = saved_images(tmp_path, 4)[0]
    assert predict_cli.main([renamed, path, "--output-dir", str(tmp_path / "out")]) == 2
    assert "--backend onnxruntime for ONNX" in capsys.readouterr().err
    assert predict_cli.main([renamed, path, "--backend", "onnxruntime", "--output-dir", str(tmp_path / "out")]) == 0
    with pytest.raises(ValueError, match="--backend onnxruntime for an ONNX file"):
        export_cli.load_exported(renamed)


def test_predict_refuses_autocast_with_exported_file(exported, tmp_path, capsys):
    _, _, onnx_path = exported
    path = str(tmp_path / "img.png")
    images(3)[0].save(path)
    status = predict_cli.main([onnx_path, path, "--backend", "onnxruntime", "--autocast", "float16", "--output-dir", str(tmp_path)])
    assert status == 2 and "autocast" in capsys.readouterr().err
