"""Export a Deformable DETR checkpoint for deployment, and run the exported file.

    python -m examples.deformable_detr.export CHECKPOINT --format onnx [--tensorrt] [--output model.onnx]
    python -m examples.deformable_detr.export CHECKPOINT --format aoti [--quick-compile] [--output model.pt2]
    python -m examples.deformable_detr.predict model.onnx IMAGES      # onnxruntime (.onnx), AOTInductor (.pt2)

The exported model takes ``images`` (B, 3, H, W) float32 (normalised as api.preprocess does) and
``mask`` (B, H, W) bool (True at padding), and returns the last decoder layer's ``pred_logits``
(B, Q, C) and ``pred_boxes`` (B, Q, 4); batch, height and width are dynamic (65 to 4096 pixels:
the coarsest level must be at least 2 pixels). The ONNX file comes from ``torch.onnx.export(...,
dynamo=True)``, in which msda's op becomes standard ONNX operators (msda.onnx), or with
``--tensorrt`` TensorRT's ``MultiscaleDeformableAttnPlugin_TRT`` node (runs in TensorRT with its
plugin library, not in onnxruntime). The AOTInductor package calls msda's kernel: the process
that loads it must have msda's ops registered (``import msda`` in Python).

After exporting, the file is run on random images at two sizes and compared with eager PyTorch
(raw logits and boxes); the differences are printed.

The file also records how its images are to be prepared and its detections named, copied from
the checkpoint (inference_settings.py): the resize rule (short side, max size), the normalisation,
the class names and the variant, as ONNX ``metadata_props`` or the AOTInductor package's
metadata (``detector.*`` keys). ``predict`` and ``Detector.from_exported`` use them; a file
without them (exported by an older version) runs with the defaults and a note.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import sys
import time
import warnings
from typing import Any, Optional, Sequence

import torch
from torch import nn

import msda.onnx

from .api import Detector
from .checkpoint import CheckpointError, config_from_checkpoint, load_weights, read_checkpoint, variant_of_config
from .deformable_detr import DeformableDETR, build_model
from .inference_settings import InferenceSettings, from_metadata, settings_from_args, to_metadata
from .optional import needs_extra

__all__ = [
    "RawOutputs",
    "export_onnx",
    "export_aoti",
    "load_exported",
    "exported_detector",
    "backend_for",
    "MissingSettingsWarning",
    "compare_with_eager",
    "BACKENDS",
]

BACKENDS = ("onnxruntime", "aoti")
SUFFIXES = {".onnx": "onnxruntime", ".pt2": "aoti"}
INPUT_NAMES = ["images", "mask"]
OUTPUT_NAMES = ["pred_logits", "pred_boxes"]
MIN_SIDE, MAX_SIDE = 65, 4096  # the stride-64 level must have 2 or more pixels


class RawOutputs(nn.Module):
    """The detector with tensor outputs only: (images, mask) -> (pred_logits, pred_boxes)."""

    def __init__(self, model: DeformableDETR) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.model(images, mask)
        return out["pred_logits"], out["pred_boxes"]


def example_inputs(height: int, width: int, batch: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """Random images and a mask with padding on the last image (batch >= 2 so that torch.export
    does not fix the batch size to 1)."""
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(batch, 3, height, width, generator=generator)
    mask = torch.zeros(batch, height, width, dtype=torch.bool)
    mask[-1, height - height // 4 :, :] = True
    mask[-1, :, width - width // 5 :] = True
    images[mask.unsqueeze(1).expand_as(images)] = 0.0
    return images, mask


def _dynamic_shapes() -> tuple[dict[int, Any], dict[int, Any]]:
    batch = torch.export.Dim("batch", min=1, max=1024)
    height = torch.export.Dim("height", min=MIN_SIDE, max=MAX_SIDE)
    width = torch.export.Dim("width", min=MIN_SIDE, max=MAX_SIDE)
    return {0: batch, 2: height, 3: width}, {0: batch, 1: height, 2: width}


def _check_size(height: int, width: int) -> None:
    for name, side in (("height", height), ("width", width)):
        if not MIN_SIDE <= side <= MAX_SIDE:
            raise ValueError(f"example {name} must be between {MIN_SIDE} and {MAX_SIDE} pixels, got {side}")


def _metadata(model: DeformableDETR, settings: Optional[InferenceSettings]) -> dict[str, str]:
    """The metadata an exported file carries: ``settings`` (defaults if None) and the model's variant."""
    settings = settings or InferenceSettings()
    return to_metadata(dataclasses.replace(settings, variant=variant_of_config(model.config)))


