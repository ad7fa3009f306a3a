"""The one options schema: every flag of every script is declared here once, as a dataclass field with its type, help,
default, choices and range; one generator turns a script's config dataclass into its argparse flags.

- A flag that several scripts take (``--device``, ``--labels_csv``, ``--seg_model``, ...) is one ``Flag`` object, so it
  has one help text and one default everywhere.
- Enumerations (losses, leak policies, W&B modes, ...) are declared here and imported by the library.
- Option groups that a library function takes whole (``PredictionOptions``, ``SegmentationOptions``, ``QuantOptions``,
  ...) are dataclasses here too; a script's config nests them, and the generator flattens them into flags.
- Every value is checked (type, choice, range) when the config is built, before any folder is created; a
  ``--config FILE`` (YAML or JSON) gives defaults for any script, and flags on the command line win.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Optional, Union, get_type_hints

from evaluation.decisions import parse_abstain, parse_operating_points
from utils.cli import str2bool
from utils.errors import UserError

# --- enumerations, declared once -------------------------------------------------------------------------------------
DEVICE_CHOICES = ("auto", "cpu", "cuda")
OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULERS = ("cosine", "step", "none")
LOSSES = ("ce", "focal")
CLASS_WEIGHTS = ("none", "auto")
SAMPLERS = ("auto", "random", "balanced", "softened")
EVAL_CROPS = ("center", "squash", "letterbox")
LEAK_POLICIES = ("warn", "drop", "error")
INPUT_KINDS = ("full_image", "skin_region")
DATA_FORMATS = ("folders", "list_files")  # the readers of dataloaders.prepare.DATASET_READERS
SEG_BACKENDS = ("segformer", "onnx", "opencv")
NO_FACE_POLICIES = ("skip", "full_image")
EPOCH_SELECTIONS = ("one_se", "best")
REFIT_SCHEDULES = ("compressed", "replay")
MONITORS = ("val_balanced_acc", "val_loss")
WANDB_MODES = ("auto", "online", "offline", "disabled")
WEIGHT_CHOICES = ("final", "best", "last")
BACKENDS = ("torch", "onnx", "ort", "executorch")
CAM_METHODS = ("gradcam", "gradcam++", "hirescam", "xgradcam", "layercam", "eigencam", "eigengradcam", "scorecam",
               "ablationcam")
QUANTIZE_CHOICES = ("int8", "none")
EXPORT_TARGETS = ("onnx", "ort", "executorch")
CALIBRATION_METHODS = ("minmax", "entropy", "percentile", "auto")  # auto: each of the three, the fewest float nodes
FLOAT_SELECTIONS = ("prefix", "sensitivity", "divergence")
CALIB_SAMPLINGS = ("balanced", "random")
INT8_TARGET_CPUS = ("any", "vnni")

EXPORT_DIR = "onnx_models"  # quantize_onnx_models.py's output folder, where inference and benchmark look by default
NUM_WORKERS_HELP = ("DataLoader worker processes that decode images, capped at the CPU count; 0 decodes in the main "
                    "process")


# --- one flag's declaration ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Flag:
    """A flag: default, help, and what a valid value is (``choices``; ``check`` with the ``rule`` it enforces)."""

    default: Any
    help: str
    choices: Optional[tuple] = None
    check: Optional[Callable[[Any], bool]] = None
    rule: str = ""  # e.g. "at least 1": the error says "--epochs must be at least 1"
    lower: bool = False  # accept any case, store lower case (--optimizer adamW)
    required: bool = False
    metavar: Optional[str] = None
    aliases: tuple[str, ...] = ()  # older spellings still accepted
    output_folder: bool = False  # a folder the script writes into: naming an existing file is an error

    def field(self) -> Any:
        return field(default=self.default, metadata={"flag": self})


def _opt(default: Any, help: str, choices: Optional[tuple] = None, **extra: Any) -> Any:
    """A flag used by one config only, declared in place."""
    return Flag(default, help, tuple(choices) if choices else None, **extra).field()


def _group(cls: type) -> Any:
    """A nested option group: its fields become flags of the script that nests it."""
    return field(default_factory=cls, metadata={"group": cls})


def at_least(low: float) -> dict[str, Any]:
    return {"check": lambda v: v >= low, "rule": f"at least {low:g}"}


def between(low: float, high: float, *, low_open: bool = False, high_open: bool = False) -> dict[str, Any]:
    def check(v: float) -> bool:
        return (v > low if low_open else v >= low) and (v < high if high_open else v <= high)
    return {"check": check, "rule": f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"}


def _stages(value: Any) -> bool:
    return value == "auto" or (isinstance(value, int) and not isinstance(value, bool) and value >= 0)


# --- flags that several scripts share --------------------------------------------------------------------------------
MODEL_PATH = Flag(None, "run folder written by main.py, or latest = the newest finished run under save_results/",
                  required=True, aliases=("--pytorch_model_path",))
DEVICE = Flag("auto", "where the models run; auto = cuda when a GPU is visible, else cpu", DEVICE_CHOICES)
NUM_WORKERS = Flag(4, NUM_WORKERS_HELP, **at_least(0))
BATCH_SIZE = Flag(32, "images per batch (main.py: per training step)", **at_least(1))
WEIGHTS = Flag("final", "which checkpoint: final = the model the run delivered (the refit on train + validation "
                        "when there was one), best = the best validation epoch, last = the last epoch",
               WEIGHT_CHOICES)
DATA_DIR = Flag(None, "dataset root holding trainset/ and testset/ (main.py: default data/<data_name>_dataset; "
                      "quantize_onnx_models.py, benchmark.py: only if the run's dataset moved since training)")
REDUCED_DECODE = Flag(True, "decode large JPEGs at the smallest DCT scale (1/2, 1/4, 1/8) that still gives the "
                            "model's resize (or the face parser) enough pixels: camera-size photos decode several "
                            "times faster; False decodes every pixel")
TTA = Flag(None, "average each image's logits with its mirror image's (horizontal flip). main.py tests the run "
                 "with it and records it as inference's default; inference uses what the run recorded "
                 "(class_info.json 'tta') unless told (default: on in main.py)")
LABELS_CSV = Flag(None, "CSV of labels instead of class folders (e.g. HAM10000 metadata): one row per image with a "
                        "file column and a label column, optionally group and split columns. main.py and "
                        "audit_dataset.py read the images under --data_dir from it; inference scores against it")
CSV_FILE_COLUMN = Flag("filename", "--labels_csv column naming the image (path, file name or name without extension)")
CSV_LABEL_COLUMN = Flag("label", "--labels_csv column holding the class name")
CSV_GROUP_COLUMN = Flag(None, "--labels_csv column holding the patient or lesion id: groups stay on one side of "
                              "the validation split and intervals resample whole groups")
CSV_SPLIT_COLUMN = Flag(None, "--labels_csv column saying train or test (default: the trainset/ or testset/ folder "
                              "the image sits in)")
METADATA = Flag(None, "CSV with a filename column and columns such as fitzpatrick, sex, age_group, site, device: "
                      "the test report adds per-subgroup metrics with intervals (subgroup_metrics.csv)")
OPERATING_POINT = Flag(None, "screening thresholds chosen on the run's held-out predictions, e.g. "
                             "'malignant:sensitivity=0.95' (or specificity=; comma-separated for several classes); "
                             "adds flag_<class> columns. main.py records them with the run; inference chooses new "
                             "ones instead of the run's")
ABSTAIN = Flag(None, "answer 'uncertain' below a confidence chosen on the run's held-out predictions: accuracy=0.95 "
                     "(that accurate where it answers) or coverage=0.8 (answer 80%%). main.py records it with the "
                     "run; inference chooses a new one instead of the run's")
# 40: the threshold measured on real photos (docs/measurements_accuracy.md, the data audit section).
NEAR_DUP_THRESHOLD = Flag(40, "perceptual-hash distance (bits of 256) at or below which the audit counts two images "
                              "as copies", **between(0, 256))
TINY_SIDE = Flag(224, "images whose shorter side is below this many pixels count as tiny (main.py uses --img_size)",
                 **at_least(1))
SEG_BACKEND = Flag("segformer", "face parser: segformer (transformers), onnx (exported seg_model.onnx) or opencv "
                                "(Haar face + skin colour heuristic, no weights)", SEG_BACKENDS)
SEG_MODEL = Flag(None, "face parser model: segformer backend, a Hugging Face id or local folder (default "
                       "jonathandinu/face-parsing); onnx backend, a seg_model.onnx path (default "
                       "onnx_models/seg_model.onnx)")
SEG_REVISION = Flag(None, "Hugging Face revision (commit hash) of --seg_model, to pin the parser")
PARTS = Flag(None, "comma-separated parser labels that count as skin (default: skin,nose)")
OUTPUT = Flag(None, "output folder (audit_dataset.py: default audit_results/<data_dir name>; face_segmentation.py: "
                    "default face_segmentation_results)", output_folder=True)
OUTPUT_DIR = Flag(None, "output folder (quantize_onnx_models.py: default onnx_models; benchmark.py: default "
                        "--onnx_model_dir)", output_folder=True)
CONFIG = Flag(None, "YAML or JSON file of defaults for these flags (names without '--'); command-line flags win")


class Options:
    """Base of every flag dataclass: building one checks each flag's type, choice and range."""

    def __post_init__(self) -> None:
        validate_fields(self)


