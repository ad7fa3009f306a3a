"""Images/s of inference_with_segmentation.py (segment + crop + classify) on CPU for each face-parser backend.

Backends timed through the script itself, on drawn face photos (data/synthetic_faces.py):
    opencv      Haar face detector + skin colour
    onnx-tiny   a tiny random SegFormer (the one the tests use), exported with quantize_onnx_models.py
    onnx-b5     a random-weight SegFormer with the MiT-B5 shape of jonathandinu/face-parsing (depths 3/6/40/3,
                hidden sizes 64/128/320/512, 512x512 input): the real parser's speed without its weights, which are
                not reachable offline (speed does not depend on the weight values)
The classifier is a random-weight run folder (efficientnet_b0 at 224 by default) run by ONNX Runtime.

Example (the README table):
    python -m benchmarks.segmented_inference_speed --images 40 --backends opencv onnx-tiny onnx-b5
Camera-size photos, full against reduced JPEG decoding (docs/measurements_speed.md):
    python -m benchmarks.segmented_inference_speed --images 20 --backends opencv onnx-tiny --camera_size 4032x3024
"""

from __future__ import annotations

import argparse
import logging
import tempfile
from pathlib import Path

import pandas as pd

from benchmarks.model_zoo_speed import make_run_folder
from configs import ExportOptions, PredictionOptions, SegmentationOptions
from data.synthetic_faces import generate_dataset
from deploy.machine import describe_machine, machine_info
from deploy.onnx_export import export_run, export_segmentation
from prediction.segmented import infer_folder_segmented
from runs.export_dir import ExportDir

FACE_LABELS = ["background", "skin", "nose", "eye_g", "l_eye", "r_eye", "l_brow", "r_brow", "l_ear", "r_ear",
               "mouth", "u_lip", "l_lip", "hair", "hat", "ear_r", "neck_l", "neck", "cloth"]
SEGFORMER_SHAPES = {
    "onnx-tiny": dict(depths=[1, 1, 1, 1], hidden_sizes=[8, 16, 32, 64], num_attention_heads=[1, 1, 2, 2],
                      decoder_hidden_size=32, size=64),
    "onnx-b5": dict(depths=[3, 6, 40, 3], hidden_sizes=[64, 128, 320, 512], num_attention_heads=[1, 2, 5, 8],
                    decoder_hidden_size=768, size=512),
}


def save_random_segformer(folder: Path, shape: dict) -> tuple[Path, int]:
    from transformers import SegformerConfig, SegformerForSemanticSegmentation, SegformerImageProcessor

    shape = dict(shape)
    size = shape.pop("size")
    config = SegformerConfig(**shape, num_labels=len(FACE_LABELS), id2label=dict(enumerate(FACE_LABELS)),
                             label2id={n: i for i, n in enumerate(FACE_LABELS)})
    model = SegformerForSemanticSegmentation(config).eval()
    model.save_pretrained(folder)
    SegformerImageProcessor(size={"height": size, "width": size}).save_pretrained(folder)
    return folder, sum(p.numel() for p in model.parameters())


def camera_size_copies(folder: Path, target: Path, size: tuple[int, int]) -> Path:
    """Each drawn face (PNG) scaled to 3/4 of the shorter side and centred on a camera-size JPEG of its own
    background colour: what a phone photo of a face looks like to the decoder."""
    from PIL import Image

    for source in sorted(folder.rglob("*.png")):
        with Image.open(source) as drawn:
            face = drawn.convert("RGB")
        side = 3 * min(size) // 4
        canvas = Image.new("RGB", size, face.getpixel((0, 0)))
        canvas.paste(face.resize((side, side), Image.Resampling.BICUBIC), ((size[0] - side) // 2,
                                                                          (size[1] - side) // 2))
        copy = (target / source.relative_to(folder)).with_suffix(".jpg")
        copy.parent.mkdir(parents=True, exist_ok=True)
        canvas.save(copy, quality=92)
    return target


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("segment + classify throughput", add_help=add_help)
    parser.add_argument("--images", type=int, default=40, help="face photos to classify (default: %(default)s)")
    parser.add_argument("--photo_size", type=int, default=512, help="side of each photo (default: %(default)s)")
    parser.add_argument("--model_name", default="efficientnet_b0", help="classifier (default: %(default)s)")
    parser.add_argument("--img_size", type=int, default=224, help="classifier input (default: %(default)s)")
    parser.add_argument("--backends", nargs="+", default=["opencv", "onnx-tiny", "onnx-b5"],
                        choices=["opencv", "onnx-tiny", "onnx-b5"])
    parser.add_argument("--camera_size", default=None,
                        help="WIDTHxHEIGHT: classify camera-size JPEG copies of the photos instead, each decoded in "
                             "full and reduced (--reduced_decode False / True)")
    parser.add_argument("--output", default=None, help="optional CSV for the table")
    return parser


def _timed_row(run_dir: Path, photos: Path, output: Path, onnx_dir: ExportDir, segmentation: SegmentationOptions,
               reduced: bool, backend: str, params, args: argparse.Namespace) -> dict:
    summary = infer_folder_segmented(run_dir, photos, output,
                                     PredictionOptions(backend="onnx", onnx_model=str(onnx_dir.fp32),
                                                       reduced_decode=reduced),
                                     segmentation, save_segmented=False, num_workers=0)
    return {"backend": backend, "parser_parameters_m": round(params / 1e6, 2) if params else None,
            "photos": summary["predicted"], "photo_size": args.camera_size or args.photo_size,
            "decode": "reduced" if reduced else "full", "classifier": f"{args.model_name}@{args.img_size} onnx",
            "images_per_s": round(summary["images_per_s"], 2),
            "faces_found": summary["predicted"] - summary["no_face"]}


def main(args: argparse.Namespace) -> pd.DataFrame:
    logging.basicConfig(level=logging.WARNING)
    rows = []
    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        data = generate_dataset(work / "faces", n_train=4, n_test=max(1, args.images // 2), img_size=args.photo_size)
        run_dir = make_run_folder(work / "run", args.model_name, data, args.img_size)
        onnx_dir = ExportDir(work / "onnx")
        export_run(run_dir, onnx_dir, ExportOptions(quantize="none"))
        photos = data / "testset"
        decodes = [True]
        if args.camera_size:
            photos = camera_size_copies(photos, work / "camera", tuple(int(v) for v in args.camera_size.split("x")))
            decodes = [False, True]
        for backend in args.backends:
            segmentation = SegmentationOptions(seg_backend="opencv")
            params = None
            if backend in SEGFORMER_SHAPES:
                folder, params = save_random_segformer(work / backend, SEGFORMER_SHAPES[backend])
                seg_dir = work / f"{backend}-onnx"
                export_segmentation(str(folder), None, seg_dir, 17)
                segmentation = SegmentationOptions(seg_backend="onnx", seg_model=str(ExportDir(seg_dir).seg))
            for reduced in decodes:
                rows.append(_timed_row(run_dir, photos, work / f"out-{backend}-{reduced}", onnx_dir, segmentation,
                                       reduced, backend, params, args))
                print(rows[-1], flush=True)
    machine = machine_info()
    table = pd.DataFrame(rows)
    print(f"machine: {describe_machine(machine)}")
    print(table.to_string(index=False))
    table = table.assign(**{key: machine[key] for key in ("cpu_model", "cpu_isa", "threads", "torch", "onnxruntime")})
    if args.output:
        table.to_csv(args.output, index=False)
    return table


if __name__ == "__main__":
    main(get_args_parser().parse_args())