def _traceable(model: DeformableDETR, height: int, width: int) -> tuple[RawOutputs, tuple[torch.Tensor, torch.Tensor]]:
    """What both exporters trace: ``model`` in eval mode returning raw outputs, and example inputs of
    ``height`` x ``width`` (checked against the supported sizes)."""
    _check_size(height, width)
    return RawOutputs(model).eval(), example_inputs(height, width)


def _write_onnx_metadata(path: str, metadata: dict[str, str]) -> None:
    with needs_extra():
        import onnx

    proto = onnx.load(path, load_external_data=False)  # weights stored beside the file stay there
    kept = [(p.key, p.value) for p in proto.metadata_props if p.key not in metadata]
    del proto.metadata_props[:]
    for key, value in [*kept, *metadata.items()]:
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(proto, path)


def export_onnx(
    model: DeformableDETR,
    path: str,
    height: int = 800,
    width: int = 1333,
    tensorrt: bool = False,
    settings: Optional[InferenceSettings] = None,
) -> None:
    """Write ``model`` as ONNX (dynamo exporter, dynamic batch and image size) to ``path``, with
    ``settings`` (the checkpoint's preprocessing and class names; defaults if None) as metadata."""
    wrapped, args = _traceable(model, height, width)
    with needs_extra():  # the exporter's own error would not say how to install them
        import onnx  # noqa: F401
        import onnxscript  # noqa: F401
    kwargs: dict[str, Any] = dict(
        dynamo=True, dynamic_shapes=_dynamic_shapes(), input_names=INPUT_NAMES, output_names=OUTPUT_NAMES
    )
    with torch.no_grad(), (msda.onnx.tensorrt_plugin() if tensorrt else contextlib.nullcontext()):
        torch.onnx.export(wrapped, args, path, **kwargs)
    _write_onnx_metadata(path, _metadata(model, settings))


# Inductor options of export_aoti(quick_compile=True): no vectorised kernels and -O0 (the
# tiny test detector compiles in about 70 s instead of about 160 s with -O0 alone on the 2-core VM);
# the package runs slower, with the same results within rounding.
QUICK_COMPILE = {"cpp.simdlen": 1, "aot_inductor.debug_compile": True}


def export_aoti(
    model: DeformableDETR,
    path: str,
    height: int = 800,
    width: int = 1333,
    quick_compile: bool = False,
    settings: Optional[InferenceSettings] = None,
) -> str:
    """Compile ``model`` with AOTInductor into the package ``path`` (dynamic batch and image size),
    with ``settings`` (defaults if None) in the package's metadata.

    ``quick_compile``: unoptimised kernels (QUICK_COMPILE), for checking the path rather than deploying."""
    wrapped, args = _traceable(model, height, width)
    metadata = {"num_classes": str(model.config.num_classes), **_metadata(model, settings)}
    configs: dict[str, Any] = {"aot_inductor.metadata": metadata}
    if quick_compile:
        configs.update(QUICK_COMPILE)
    with torch.no_grad():
        program = torch.export.export(wrapped, args, dynamic_shapes=_dynamic_shapes())
        return torch._inductor.aoti_compile_and_package(program, package_path=path, inductor_configs=configs)