# --- training (main.py) ----------------------------------------------------------------------------------------------
@dataclass
class TrainConfig:
    # --- the original project's flags and defaults ---
    data_name: str = _opt(None, "dataset name: the run folder is save_results/dataset+<data_name>/... and, without "
                                "--data_dir, the data folder is data/<data_name>_dataset (default: the --data_dir "
                                "folder's name without _dataset, else skin)")
    model_name: str = _opt("efficientnet_b0", "a model from the README table or any timm model name")
    n_class: Optional[int] = _opt(None, "number of classes; checked against the class folders (default: inferred)",
                                  **at_least(2))
    epochs: int = _opt(12, "training epochs (the learning-rate schedule spans them; early stopping may end sooner)",
                       **at_least(1))
    batch_size: int = BATCH_SIZE.field()
    img_size: int = _opt(224, "input resolution (square) fed to the model", **at_least(16))
    lr_ae: float = _opt(0.001, "peak learning rate", check=lambda v: v > 0, rule="positive")
    optimizer: str = _opt("adamw", "optimizer", OPTIMIZERS, lower=True)
    pre_trained: bool = _opt(True, "start from ImageNet weights (True/False)")
    random_state: int = _opt(42, "seed for the split, initialisation, shuffling and augmentation")

    # --- data ---
    data_dir: Optional[str] = DATA_DIR.field()
    data_format: str = _opt("folders", "how the data folder lists its images: folders = trainset/<class>/*.jpg (or "
                                       "trainset/<class>.<n>.jpg); list_files = trainset.txt and testset.txt with "
                                       "'<image path> <class>' lines", DATA_FORMATS)
    val_ratio: float = _opt(0.2, "share of trainset held out (stratified) for validation",
                            **between(0, 1, low_open=True, high_open=True))
    num_workers: int = NUM_WORKERS.field()
    randaugment: bool = _opt(False, "add RandAugment (rand-m9-mstd0.5) to the training augmentation")
    color_jitter: float = _opt(0.2, "brightness/contrast/saturation jitter strength (no hue shift: colour is "
                                    "diagnostic)", **at_least(0))
    vflip: float = _opt(0.0, "vertical flip probability (0.5 suits dermoscopy; keep 0 for upright face photos)",
                        **between(0, 1))
    min_crop_scale: float = _opt(0.25, "smallest area share kept by the random resized crop, so lesions stay in view",
                                 **between(0, 1, low_open=True))
    eval_crop: str = _opt("center", "how validation, test, inference and ONNX export fit a photo into the square "
                                    "input: center = resize the short side and cut the centre (crop_pct), squash = "
                                    "resize both sides (whole photo, aspect changed), letterbox = resize the long "
                                    "side and pad (whole photo, aspect kept)", EVAL_CROPS)
    crop_pct: Optional[float] = _opt(None, "share of the resized image the eval crop keeps (default: the model's "
                                           "pretrained value, e.g. 0.875)", **between(0, 1, low_open=True))
    audit: bool = _opt(True, "audit the dataset before training: exact and near-duplicate images, label conflicts, "
                             "train/test leakage, image sizes, size/format shortcuts (data_audit.json, duplicates.csv "
                             "in the run folder; copies found are kept on one side of the validation split)")
    on_leak: str = _opt("warn", "what to do when the audit finds copies of a test image in trainset or copies filed "
                                "under different classes: warn, drop (remove the trainset copies of test images and "
                                "every copy of a conflicting image, listed in data_audit.json) or error",
                        LEAK_POLICIES)
    near_dup_threshold: int = NEAR_DUP_THRESHOLD.field()
    labels_csv: Optional[str] = LABELS_CSV.field()
    csv_file_column: str = CSV_FILE_COLUMN.field()
    csv_label_column: str = CSV_LABEL_COLUMN.field()
    csv_group_column: Optional[str] = CSV_GROUP_COLUMN.field()
    csv_split_column: Optional[str] = CSV_SPLIT_COLUMN.field()
    groups: Optional[str] = _opt(None, "CSV with columns filename,group (patient or lesion id): the validation "
                                       "split and folds never split a group, groups shared by trainset and testset "
                                       "are reported, and test intervals resample whole groups")
    group_pattern: Optional[str] = _opt(None, "regular expression whose first capture group, searched in each file "
                                              "name, is the image's group (e.g. '^(P\\d+)_'); instead of --groups")
    cache_images: bool = _opt(False, "keep each training/validation/test photo's decode (reduced-size for large JPEGs) "
                                     "in a cache so later epochs and runs skip decoding: for folders of camera-size "
                                     "photos; whole-photo runs only")
    cache_dir: Optional[str] = _opt(None, "where --cache_images keeps them (default: <data_dir>/.image_cache)",
                                    output_folder=True)
    mixup: float = _opt(0.0, "mixup alpha (timm Mixup; 0 = off)", **at_least(0))
    cutmix: float = _opt(0.0, "cutmix alpha (timm Mixup; 0 = off)", **at_least(0))
    input_kind: str = _opt("full_image", "train on whole photos, or on the face's skin region made by the face "
                                         "parser (masks cached in <data_dir>/.skin_masks/)", INPUT_KINDS)
    seg_backend: str = SEG_BACKEND.field()
    seg_model: Optional[str] = SEG_MODEL.field()
    seg_revision: Optional[str] = SEG_REVISION.field()
    parts: Optional[str] = PARTS.field()

    # --- model ---
    pretrained_path: Optional[str] = _opt(None, "local .pth/.pt/.safetensors file with ImageNet (or your own) weights")
    drop_rate: float = _opt(0.2, "dropout before the classifier", **between(0, 1, high_open=True))

    # --- optimisation ---
    scheduler: str = _opt("cosine", "learning-rate schedule", SCHEDULERS)
    warmup_epochs: int = _opt(1, "linear warm-up epochs (cosine and step)", **at_least(0))
    step_size: int = _opt(10, "epochs between learning-rate decays (step schedule)", **at_least(1))
    step_gamma: float = _opt(0.1, "decay factor (step schedule)", **between(0, 1, low_open=True))
    weight_decay: float = _opt(0.01, "weight decay (not applied to biases and norm layers)", **at_least(0))
    layer_decay: Optional[float] = _opt(None, "layer-wise learning-rate decay (e.g. 0.75: each earlier block learns "
                                              "at 0.75x the next one's rate; default off)",
                                        **between(0, 1, low_open=True))
    momentum: float = _opt(0.9, "momentum (sgd)", **between(0, 1, high_open=True))
    label_smoothing: float = _opt(0.1, "label smoothing (cross-entropy and focal loss)",
                                  **between(0, 1, high_open=True))
    loss: str = _opt("ce", "training loss: cross-entropy or focal loss", LOSSES)
    focal_gamma: float = _opt(2.0, "focal loss focusing parameter (0 = cross-entropy)", **at_least(0))
    class_weights: str = _opt("none", "per-class loss weights (focal: alpha): none, or auto = inverse class "
                                      "frequency n/(K*count)", CLASS_WEIGHTS)
    sampler: str = _opt("auto", "training batches: random shuffling; balanced = a weighted sampler that draws "
                                "every class equally often; softened = each class drawn in proportion to its image "
                                "count to the power --sampler_power; auto = when the largest training class has "
                                "at least 1.5x the images of the smallest: random batches with --logit_adjustment "
                                "1.0 if a class has fewer than 80 images, else balanced (random batches and no "
                                "addition when --logit_adjustment or --class_weights auto is given)", SAMPLERS)
    sampler_power: float = _opt(0.5, "--sampler softened: a class is drawn in proportion to count**power (0 = "
                                     "balanced, 1 = random; 0.5 = square-root sampling)", **between(0, 1))
    logit_adjustment: float = _opt(0.0, "logit-adjusted loss (Menon et al. 2021): training adds tau * log(class "
                                        "prior) to the logits, so the plain logits the model outputs favour no "
                                        "class for being frequent; tau (1.0 in the paper), 0 = off (--sampler "
                                        "auto turns it on for some imbalanced sets; see --sampler)",
                                   **between(0, 3))
    model_ema: bool = _opt(True, "evaluate, save and export an exponential moving average of the weights (timm "
                                 "ModelEmaV3 with warm-up, so it also works for short fine-tunes)")
    model_ema_decay: float = _opt(0.998, "EMA decay ceiling (the warm-up starts lower)",
                                  **between(0, 1, low_open=True, high_open=True))
    refit: bool = _opt(True, "after the best epoch is chosen on validation, retrain from the same start on trainset + "
                             "validation for that many epochs and deliver that model (True/False)")
    folds: int = _opt(0, "K-fold cross-validation of the trainset instead of one validation split: K models give "
                         "out-of-fold metrics and the calibration set, then one refit on the whole trainset for the "
                         "median best epoch is delivered (K+1 trainings; 0 = off)",
                      check=lambda v: v == 0 or v >= 2,
                      rule="at least 2 (use at least 2 folds, or 0 for one validation split)")
    tta: bool = TTA.field()
    calibrate: bool = _opt(True, "fit temperature scaling on held-out validation predictions after training; the "
                                 "temperature stays 1.0 unless it lowers cross-validated NLL (True/False)")
    operating_point: Optional[str] = OPERATING_POINT.field()
    abstain: Optional[str] = ABSTAIN.field()
    metadata: Optional[str] = METADATA.field()
    epoch_selection: str = _opt("one_se", "which validated epoch to keep (and refit for): one_se = the latest epoch "
                                          "whose --monitor is within one standard error of the best (a difference "
                                          "smaller than the validation noise is a tie, and the later epoch is the "
                                          "better-trained one), best = the highest score", EPOCH_SELECTIONS)
    refit_schedule: str = _opt("compressed", "learning-rate schedule of the refit: compressed = warm-up and decay "
                                             "over the refit's own epochs (ends at the low rate), replay = the "
                                             "selection phase's --epochs schedule stopped at the selected epoch",
                               REFIT_SCHEDULES)
    patience: int = _opt(10, "early stopping: epochs without a newly selected epoch (see --epoch_selection) "
                             "(0 disables)", **at_least(0))
    monitor: str = _opt("val_balanced_acc", "validation metric that picks model_best.pth and drives early stopping",
                        MONITORS)

    # --- runtime ---
    device: str = DEVICE.field()
    amp: bool = _opt(True, "mixed precision on CUDA (bf16 where supported, else fp16); ignored on CPU")
    deterministic: bool = _opt(False, "deterministic kernels (slower on GPU; see REPRODUCIBILITY.md)")
    save_dir: str = _opt("save_results", "root folder for run folders", output_folder=True)
    wandb: str = _opt("auto", "Weights & Biases logging: auto = online when logged in, else offline into the run "
                              "folder; never blocks or fails training", WANDB_MODES)
    wandb_project: str = _opt("skinclf", "W&B project name")
    resume: Optional[str] = _opt(None, "run folder to continue from its model_last.pth, with its saved config; "
                                       "only --epochs, --patience, --device, --num_workers, --amp and --wandb may "
                                       "change")
    config: Optional[str] = CONFIG.field()

    def __post_init__(self) -> None:
        if self.tta is None:  # one --tta flag serves training (default on) and inference (default: the run's)
            self.tta = True
        if self.data_name is None:  # `--data_dir ../dogcat` files its runs under dataset+dogcat, not dataset+skin
            self.data_name = data_name_of(self.data_dir)
        self.validate()

    def validate(self) -> None:
        validate_fields(self)
        parse_operating_points(self.operating_point)  # syntax and ranges; class names are checked against the data
        parse_abstain(self.abstain)
        checks = [
            (not (self.mixup or self.cutmix) or self.batch_size % 2 == 0,
             "--mixup/--cutmix need an even --batch_size"),
            (not (self.mixup or self.cutmix) or (self.loss == "ce" and self.class_weights == "none"),
             "--mixup/--cutmix train on mixed (soft) labels: use them with --loss ce --class_weights none "
             "(--sampler balanced still balances the classes)"),
            (not (self.groups and self.group_pattern), "give --groups or --group_pattern, not both"),
            (not (self.labels_csv and self.data_format != "folders"),
             "--labels_csv lists the images itself; leave --data_format at folders"),
            (not (self.csv_group_column and (self.groups or self.group_pattern)),
             "give groups once: --csv_group_column, --groups or --group_pattern"),
        ]
        for ok, message in checks:
            if not ok:
                raise UserError(message)

    @property
    def resolved_data_dir(self) -> Path:
        return Path(self.data_dir) if self.data_dir else Path("data") / f"{self.data_name}_dataset"

    def data_spec(self) -> DataSpec:
        return DataSpec(self.resolved_data_dir, self.data_format, self.n_class, self.labels_csv,
                        (self.csv_file_column, self.csv_label_column, self.csv_group_column, self.csv_split_column),
                        self.groups, self.group_pattern, self.val_ratio, self.folds, self.random_state, self.audit,
                        self.on_leak, self.near_dup_threshold, self.img_size, self.operating_point, self.metadata)

    def optimizer_spec(self) -> OptimizerSpec:
        return OptimizerSpec(self.optimizer, self.lr_ae, self.weight_decay, self.momentum, self.layer_decay)

    def schedule_spec(self) -> ScheduleSpec:
        return ScheduleSpec(self.scheduler, self.lr_ae, self.epochs, self.warmup_epochs, self.step_size,
                            self.step_gamma)

    def segmentation(self) -> SegmentationOptions:
        return SegmentationOptions(self.seg_backend, self.seg_model, self.seg_revision, self.parts)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise UserError(f"unknown config keys {unknown}; valid keys are the flags of main.py --help")
        return cls(**values)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "TrainConfig":
        return from_namespace(cls, args)


