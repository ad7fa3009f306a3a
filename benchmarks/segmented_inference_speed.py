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
"""

from __future__ import annotations

import argparse
import logging
import tempfile
from pathlib import Path

import pandas as pd


from benchmarks.model_zoo_speed import make_run_folder
from data.synthetic_faces import generate_dataset
from torch_trainer.onnx_export import ExportSettings, export_run, export_segmentation
from torch_trainer.prediction import PredictionOptions
from torch_trainer.segmented_prediction import SegmentationOptions, infer_folder_segmented
from utils.export_dir import ExportDir
from utils.machine import describe_machine, machine_info

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


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("segment + classify throughput", add_help=add_help)
    parser.add_argument("--images", type=int, default=40, help="face photos to classify (default: %(default)s)")
    parser.add_argument("--photo_size", type=int, default=512, help="side of each photo (default: %(default)s)")
    parser.add_argument("--model_name", default="efficientnet_b0", help="classifier (default: %(default)s)")
    parser.add_argument("--img_size", type=int, default=224, help="classifier input (default: %(default)s)")
    parser.add_argument("--backends", nargs="+", default=["opencv", "onnx-tiny", "onnx-b5"],
                        choices=["opencv", "onnx-tiny", "onnx-b5"])
    parser.add_argument("--output", default=None, help="optional CSV for the table")
    return parser


def main(args: argparse.Namespace) -> pd.DataFrame:
    logging.basicConfig(level=logging.WARNING)
    rows = []
    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        data = generate_dataset(work / "faces", n_train=4, n_test=max(1, args.images // 2), img_size=args.photo_size)
        run_dir = make_run_folder(work / "run", args.model_name, data, args.img_size)
        onnx_dir = ExportDir(work / "onnx")
        export_run(run_dir, onnx_dir, ExportSettings(quantize="none"))
        for backend in args.backends:
            segmentation = SegmentationOptions(seg_backend="opencv", save_segmented=False)
            params = None
            if backend in SEGFORMER_SHAPES:
                folder, params = save_random_segformer(work / backend, SEGFORMER_SHAPES[backend])
                seg_dir = work / f"{backend}-onnx"
                export_segmentation(str(folder), None, seg_dir, 17)
                segmentation = SegmentationOptions(seg_backend="onnx", seg_model=str(ExportDir(seg_dir).seg),
                                                   save_segmented=False)
            summary = infer_folder_segmented(run_dir, data / "testset", work / f"out-{backend}",
                                             PredictionOptions(backend="onnx", onnx_model=str(onnx_dir.fp32)),
                                             segmentation, num_workers=0)
            rows.append({"backend": backend, "parser_parameters_m": round(params / 1e6, 2) if params else None,
                         "photos": summary["predicted"], "photo_size": args.photo_size,
                         "classifier": f"{args.model_name}@{args.img_size} onnx",
                         "images_per_s": round(summary["images_per_s"], 2),
                         "faces_found": summary["predicted"] - summary["no_face"]})
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