class OnnxRuntimeModel(nn.Module):
    """An exported ONNX detector run by onnxruntime, called like DeformableDETR (dict output)."""

    def __init__(self, path: str, threads: Optional[int] = None) -> None:
        super().__init__()
        with needs_extra():
            import onnxruntime

        options = onnxruntime.SessionOptions()
        if threads is not None:
            options.intra_op_num_threads = threads
        self.session = onnxruntime.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        self.num_classes = int(self.session.get_outputs()[0].shape[-1])
        self.metadata: dict[str, str] = dict(self.session.get_modelmeta().custom_metadata_map)

    def forward(self, images: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
        feeds = {"images": images.detach().cpu().float().numpy(), "mask": mask.detach().cpu().numpy()}
        logits, boxes = self.session.run(OUTPUT_NAMES, feeds)
        return {"pred_logits": torch.from_numpy(logits), "pred_boxes": torch.from_numpy(boxes)}


class AOTIModel(nn.Module):
    """An AOTInductor package of the detector, called like DeformableDETR (dict output)."""

    def __init__(self, path: str) -> None:
        super().__init__()
        self.runner = torch._inductor.aoti_load_package(path)
        self.metadata: dict[str, str] = dict(self.runner.get_metadata())
        self.num_classes = int(self.metadata["num_classes"])

    def forward(self, images: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
        logits, boxes = self.runner(images.float().contiguous(), mask.contiguous())
        return {"pred_logits": logits, "pred_boxes": boxes}


def backend_for(path: str) -> str:
    """The backend that runs an exported file, from its suffix (.onnx, .pt2)."""
    suffix = os.path.splitext(path)[1].lower()
    if suffix not in SUFFIXES:
        raise ValueError(
            f"cannot tell from its name how to run {path}: name the backend "
            f"(--backend onnxruntime for an ONNX file, --backend aoti for an AOTInductor package)"
        )
    return SUFFIXES[suffix]


class MissingSettingsWarning(UserWarning):
    """An exported file that does not record its preprocessing and class names."""


def load_exported(path: str, backend: Optional[str] = None) -> nn.Module:
    """The exported detector in ``path`` as a module returning {"pred_logits", "pred_boxes"};
    ``backend`` defaults to the one of the file's suffix (backend_for)."""
    backend = backend or backend_for(path)
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"exported model not found: {path}")
    return OnnxRuntimeModel(path) if backend == "onnxruntime" else AOTIModel(path)


def exported_detector(
    path: str,
    backend: Optional[str] = None,
    variant: Optional[str] = None,
    autocast: Optional[str] = None,
    **kwargs: Any,
) -> Detector:
    """A Detector (preprocessing, post-processing, class names) around an exported file.

    ``backend`` defaults to the file suffix's (backend_for). Preprocessing and class names are the
    ones the file records (its checkpoint's); a file without them gets the defaults (800/1333,
    ImageNet statistics, COCO names or label indices) and a MissingSettingsWarning. Same keywords
    as ``Detector.from_checkpoint``, which override the recorded values; ``variant``, when given,
    must be the recorded one; ``autocast`` is refused (the file's dtype is fixed at export)."""
    backend = backend or backend_for(path)
    if autocast is not None:
        raise ValueError(f"autocast applies to PyTorch checkpoints only, not to an exported {backend} file")
    model = load_exported(path, backend)
    settings = from_metadata(model.metadata)
    if settings is None:
        settings = InferenceSettings()
        if any(kwargs.get(k) is None for k in ("short_side", "max_size", "class_names")):
            warnings.warn(
                f"{path} does not record its image size and class names (exported by an older version): "
                f"using short side {kwargs.get('short_side') or settings.short_side}, max size "
                f"{kwargs.get('max_size') or settings.max_size} and "
                f"{'COCO names' if model.num_classes == 91 else 'label numbers'} unless given; export it again "
                f"from its checkpoint, or pass the checkpoint's --short-side, --max-size and --class-names",
                MissingSettingsWarning,
                stacklevel=2,
            )
    elif variant is not None and settings.variant is not None and variant != settings.variant:
        raise ValueError(f"{path} is an export of variant {settings.variant!r}, not {variant!r}")
    device = kwargs.pop("device", None) or "cpu"
    if device not in ("cpu", "auto"):
        raise ValueError(f"exported backends run on the CPU here, got device {device!r}")
    return Detector.with_settings(model, settings, model.num_classes, device="cpu", **kwargs)


@torch.no_grad()
def compare_with_eager(
    model: DeformableDETR, exported: nn.Module, images: torch.Tensor, mask: torch.Tensor
) -> dict[str, float]:
    """Largest absolute differences of the raw per-query outputs, exported vs eager."""
    want = model.eval()(images, mask)
    got = exported(images, mask)
    return {key: (got[key].float() - want[key].float()).abs().max().item() for key in OUTPUT_NAMES}


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m examples.deformable_detr.export", description=__doc__.split("\n")[0])
    p.add_argument("checkpoint", help="checkpoint file (original Deformable DETR format: a dict with 'model')")
    p.add_argument("--format", choices=("onnx", "aoti"), required=True, help="ONNX file or AOTInductor package")
    p.add_argument("--tensorrt", action="store_true", help="ONNX with TensorRT's plugin node (not runnable in onnxruntime)")
    p.add_argument("--output", help="output path (default: the checkpoint's name with .onnx or .pt2)")
    p.add_argument("--height", type=int, default=800, help="example image height for tracing (default: %(default)s)")
    p.add_argument("--width", type=int, default=1333, help="example image width for tracing (default: %(default)s)")
    p.add_argument("--no-check", action="store_true", help="skip running the exported file against eager PyTorch")
    p.add_argument("--quick-compile", action="store_true",
                   help="AOTInductor: unoptimised kernels, compiled faster (to check the path, not to deploy)")
    args = p.parse_args(argv)
    if args.tensorrt and args.format != "onnx":
        p.error("--tensorrt needs --format onnx")
    if args.quick_compile and args.format != "aoti":
        p.error("--quick-compile needs --format aoti")
    return args


def _check_sizes(height: int, width: int) -> list[tuple[int, int]]:
    # the export size and a smaller one of another aspect ratio (the file must not be fixed to one size)
    return [(height, width), (max(MIN_SIDE, height * 3 // 4), max(MIN_SIDE, width // 2))]


def run(args: argparse.Namespace) -> str:
    ckpt = read_checkpoint(args.checkpoint)
    model = build_model(config_from_checkpoint(ckpt))
    load_weights(model, ckpt, source=args.checkpoint)
    model.eval()
    settings = settings_from_args(ckpt.get("args"))  # what predict on the checkpoint would use
    suffix = ".onnx" if args.format == "onnx" else ".pt2"
    output = args.output or os.path.splitext(args.checkpoint)[0] + ("_tensorrt" if args.tensorrt else "") + suffix
    start = time.perf_counter()
    if args.format == "onnx":
        export_onnx(model, output, args.height, args.width, tensorrt=args.tensorrt, settings=settings)
    else:
        export_aoti(model, output, args.height, args.width, quick_compile=args.quick_compile, settings=settings)
    print(f"wrote {output} in {time.perf_counter() - start:.1f} s")
    if args.tensorrt:
        with needs_extra():
            import onnx

        onnx.checker.check_model(output, full_check=True)
        print(f"onnx checker: ok (TensorRT node {msda.onnx.TENSORRT_OP}; not run here: needs TensorRT)")
    elif not args.no_check:
        exported = load_exported(output, "onnxruntime" if args.format == "onnx" else "aoti")
        for height, width in _check_sizes(args.height, args.width):
            diffs = compare_with_eager(model, exported, *example_inputs(height, width))
            print(f"  {height}x{width}: max |exported - eager|: " + ", ".join(f"{k} {v:.2e}" for k, v in diffs.items()))
    return output


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    try:
        run(args)
    except (CheckpointError, FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