def data_name_of(data_dir: Optional[str]) -> str:
    """The dataset name a folder stands for: ``data/demo_dataset`` -> demo, ``../dogcat`` -> dogcat; skin without
    a folder."""
    if not data_dir or not isinstance(data_dir, str):
        return "skin"
    name = Path(data_dir).name or Path(data_dir).resolve().name
    return name[:-len("_dataset")] if name.endswith("_dataset") and len(name) > len("_dataset") else (name or "skin")


# --- what the training run hands the layers below it (typed views of TrainConfig, not flags) --------------------------
@dataclass(frozen=True)
class DataSpec:
    """What the data layer needs to find, audit and split a training set (dataloaders.prepare)."""

    root: Path
    data_format: str
    n_class: Optional[int]
    labels_csv: Optional[str]
    csv_columns: tuple[str, str, Optional[str], Optional[str]]  # file, label, group, split
    groups: Optional[str]
    group_pattern: Optional[str]
    val_ratio: float
    folds: int
    random_state: int
    audit: bool
    on_leak: str
    near_dup_threshold: int
    tiny_side: int  # images smaller than the model's input count as tiny in the audit
    operating_point: Optional[str]  # names classes: checked against the data before training
    metadata: Optional[str]  # names files: checked against the data before training


@dataclass(frozen=True)
class OptimizerSpec:
    """The optimizer (torch_trainer.optim.build_optimizer)."""

    name: str
    lr: float
    weight_decay: float
    momentum: float
    layer_decay: Optional[float]


