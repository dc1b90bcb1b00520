"""Hugging Face transformers' Deformable DETR (R50, random weights) on msda
against transformers' own grid_sample path, in the same run.

    python benchmarks/hf_detr.py [--quick] [--repeats 3]
    python benchmarks/hf_detr.py --split-only [--repeats 7]

Cases: inference at 800x1333 (left out of ``--quick``), one training step
(forward, Hungarian-matched loss, backward; batch 2 at 480x640) at a smaller
size, and the
encoder's sampling-location arithmetic alone (transformers' broadcast form
against msda.integrations' bitwise-equal flat form). Three configurations,
interleaved run by run so that load on the machine hits them alike:
``transformers`` (its own path), ``msda layer`` (enable() with transformers'
location arithmetic kept; inference only) and ``msda`` (enable(): layer and
arithmetic).
Medians are reported. ``--split`` adds where one 800x1333 inference (320x480
with --quick) spends its time in each configuration (module timing hooks): the
backbone, the deformable attention modules' projections, their attention core
(transformers' grid_sample layer or msda's op), their own arithmetic (position
add, masking, softmax, sampling locations), the FFNs and the rest; and the
ratio msda's path would reach if its core and arithmetic took no time, and
msda's share of the inference: (attention core + attention arithmetic) / total
in msda's configuration, the median of the runs' shares (at least 7 runs
unless --repeats says otherwise). ``--split-only`` runs the split alone.
Prints a table and writes JSON
(benchmarks/results/hf_detr.json; hf_detr_quick.json with --quick;
hf_detr_split.json with --split-only) with the machine description and the
load average at start and end.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time
from typing import Callable, Iterator

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # random weights: nothing to download

import torch  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import msda.integrations.transformers as msda_hf  # noqa: E402
from msda.integrations import _shared  # noqa: E402
from other_work import OtherWork  # noqa: E402
from run_all import machine_info  # noqa: E402

CONFIGS = ("transformers", "msda layer", "msda")


def build_model(num_queries: int = 300):
    from transformers import DeformableDetrConfig, DeformableDetrForObjectDetection, ResNetConfig

    # ResNetConfig's defaults are ResNet-50; transformers' default backbone is timm's.
    backbone = ResNetConfig(out_features=["stage2", "stage3", "stage4"])
    config = DeformableDetrConfig(
        use_timm_backbone=False, backbone_config=backbone, num_queries=num_queries, num_labels=91
    )
    torch.manual_seed(0)
    return DeformableDetrForObjectDetection(config)


@contextlib.contextmanager
def configuration(name: str) -> Iterator[None]:
    if name == "transformers":
        yield
        return
    with msda_hf.enable():
        if name == "msda layer":  # put transformers' attention-module forwards back, keep msda's layer
            saved = {}
            for (owner, attr), original in msda_hf._state.originals.items():
                if attr == "forward" and owner.__name__ != msda_hf.LAYER_NAME:
                    saved[owner] = vars(owner)[attr]
                    setattr(owner, attr, original)
            try:
                yield
            finally:
                for owner, patched in saved.items():
                    setattr(owner, "forward", patched)
        else:
            yield


def interleaved(run: Callable[[], object], repeats: int, configs: tuple[str, ...] = CONFIGS) -> tuple[dict, dict]:
    times: dict[str, list[float]] = {name: [] for name in configs}
    outputs = {}
    for name in configs:  # warm-up: allocator, first-call costs; outputs kept
        with configuration(name):
            outputs[name] = run()
    for _ in range(repeats):
        for name in configs:
            with configuration(name):
                start = time.perf_counter()
                run()
                times[name].append(time.perf_counter() - start)
    return times, outputs


def inference_case(model, height: int, width: int, repeats: int) -> dict:
    model.eval()
    pixels = torch.randn(1, 3, height, width, generator=torch.Generator().manual_seed(1))

    def run():
        with torch.inference_mode():
            out = model(pixel_values=pixels)
        return out.logits, out.pred_boxes

    times, outputs = interleaved(run, repeats)
    diff = max((a - b).abs().max().item() for a, b in zip(outputs["msda"], outputs["transformers"]))
    return {"case": f"inference {height}x{width}", "seconds": times, "max_abs_output_diff": diff}


def training_case(model, height: int, width: int, repeats: int) -> dict:
    model.train()
    g = torch.Generator().manual_seed(2)
    pixels = torch.randn(2, 3, height, width, generator=g)
    labels = [
        {"class_labels": torch.randint(0, 91, (n,), generator=g), "boxes": torch.rand(n, 4, generator=g) * 0.5 + 0.25}
        for n in (5, 9)
    ]

    def run():
        model.zero_grad(set_to_none=True)
        torch.manual_seed(3)  # the same dropout masks in every configuration
        loss = model(pixel_values=pixels, labels=labels).loss
        loss.backward()
        return loss.detach()

    # Without the "msda layer" split: a training step is the slowest case here.
    times, outputs = interleaved(run, repeats, ("transformers", "msda"))
    diff = (outputs["msda"] - outputs["transformers"]).abs().item()
    return {"case": f"training step 2x{height}x{width}", "seconds": times, "max_abs_loss_diff": diff}


PROJECTIONS = ("value_proj", "sampling_offsets", "attention_weights", "output_proj")


def split_case(model, height: int, width: int, repeats: int) -> dict:
    """Per-part seconds of one inference, from forward hooks (medians)."""
    model.eval()
    pixels = torch.randn(1, 3, height, width, generator=torch.Generator().manual_seed(1))
    spent: dict[str, float] = {}
    started: dict[int, float] = {}
    wrappers = {name for name, m in model.named_modules() if type(m).__name__.endswith("MultiscaleDeformableAttention")}

    def part(name: str, module: torch.nn.Module) -> str:
        parent, _, attribute = name.rpartition(".")
        if name == "model.backbone":
            return "backbone"
        if attribute == "mlp":
            return "FFNs"
        if name in wrappers:  # the module that owns the projections and calls the layer
            return "attention modules"
        if type(module).__name__ == msda_hf.LAYER_NAME:
            return "attention core"
        if parent in wrappers and attribute in PROJECTIONS:
            return "attention projections"
        return ""

    hooks, wrapped = [], []
    for name, module in model.named_modules():
        key = part(name, module)
        if key == "attention projections":
            # Timed by wrapping the instance's forward, not by a forward hook:
            # msda's modules write their softmax and locations into a
            # projection's output only when no forward hook could hold it.
            def timed(*args, _forward=module.forward, _key=key, **kwargs):
                start = time.perf_counter()
                out = _forward(*args, **kwargs)
                spent[_key] = spent.get(_key, 0.0) + time.perf_counter() - start
                return out

            module.forward = timed
            wrapped.append(module)
        elif key:
            def pre(m, args):
                started[id(m)] = time.perf_counter()

            def post(m, args, out, _key=key):
                spent[_key] = spent.get(_key, 0.0) + time.perf_counter() - started.pop(id(m))

            hooks += [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]

    def run():
        spent.clear()
        start = time.perf_counter()
        with torch.inference_mode():
            model(pixel_values=pixels)
        parts = dict(spent, total=time.perf_counter() - start)
        inner = parts.get("attention core", 0.0) + parts.get("attention projections", 0.0)
        parts["attention arithmetic"] = parts.pop("attention modules", 0.0) - inner
        parts["rest"] = parts["total"] - sum(v for k, v in parts.items() if k != "total")
        return parts

    configs = ("transformers", "msda")
    runs: dict[str, list[dict]] = {name: [] for name in configs}
    try:
        for i in range(repeats + 1):  # the first round warms up
            for name in configs:
                with configuration(name):
                    parts = run()
                if i:
                    runs[name].append(parts)
    finally:
        for hook in hooks:
            hook.remove()
        for module in wrapped:
            del module.forward  # the class's forward again
    split = {
        name: {key: statistics.median(r[key] for r in rs) for key in rs[0]} for name, rs in runs.items()
    }
    msda = split["msda"]
    floor = msda["total"] - msda["attention core"] - msda["attention arithmetic"]
    return {
        "case": f"split of one inference {height}x{width}",
        "seconds": {name: [r["total"] for r in rs] for name, rs in runs.items()},
        "parts_median_seconds": split,
        "speedup_if_msda_core_and_arithmetic_were_free": split["transformers"]["total"] / floor,
        # Per run, so that the share and its parts come from the same inference.
        "msda_share": statistics.median(
            (r["attention core"] + r["attention arithmetic"]) / r["total"] for r in runs["msda"]),
        "msda_share_runs": [(r["attention core"] + r["attention arithmetic"]) / r["total"] for r in runs["msda"]],
    }


def locations_case(height: int, width: int, repeats: int) -> dict:
    # The encoder's shapes: every pixel of the 4 levels queries 8 heads x 4 levels x 4 points.
    shapes = torch.tensor([[-(-height // s), -(-width // s)] for s in (8, 16, 32, 64)])
    S = int((shapes[:, 0] * shapes[:, 1]).sum())
    g = torch.Generator().manual_seed(4)
    reference = torch.rand(1, S, 4, 2, generator=g)
    offsets = torch.randn(1, S, 8, 4, 4, 2, generator=g)

    def broadcast():  # transformers' form
        normalizer = torch.stack([shapes[..., 1], shapes[..., 0]], -1)
        return reference[:, :, None, :, None, :] + offsets / normalizer[None, None, None, :, None, :]

    def flat():
        return _shared.sampling_locations(reference, offsets, shapes, 4)

    assert torch.equal(broadcast(), flat())
    times: dict[str, list[float]] = {"transformers": [], "msda": []}
    for fn in (broadcast, flat):
        fn()
    for _ in range(repeats):
        for name, fn in (("transformers", broadcast), ("msda", flat)):
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {"case": f"encoder locations {height}x{width} (S={S})", "seconds": times, "bitwise_equal": True}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="small sizes only (no 800x1333), 1 timed run")
    p.add_argument("--repeats", type=int, default=None, help="timed runs per configuration (default 3, quick 1)")
    p.add_argument("--split", action="store_true", help="also time the parts of one inference (module hooks)")
    p.add_argument("--split-only", action="store_true", help="time only the parts of one inference (default 7 runs)")
    p.add_argument("--output", default=None)
    args = p.parse_args()
    repeats = args.repeats or (1 if args.quick else 7 if args.split_only else 3)
    split_repeats = args.repeats or (1 if args.quick else 7)
    name = "hf_detr_quick" if args.quick else "hf_detr"
    output = args.output or os.path.join(HERE, "results", name + ("_split.json" if args.split_only else ".json"))

    started = time.time()
    info = machine_info()  # before the cases: its load average is the one at start
    model = build_model(num_queries=100 if args.quick else 300)
    cases = []
    load_at_start = list(os.getloadavg())
    other_work = OtherWork()
    if not args.split_only:
        if not args.quick:
            cases.append(inference_case(model, 800, 1333, repeats))
        cases.append(inference_case(model, 320, 480, repeats) if args.quick else None)
        cases.append(training_case(model, *((256, 384) if args.quick else (480, 640)), repeats))
        cases.append(locations_case(*((320, 480) if args.quick else (800, 1333)), max(repeats, 5)))
    if args.split or args.split_only:
        cases.append(split_case(model, *((320, 480) if args.quick else (800, 1333)), split_repeats))
    cases = [c for c in cases if c is not None]

    for case in cases:
        medians = {name: statistics.median(t) for name, t in case["seconds"].items()}
        case["median_seconds"] = medians
        case["speedup"] = {name: medians["transformers"] / m for name, m in medians.items() if name != "transformers"}

    print(f"transformers Deformable DETR (R50, random weights), {info['cpu_model']}, {info['cores']} cores, "
          f"torch {info['torch']} ({torch.get_num_threads()} threads), load average at start {info['load_average_at_start']}, "
          f"median of {repeats}")
    print("| case | transformers s | msda layer s | msda s | speed-up (layer) | speed-up (msda) |")
    print("| --- | --- | --- | --- | --- | --- |")
    for case in cases:
        m, s = case["median_seconds"], case["speedup"]
        layer = f"{m['msda layer']:.3f}" if "msda layer" in m else "-"
        layer_x = f"{s['msda layer']:.2f}x" if "msda layer" in s else "-"
        row = [case["case"], f"{m['transformers']:.3f}", layer, f"{m['msda']:.3f}", layer_x, f"{s['msda']:.2f}x"]
        print("| " + " | ".join(row) + " |")
    for case in cases:
        if "parts_median_seconds" in case:
            split = case["parts_median_seconds"]
            print(f"\n{case['case']}, median seconds:")
            print("| part | transformers | msda |")
            print("| --- | --- | --- |")
            for key in split["transformers"]:
                print(f"| {key} | {split['transformers'][key]:.3f} | {split['msda'][key]:.3f} |")
            print(f"speed-up if msda's attention core and arithmetic took no time: "
                  f"{case['speedup_if_msda_core_and_arithmetic_were_free']:.2f}x")
            print(f"msda's share of the inference (attention core + arithmetic) / total: {case['msda_share']:.1%} "
                  f"(median of {len(case['msda_share_runs'])} runs)")

    result = {
        "benchmark": "hf_detr",
        "model": "transformers DeformableDetrForObjectDetection, ResNet-50 (ResNetConfig), random weights",
        "transformers": __import__("transformers").__version__,
        "quick": args.quick,
        "repeats": repeats,
        "cases": cases,
        "machine": info,
        "elapsed_s": time.time() - started,
        "load_average_at_start": load_at_start,
        "load_average_at_end": list(os.getloadavg()),
        "other_work_cores": other_work.cores(),
        "command": "python benchmarks/hf_detr.py " + " ".join(sys.argv[1:]),
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    os.makedirs(os.path.dirname(output), exist_ok=True)
    with open(output, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {output}")


if __name__ == "__main__":
    main()