@dataclass(frozen=True)
class ScheduleSpec:
    """The per-step learning-rate schedule (torch_trainer.optim.build_scheduler)."""

    name: str
    lr: float
    epochs: int
    warmup_epochs: int
    step_size: int
    step_gamma: float


# --- option groups that library functions take -----------------------------------------------------------------------
@dataclass(frozen=True)
class AnswerOptions(Options):
    """How the model answers one image (prediction.engine, serving): shared by both inference scripts and serve.py."""

    weights: str = WEIGHTS.field()
    backend: str = _opt("torch", "run the classifier with PyTorch, ONNX Runtime (an .onnx file), ONNX Runtime "
                                 "Mobile's format (an .ort file) or ExecuTorch (a .pte file); the phone formats come "
                                 "from quantize_onnx_models.py --targets onnx,ort,executorch: check a phone model on a "
                                 "labelled folder before shipping it", BACKENDS)
    onnx_model: Optional[str] = _opt(None, "exported classifier for --backend onnx, ort or executorch (default: "
                                           "onnx_models/clf_model.onnx for onnx, onnx_models/clf_model_int8.ort "
                                           "for ort, onnx_models/clf_model_int8.pte for executorch)",
                                     aliases=("--model_file",))
    device: str = DEVICE.field()
    tta: Optional[bool] = TTA.field()
    topk: int = _opt(1, "also list the k most likely classes per image in the JSON", **at_least(1))
    cam_method: str = _opt("gradcam", "pytorch-grad-cam method", CAM_METHODS)
    reduced_decode: bool = REDUCED_DECODE.field()
    overlay_max_side: int = _opt(1024, "Grad-CAM overlays of larger photos are written with the longer side shrunk "
                                       "to this many pixels (same aspect ratio); 0 = the photo's full size",
                                 **at_least(0))
    operating_point: Optional[str] = OPERATING_POINT.field()
    abstain: Optional[str] = ABSTAIN.field()

    def __post_init__(self) -> None:
        super().__post_init__()
        parse_operating_points(self.operating_point)
        parse_abstain(self.abstain)


@dataclass(frozen=True)
class PredictionOptions(AnswerOptions):
    """How to classify a folder (prediction.engine): the flags inference.py and inference_with_segmentation.py share."""

    generate_gradcam: bool = _opt(False, "save a Grad-CAM overlay per image")


@dataclass(frozen=True)
class ReferenceOptions(Options):
    """Where a scored folder's true labels come from (inference on a labelled folder)."""

    labels_from_folders: bool = _opt(False, "the folder is labelled (<class>/ sub-folders named like the training "
                                            "classes): also write metrics.json, per_class_metrics.csv, ROC, "
                                            "reliability and confusion matrix")
    labels_csv: Optional[str] = LABELS_CSV.field()
    csv_file_column: str = CSV_FILE_COLUMN.field()
    csv_label_column: str = CSV_LABEL_COLUMN.field()
    csv_group_column: Optional[str] = CSV_GROUP_COLUMN.field()
    metadata: Optional[str] = METADATA.field()

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.labels_from_folders and self.labels_csv:
            raise UserError("give --labels_from_folders or --labels_csv, not both")
        if self.metadata and not (self.labels_from_folders or self.labels_csv):
            raise UserError("--metadata splits the metrics of a labelled folder: add --labels_from_folders or "
                            "--labels_csv")


@dataclass(frozen=True)
class SegmentationOptions(Options):
    """The face parser (segmentation.face_parsing) and which of its labels count as skin."""

    seg_backend: str = SEG_BACKEND.field()
    seg_model: Optional[str] = SEG_MODEL.field()
    seg_revision: Optional[str] = SEG_REVISION.field()
    parts: Optional[str] = PARTS.field()


@dataclass(frozen=True)
class QuantOptions(Options):
    """INT8 quantization (deploy.onnx_quant)."""

    calib_images: int = _opt(200, "training images used to calibrate INT8 activations", **at_least(1))
    calib_sampling: str = _opt("balanced", "how the calibration images are drawn from the training split: balanced "
                                           "= the same number from every class (seeded), random = in proportion",
                               CALIB_SAMPLINGS)
    calibrate_method: str = _opt("minmax", "how ONNX Runtime turns calibration activations into INT8 ranges: minmax "
                                           "(full range), entropy or percentile (clip outliers); auto = try all three "
                                           "and keep the one that reaches --min_agreement with the fewest FP32 nodes",
                                 CALIBRATION_METHODS)
    bias_correction: bool = _opt(True, "move the bias of each INT8 convolution by the mean shift that rounding its "
                                       "weights causes in its output on the calibration images (True/False); nodes "
                                       "left in FP32 keep their own bias")
    pixel_exact_input: bool = _opt(True, "move the INT8 input's grid by half a step so that every 8-bit pixel value "
                                         "is quantized exactly, and the first convolution's bias back (True/False); "
                                         "applies when every channel has the same mean and std (EfficientNet-Lite: "
                                         "0.5), where the calibrated grid rounds every pixel by half a step")
    int8_target_cpu: str = _opt(
        "any", "CPUs on which the INT8 file must give the answers the export checked: any = the weights of the "
               "convolutions and matrix products that ONNX Runtime runs on its u8s8 matrix kernels get, per output "
               "channel, the finest scale at which no two neighbouring weights overflow a 16-bit sum (between 7 and "
               "8 bits), because x86 CPUs without VNNI (AVX2; AVX-512 without VNNI) add pairs of uint8 x int8 "
               "products in 16 bits; depthwise convolutions keep 8 bits (their kernel adds in 32 bits); vnni = "
               "8-bit weights everywhere, a little more precise, for CPUs with VNNI or AMX "
               "(Intel Xeon since Cascade Lake, Core since Ice Lake; AMD since Zen 4) and ARM: on a CPU without VNNI "
               "its answers change (inference warns)", INT8_TARGET_CPUS)
    float_selection: str = _opt(
        "prefix", "which parts stay FP32 when INT8 misses --min_agreement: prefix = whole leading stages, one more at "
                  "a time (on real photos it kept the most FP32 answers on images the search never saw); "
                  "sensitivity = the blocks, then nodes, whose FP32 copy brings the validation answers back, until "
                  "the agreement holds (a far smaller FP32 part, but it fits the validation images: fewer answers "
                  "kept on new ones); divergence = the same search with the blocks ordered by how far their FP32 "
                  "copy lowers the divergence of all validation answers from FP32's, not by the few answers it "
                  "turns back", FLOAT_SELECTIONS)
    keep_float_stages: Union[str, int] = _opt(
        "auto", "leading stages (timm feature levels) left in FP32 in the INT8 model from the start; auto: those up "
                "to stride 8 for SiLU/hard-swish models, whose quantized activations cost more than the INT8 "
                "convolutions save there, and 0 otherwise", check=_stages, rule="'auto' or a stage count of 0 or more",
        metavar="auto|N")
    min_agreement: float = _opt(0.99, "share of the run's validation images on which the INT8 model must give the "
                                      "FP32 model's top-1 class; below it more of the model stays FP32 (see "
                                      "--float_selection) until it does; 0 turns the check off", **between(0, 1),
                                metavar="0..1")
    check_views: int = _opt(1, "views of each validation image the agreement check scores: 1 = the image as the "
                               "model sees it; up to 8 adds its mirror, shifted and zoomed copies, so the check and "
                               "the search of FP32 parts count the near ties of more inputs than a small "
                               "validation split holds (the search takes as many times longer)", **between(1, 8),
                          metavar="1..8")
    max_float_share: float = _opt(0.10, "share of the graph's nodes that may stay FP32 before the INT8 file counts "
                                        "as mostly float: the export warns, and --qat_epochs (when set) fine-tunes "
                                        "for quantization instead", **between(0, 1), metavar="0..1")
    qat_epochs: int = _opt(0, "quantization-aware fine-tuning: when post-training INT8 needs more than "
                              "--max_float_share of the nodes in FP32, fine-tune a copy of the model for this many "
                              "passes over mirrored, shifted and zoomed training images with simulated "
                              "INT8 (taught by the FP32 model's answers), keep the pass whose simulated INT8 agrees "
                              "best with FP32 on the agreement check's images (the delivered weights if none), "
                              "quantize that and keep whichever file needs fewer FP32 nodes (with "
                              "--max_float_share 0: tune in every case); 0 = off", **at_least(0))


@dataclass(frozen=True)
class ExportOptions(Options):
    """What quantize_onnx_models.py exports from a run (deploy.onnx_export), bar the face parser."""

    weights: str = WEIGHTS.field()
    opset: int = _opt(17, "ONNX opset", **at_least(7))
    quantize: str = _opt("int8", "also write the verified INT8 model (int8) or only FP32 (none)", QUANTIZE_CHOICES)
    targets: str = _opt("onnx", "comma-separated formats to write: onnx (always), ort = ONNX Runtime Mobile's ORT "
                                "format (.ort, verified against the .onnx) with required_operators.config for a "
                                "reduced Android/iOS build, executorch = ExecuTorch programs for XNNPACK (.pte, "
                                "FP32 and INT8, verified by ExecuTorch's runtime); either also writes "
                                "mobile_manifest.json (preprocessing, classes, thresholds for an app)",
                        check=lambda v: isinstance(v, str) and bool(v.strip()) and set(
                            t.strip() for t in v.split(",")) <= set(EXPORT_TARGETS),
                        rule=f"comma-separated, from {', '.join(EXPORT_TARGETS)}")
    verify_images: int = _opt(0, "test images for the parity/accuracy checks; 0 = the whole test split",
                              **at_least(0))
    data_dir: Optional[str] = DATA_DIR.field()
    quant: QuantOptions = _group(QuantOptions)

    @property
    def target_list(self) -> tuple[str, ...]:
        return tuple(t.strip() for t in self.targets.split(",") if t.strip())


@dataclass(frozen=True)
class BenchmarkOptions(Options):
    """How benchmark.py times the frameworks (deploy.benchmarking)."""

    batch_sizes: str = _opt("1,32", "comma-separated batch sizes", check=lambda v: bool(re.fullmatch(
        r"\s*[1-9]\d*\s*(,\s*[1-9]\d*\s*)*", v)), rule="comma-separated positive integers such as 1,32")
    iterations: int = _opt(100, "timed runs per batch size", **at_least(1))
    warmup: int = _opt(10, "untimed runs first", **at_least(0))
    rounds: int = _opt(3, "alternating rounds of fresh processes; each framework keeps its fastest round, so a burst "
                          "of load from other programs does not decide the comparison", **at_least(1))
    threads: int = _opt(0, "intra-op threads for every framework; 0 = all cores", **at_least(0))
    device: str = DEVICE.field()
    eval_images: int = _opt(0, "test images for the accuracy columns; 0 = the whole test split", **at_least(0))
    data_dir: Optional[str] = DATA_DIR.field()

    @property
    def batch_size_list(self) -> tuple[int, ...]:
        return tuple(int(b) for b in self.batch_sizes.split(",") if b.strip())

    @property
    def thread_count(self) -> int:
        return self.threads or os.cpu_count() or 1


# --- the other scripts' configs --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class InferenceConfig(Options):
    """inference.py."""

    DEFAULT_OUTPUT: ClassVar[str] = "inference_results"

    model_path: str = MODEL_PATH.field()
    inference_folder: str = _opt("inference_set", "folder of images (searched recursively) or one image file")
    inference_output: Optional[str] = _opt(None, "output folder (default: inference_results; "
                                                 "inference_with_segmentation.py: inference_results_segmented)",
                                           output_folder=True)
    batch_size: int = BATCH_SIZE.field()
    num_workers: int = NUM_WORKERS.field()
    prediction: PredictionOptions = _group(PredictionOptions)
    reference: ReferenceOptions = _group(ReferenceOptions)
    config: Optional[str] = CONFIG.field()

    @property
    def output_folder(self) -> Path:
        return Path(self.inference_output or self.DEFAULT_OUTPUT)


@dataclass(frozen=True)
class SegmentedInferenceConfig(InferenceConfig):
    """inference_with_segmentation.py: inference.py's flags plus the face parser's."""

    DEFAULT_OUTPUT: ClassVar[str] = "inference_results_segmented"

    segmentation: SegmentationOptions = _group(SegmentationOptions)
    no_face_policy: str = _opt("full_image", "when no face is found: classify the whole photo (as training does) or "
                                             "skip it and list it in skipped.csv", NO_FACE_POLICIES)
    save_segmented: bool = _opt(True, "save each classifier input under segmented/")


@dataclass(frozen=True)
class FaceSegmentationConfig(Options):
    """face_segmentation.py."""

    DEFAULT_OUTPUT: ClassVar[str] = "face_segmentation_results"

    input: str = _opt(None, "an image or a folder of images (searched recursively)", required=True)
    output: Optional[str] = OUTPUT.field()
    segmentation: SegmentationOptions = _group(SegmentationOptions)
    device: str = DEVICE.field()
    reduced_decode: bool = REDUCED_DECODE.field()
    config: Optional[str] = CONFIG.field()

    @property
    def output_folder(self) -> Path:
        return Path(self.output or self.DEFAULT_OUTPUT)


@dataclass(frozen=True)
class ExportConfig(Options):
    """quantize_onnx_models.py."""

    DEFAULT_OUTPUT: ClassVar[str] = EXPORT_DIR

    model_path: str = MODEL_PATH.field()
    output_dir: Optional[str] = OUTPUT_DIR.field()
    skip_segmentation: Optional[bool] = _opt(None, "export the classifier only (True), or also the SegFormer face "
                                                    "parser (False); default: the parser too for a run trained on "
                                                    "skin regions with SegFormer, or when --seg_model names one")
    seg_model: Optional[str] = SEG_MODEL.field()
    seg_revision: Optional[str] = SEG_REVISION.field()
    export: ExportOptions = _group(ExportOptions)
    config: Optional[str] = CONFIG.field()

    @property
    def output_folder(self) -> Path:
        return Path(self.output_dir or self.DEFAULT_OUTPUT)


@dataclass(frozen=True)
class BenchmarkConfig(Options):
    """benchmark.py."""

    model_path: str = MODEL_PATH.field()
    onnx_model_dir: str = _opt(EXPORT_DIR, "folder written by quantize_onnx_models.py")
    output_dir: Optional[str] = OUTPUT_DIR.field()
    benchmark: BenchmarkOptions = _group(BenchmarkOptions)
    config: Optional[str] = CONFIG.field()

    @property
    def output_folder(self) -> Path:
        return Path(self.output_dir or self.onnx_model_dir)


@dataclass(frozen=True)
class AuditConfig(Options):
    """audit_dataset.py."""

    data_dir: Optional[str] = DATA_DIR.field()
    output: Optional[str] = OUTPUT.field()
    near_dup_threshold: int = NEAR_DUP_THRESHOLD.field()
    labels_csv: Optional[str] = LABELS_CSV.field()
    csv_file_column: str = CSV_FILE_COLUMN.field()
    csv_label_column: str = CSV_LABEL_COLUMN.field()
    csv_group_column: Optional[str] = CSV_GROUP_COLUMN.field()
    csv_split_column: Optional[str] = CSV_SPLIT_COLUMN.field()
    tiny_side: int = TINY_SIDE.field()
    num_workers: int = NUM_WORKERS.field()
    config: Optional[str] = CONFIG.field()

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.data_dir:
            raise UserError("--data_dir is required: the dataset root (trainset/, testset/) or a folder of class "
                            "folders")

    @property
    def output_folder(self) -> Path:
        return Path(self.output) if self.output else Path("audit_results") / Path(self.data_dir).resolve().name


@dataclass(frozen=True)
class ServeOptions(Options):
    """How serve.py listens, batches and guards (serving.app, serving.batching)."""

    host: str = _opt("127.0.0.1", "address to listen on; 127.0.0.1 answers this machine only, 0.0.0.0 every network "
                                  "interface (then give --api_key_file)")
    port: int = _opt(8000, "TCP port", **between(1, 65535))
    api_key_file: Optional[str] = _opt(None, "file holding the API key (one line); /v1/ requests must then send it "
                                             "as the X-API-Key header")
    max_batch_size: int = _opt(16, "images classified together in one forward pass at most (micro-batching)",
                               **at_least(1))
    max_wait_ms: float = _opt(5.0, "how long the first image of a batch waits for others to join it (only while "
                                   "other requests are still decoding theirs)",
                              **between(0, 10000))
    queue_size: int = _opt(256, "images waiting for the model at most; past that requests get 503 with Retry-After",
                           **at_least(1))
    request_timeout_s: float = _opt(30.0, "a request still unanswered after this many seconds gets 504",
                                    **between(0, 3600, low_open=True))
    max_upload_mb: float = _opt(20.0, "largest request body in MB (all images of a request together); larger gets 413",
                                **between(0, 1024, low_open=True))
    max_images_per_request: int = _opt(16, "images one request may carry", **at_least(1))
    explain: Optional[bool] = _opt(None, "serve /v1/explain (Grad-CAM from the run's PyTorch weights); default: "
                                         "when --model_path is a run folder")
    threads: int = _opt(0, "intra-op threads of the model; 0 = all cores", **at_least(0))
    graceful_timeout_s: float = _opt(30.0, "on Ctrl-C or SIGTERM, wait this long for requests in flight to finish",
                                     **at_least(0))


@dataclass(frozen=True)
class ServeConfig(Options):
    """serve.py."""

    model_path: str = _opt(None, "run folder written by main.py (latest = the newest finished run), or an export "
                                 "folder written by quantize_onnx_models.py (serves its INT8 model, else FP32)",
                           required=True)
    answer: AnswerOptions = _group(AnswerOptions)
    serve: ServeOptions = _group(ServeOptions)
    config: Optional[str] = CONFIG.field()


@dataclass(frozen=True)
class SweepOptions(Options):
    """run_experiments.py's own flags (beside main.py's, which give every run's defaults)."""

    template: str = _opt("run_experiments_template.py", "Python file with BASE/GRID/RUNS, or YAML with base:/grid:/"
                                                        "runs:")
    sweep_dir: str = _opt("experiments", "state and summary files", output_folder=True)
    dry_run: bool = _opt(False, "validate and list the runs, train nothing")
    latency_iterations: int = _opt(20, "batch-1 CPU forward passes per model for the latency column", **at_least(1))


# --- validation ------------------------------------------------------------------------------------------------------
def _kinds(annotation: Any) -> tuple[type, ...]:
    """The Python types a field accepts (``Optional[int]`` -> ``(int, NoneType)``)."""
    args = typing.get_args(annotation)
    return tuple(_kinds(a)[0] if typing.get_args(a) else a for a in args) if args else (annotation,)


def _type_error(name: str, value: Any, kinds: tuple[type, ...]) -> Optional[str]:
    if value is None:
        return None if type(None) in kinds else f"--{name} needs a value"
    if isinstance(value, bool):
        return None if bool in kinds else f"--{name} {value!r}: expected {_kind_words(kinds)}"
    if isinstance(value, int) and (int in kinds or float in kinds):
        return None
    if isinstance(value, float) and float in kinds:
        return None if math.isfinite(value) else f"--{name} {value!r}: expected a finite number"
    if isinstance(value, str) and str in kinds:
        return None
    return f"--{name} {value!r}: expected {_kind_words(kinds)}"


def _kind_words(kinds: tuple[type, ...]) -> str:
    words = {bool: "True or False", int: "an integer", float: "a number", str: "a text value"}
    return " or ".join(words.get(k, k.__name__) for k in kinds if k is not type(None))


def validate_fields(obj: Any) -> None:
    """Each flag's type, choice and range; the first problem is a one-line UserError naming the flag."""
    hints = get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        flag = f.metadata.get("flag")
        if flag is None:
            continue
        value = getattr(obj, f.name)
        if flag.lower and isinstance(value, str) and value != value.lower():
            value = value.lower()
            object.__setattr__(obj, f.name, value)
        if flag.required and value is None:
            raise UserError(f"--{f.name} is required")
        problem = _type_error(f.name, value, _kinds(hints[f.name]))
        if problem:
            raise UserError(problem)
        if value is None:
            continue
        if flag.choices and value not in flag.choices:
            raise UserError(f"--{f.name} {value!r} is not one of {', '.join(map(str, flag.choices))}")
        if flag.check is not None and not flag.check(value):
            raise UserError(f"--{f.name} {value!r}: must be {flag.rule}")
        if flag.output_folder and Path(value).exists() and not Path(value).is_dir():
            raise UserError(f"--{f.name} {value} is a file; give a folder to write into")


# --- the generator ---------------------------------------------------------------------------------------------------
def _argparse_type(kinds: tuple[type, ...], flag: Flag) -> Callable[[str], Any]:
    if flag.lower:
        return lambda s: str(s).lower()
    if int in kinds and str in kinds:  # "auto" or a count
        return lambda s: int(s) if s.strip().lstrip("-").isdigit() else s
    for kind in (int, float, str):
        if kind in kinds:
            return kind
    return str


def flag_fields(cls: type) -> list[tuple[dataclasses.Field, Flag, Any]]:
    """Every flag of a config, nested groups flattened: (field, flag, annotation)."""
    hints = get_type_hints(cls)
    found = []
    for f in dataclasses.fields(cls):
        if "group" in f.metadata:
            found += flag_fields(f.metadata["group"])
        elif "flag" in f.metadata:
            found.append((f, f.metadata["flag"], hints[f.name]))
    return found


def add_dataclass_arguments(parser: argparse.ArgumentParser, config_cls: type = TrainConfig) -> None:
    """One ``--<field>`` per flag of ``config_cls`` (groups flattened), plus ``--config`` if it has none."""
    fields = flag_fields(config_cls)
    if not any(f.name == "config" for f, _, _ in fields) and "--config" not in parser._option_string_actions:
        fields.append((dataclasses.field(default=None), CONFIG, Optional[str]))
        fields[-1][0].name = "config"
    for f, flag, annotation in fields:
        kinds = _kinds(annotation)
        kwargs: dict[str, Any] = {"default": flag.default, "help": flag.help, "dest": f.name}
        if bool in kinds:
            # nargs='?' keeps both spellings working: `--amp` alone and the original's `--pre_trained True`.
            kwargs.update(type=str2bool, nargs="?", const=True, metavar="True|False")
        else:
            kwargs["type"] = _argparse_type(kinds, flag)
        if flag.choices:
            kwargs["choices"] = list(flag.choices)
        if flag.metavar:
            kwargs["metavar"] = flag.metavar
        if flag.required:
            kwargs["required"] = True
        elif "default" not in flag.help:  # a help text that words its own default keeps it
            kwargs["help"] += " (default: %(default)s)"
        parser.add_argument(f"--{f.name}", *flag.aliases, **kwargs)


def from_namespace(cls: type, args: argparse.Namespace | dict) -> Any:
    """Build (and so validate) ``cls`` from parsed flags, nested groups included."""
    values = vars(args) if isinstance(args, argparse.Namespace) else args
    kwargs = {}
    for f in dataclasses.fields(cls):
        if "group" in f.metadata:
            kwargs[f.name] = from_namespace(f.metadata["group"], values)
        elif f.name in values:
            kwargs[f.name] = values[f.name]
    return cls(**kwargs)


def load_config_file(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file not found: {path}")
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix.lower() == ".json":
            values = json.loads(text)
        else:
            import yaml

            values = yaml.safe_load(text) or {}
    except Exception as err:  # yaml and json raise different types; both mean a malformed file
        raise UserError(f"cannot parse config file {path}: {str(err).splitlines()[0]}") from err
    if not isinstance(values, dict):
        raise UserError(f"config file {path} must hold a mapping of flag names to values")
    return values


def given_flags(parser: argparse.ArgumentParser, argv: list[str]) -> frozenset[str]:
    """The destinations of the flags typed on the command line (abbreviations resolved as argparse does)."""
    options = parser._option_string_actions
    given = set()
    for token in argv:
        if not token.startswith("--") or token == "--":
            continue
        name = token.split("=", 1)[0]
        matches = [name] if name in options else [o for o in options if o.startswith(name)]
        if len({options[m].dest for m in matches}) == 1:
            given.add(options[matches[0]].dest)
    return frozenset(given)


def parse_with_config_file(parser: argparse.ArgumentParser, argv: Optional[list[str]] = None) -> argparse.Namespace:
    """Parse ``argv``; values from ``--config FILE`` become defaults, so flags on the command line still win. The
    namespace's ``given_flags`` names the flags typed on the command line."""
    argv = sys.argv[1:] if argv is None else list(argv)
    pre_parser = argparse.ArgumentParser(add_help=False)
    pre_parser.add_argument("--config", default=None)
    known, _ = pre_parser.parse_known_args(argv)
    if known.config:
        values = load_config_file(known.config)
        valid = {action.dest for action in parser._actions}
        unknown = sorted(set(values) - valid)
        if unknown:
            raise UserError(f"{known.config}: unknown keys {unknown}; use the flag names of --help without '--'")
        parser.set_defaults(**values)
    args = parser.parse_args(argv)
    args.given_flags = given_flags(parser, argv)
    return args
