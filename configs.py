"""The single source of training options: one dataclass, from which main.py's argparse flags are generated.

Every field becomes ``--<field_name>``; its metadata gives the help text and, where the value is one of a fixed
set, the choices. A ``--config FILE`` (YAML or JSON) supplies defaults; flags given on the command line win.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, get_type_hints

from evaluation.decisions import parse_abstain, parse_operating_points
from utils.cli import DEVICE_CHOICES, NUM_WORKERS_HELP, str2bool  # noqa: F401 - str2bool is re-exported
from utils.errors import UserError


def _opt(default: Any, help: str, choices: Optional[list] = None, **extra: Any) -> Any:
    return field(default=default, metadata={"help": help, "choices": choices, **extra})


@dataclass
class TrainConfig:
    # --- the original project's flags and defaults ---
    data_name: str = _opt("skin", "dataset name; the data folder defaults to data/<data_name>_dataset and the run "
                                  "folder is save_results/dataset+<data_name>/...")
    model_name: str = _opt("efficientnet_b0", "a model from the README table or any timm model name")
    n_class: Optional[int] = _opt(None, "number of classes; checked against the class folders (default: inferred)")
    epochs: int = _opt(12, "training epochs (the learning-rate schedule spans them; early stopping may end sooner)")
    batch_size: int = _opt(32, "images per training step")
    img_size: int = _opt(224, "input resolution (square) fed to the model")
    lr_ae: float = _opt(0.001, "peak learning rate")
    optimizer: str = _opt("adamw", "optimizer", choices=["adam", "adamw", "sgd"], lower=True)
    pre_trained: bool = _opt(True, "start from ImageNet weights (True/False)")
    random_state: int = _opt(42, "seed for the split, initialisation, shuffling and augmentation")

    # --- data ---
    data_dir: Optional[str] = _opt(None, "dataset root holding trainset/ and testset/ (default data/<data_name>_dataset)")
    val_ratio: float = _opt(0.2, "share of trainset held out (stratified) for validation")
    num_workers: int = _opt(4, NUM_WORKERS_HELP)
    randaugment: bool = _opt(False, "add RandAugment (rand-m9-mstd0.5) to the training augmentation")
    color_jitter: float = _opt(0.2, "brightness/contrast/saturation jitter strength (no hue shift: colour is diagnostic)")
    vflip: float = _opt(0.0, "vertical flip probability (0.5 suits dermoscopy; keep 0 for upright face photos)")
    min_crop_scale: float = _opt(0.25, "smallest area share kept by the random resized crop, so lesions stay in view")
    eval_crop: str = _opt("center", "how validation, test, inference and ONNX export fit a photo into the square "
                                    "input: center = resize the short side and cut the centre (crop_pct), squash = "
                                    "resize both sides (whole photo, aspect changed), letterbox = resize the long "
                                    "side and pad (whole photo, aspect kept)", choices=["center", "squash", "letterbox"])
    crop_pct: Optional[float] = _opt(None, "share of the resized image the eval crop keeps (default: the model's "
                                           "pretrained value, e.g. 0.875)")
    audit: bool = _opt(True, "audit the dataset before training: exact and near-duplicate images, label conflicts, "
                             "train/test leakage, image sizes, size/format shortcuts (data_audit.json, duplicates.csv "
                             "in the run folder; copies found are kept on one side of the validation split)")
    on_leak: str = _opt("warn", "what to do when the audit finds copies of a test image in trainset or copies filed "
                                "under different classes: warn, drop (remove the trainset copies of test images and "
                                "every copy of a conflicting image, listed in data_audit.json) or error",
                        choices=["warn", "drop", "error"])
    near_dup_threshold: int = _opt(40, "perceptual-hash distance (bits of 256) at or below which the audit counts "
                                       "two images as copies")
    labels_csv: Optional[str] = _opt(None, "CSV of labels instead of class folders (e.g. HAM10000 metadata): one row "
                                           "per image with a file column and a label column, optionally group and "
                                           "split columns; the images sit under --data_dir")
    csv_file_column: str = _opt("filename", "--labels_csv column naming the image (path, file name or name without "
                                            "extension)")
    csv_label_column: str = _opt("label", "--labels_csv column holding the class name")
    csv_group_column: Optional[str] = _opt(None, "--labels_csv column holding the patient or lesion id (as --groups)")
    csv_split_column: Optional[str] = _opt(None, "--labels_csv column saying train or test (default: the trainset/ or "
                                                 "testset/ folder the image sits in)")
    groups: Optional[str] = _opt(None, "CSV with columns filename,group (patient or lesion id): the validation "
                                       "split and folds never split a group, groups shared by trainset and testset "
                                       "are reported, and test intervals resample whole groups")
    group_pattern: Optional[str] = _opt(None, "regular expression whose first capture group, searched in each file "
                                              "name, is the image's group (e.g. '^(P\\d+)_'); instead of --groups")
    cache_images: bool = _opt(False, "keep each training/validation/test photo's decode (reduced-size for large JPEGs) in "
                                     "a cache so later epochs and runs skip decoding: for folders of camera-size "
                                     "photos; whole-photo runs only")
    cache_dir: Optional[str] = _opt(None, "where --cache_images keeps them (default <data_dir>/.image_cache)")
    mixup: float = _opt(0.0, "mixup alpha (timm Mixup; 0 = off)")
    cutmix: float = _opt(0.0, "cutmix alpha (timm Mixup; 0 = off)")
    input_kind: str = _opt("full_image", "train on whole photos, or on the face's skin region made by the face "
                                         "parser (masks cached in <data_dir>/.skin_masks/)",
                           choices=["full_image", "skin_region"])
    seg_backend: str = _opt("segformer", "face parser for --input_kind skin_region (opencv: heuristic, no weights)",
                            choices=["segformer", "onnx", "opencv"])
    seg_model: Optional[str] = _opt(None, "SegFormer Hugging Face id or local folder (segformer backend, default "
                                          "jonathandinu/face-parsing) or seg_model.onnx path (onnx backend)")
    seg_revision: Optional[str] = _opt(None, "Hugging Face revision (commit hash) of --seg_model, to pin the parser")
    parts: Optional[str] = _opt(None, "comma-separated parser labels that count as skin (default: skin,nose)")

    # --- model ---
    pretrained_path: Optional[str] = _opt(None, "local .pth/.pt/.safetensors file with ImageNet (or your own) weights")
    drop_rate: float = _opt(0.2, "dropout before the classifier")

    # --- optimisation ---
    scheduler: str = _opt("cosine", "learning-rate schedule", choices=["cosine", "step", "none"])
    warmup_epochs: int = _opt(1, "linear warm-up epochs (cosine and step)")
    step_size: int = _opt(10, "epochs between learning-rate decays (step schedule)")
    step_gamma: float = _opt(0.1, "decay factor (step schedule)")
    weight_decay: float = _opt(0.01, "weight decay (not applied to biases and norm layers)")
    layer_decay: Optional[float] = _opt(None, "layer-wise learning-rate decay (e.g. 0.75: each earlier block learns "
                                              "at 0.75x the next one's rate; default off)")
    momentum: float = _opt(0.9, "momentum (sgd)")
    label_smoothing: float = _opt(0.1, "label smoothing (cross-entropy and focal loss)")
    loss: str = _opt("ce", "training loss: cross-entropy or focal loss", choices=["ce", "focal"])
    focal_gamma: float = _opt(2.0, "focal loss focusing parameter (0 = cross-entropy)")
    class_weights: str = _opt("none", "per-class loss weights (focal: alpha): none, or auto = inverse class "
                                      "frequency n/(K*count)", choices=["none", "auto"])
    sampler: str = _opt("auto", "training batches: random shuffling, balanced = a weighted sampler that draws "
                                "every class equally often, auto = balanced when the largest training class has at "
                                "least 1.5x the images of the smallest", choices=["auto", "random", "balanced"])
    model_ema: bool = _opt(True, "evaluate, save and export an exponential moving average of the weights (timm "
                                 "ModelEmaV3 with warm-up, so it also works for short fine-tunes)")
    model_ema_decay: float = _opt(0.998, "EMA decay ceiling (the warm-up starts lower)")
    refit: bool = _opt(True, "after the best epoch is chosen on validation, retrain from the same start on trainset + "
                             "validation for that many epochs and deliver that model (True/False)")
    folds: int = _opt(0, "K-fold cross-validation of the trainset instead of one validation split: K models give "
                         "out-of-fold metrics and the calibration set, then one refit on the whole trainset for the "
                         "median best epoch is delivered (K+1 trainings; 0 = off)")
    tta: bool = _opt(True, "average each test image with its mirror image (horizontal flip) in the final test, and "
                           "make that inference.py's default for this run")
    calibrate: bool = _opt(True, "fit temperature scaling on held-out validation predictions after training; the "
                                 "temperature stays 1.0 unless it lowers cross-validated NLL (True/False)")
    operating_point: Optional[str] = _opt(None, "screening thresholds chosen on held-out predictions and reported "
                                                "on test, e.g. 'malignant:sensitivity=0.95' (or specificity=; "
                                                "comma-separated for several classes); inference adds flag_<class>")
    abstain: Optional[str] = _opt(None, "answer 'uncertain' below a confidence chosen on held-out predictions: "
                                        "accuracy=0.95 (that accurate where it answers) or coverage=0.8 (answer 80%%)")
    metadata: Optional[str] = _opt(None, "CSV with a filename column and columns such as fitzpatrick, sex, "
                                         "age_group, site, device: the test report adds per-subgroup metrics with "
                                         "intervals (subgroup_metrics.csv)")
    epoch_selection: str = _opt("one_se", "which validated epoch to keep (and refit for): one_se = the latest epoch "
                                          "whose --monitor is within one standard error of the best (a difference "
                                          "smaller than the validation noise is a tie, and the later epoch is the "
                                          "better-trained one), best = the highest score", choices=["one_se", "best"])
    refit_schedule: str = _opt("compressed", "learning-rate schedule of the refit: compressed = warm-up and decay "
                                             "over the refit's own epochs (ends at the low rate), replay = the "
                                             "selection phase's --epochs schedule stopped at the selected epoch",
                               choices=["compressed", "replay"])
    patience: int = _opt(10, "early stopping: epochs without a newly selected epoch (see --epoch_selection) "
                             "(0 disables)")
    monitor: str = _opt("val_balanced_acc", "validation metric that picks model_best.pth and drives early stopping",
                        choices=["val_balanced_acc", "val_loss"])

    # --- runtime ---
    device: str = _opt("auto", "where to train; auto = cuda when a GPU is visible, else cpu", choices=list(DEVICE_CHOICES))
    amp: bool = _opt(True, "mixed precision on CUDA (bf16 where supported, else fp16); ignored on CPU")
    deterministic: bool = _opt(False, "deterministic kernels (slower on GPU; see REPRODUCIBILITY.md)")
    save_dir: str = _opt("save_results", "root folder for run folders")
    wandb: str = _opt("auto", "Weights & Biases logging: auto = online when logged in, else offline into the run "
                              "folder; never blocks or fails training", choices=["auto", "online", "offline",
                                                                                  "disabled"])
    wandb_project: str = _opt("skinclf", "W&B project name")
    resume: Optional[str] = _opt(None, "run folder to continue from its model_last.pth (uses the run's saved config)")
    config: Optional[str] = _opt(None, "YAML or JSON file of defaults for these flags; command-line flags win")

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        for f in dataclasses.fields(self):
            choices = f.metadata.get("choices")
            value = getattr(self, f.name)
            if f.metadata.get("lower") and isinstance(value, str):
                value = value.lower()
                setattr(self, f.name, value)
            if choices and value not in choices:
                raise UserError(f"--{f.name} {value!r} is not one of {', '.join(choices)}")
        parse_operating_points(self.operating_point)  # syntax and ranges; class names are checked against the data
        parse_abstain(self.abstain)
        checks = [
            (self.epochs >= 1, "--epochs must be at least 1"),
            (self.batch_size >= 1, "--batch_size must be at least 1"),
            (self.img_size >= 16, "--img_size must be at least 16"),
            (self.lr_ae > 0, "--lr_ae must be positive"),
            (0.0 < self.val_ratio < 1.0, "--val_ratio must be between 0 and 1"),
            (0.0 < self.min_crop_scale <= 1.0, "--min_crop_scale must be in (0, 1]"),
            (0.0 <= self.label_smoothing < 1.0, "--label_smoothing must be in [0, 1)"),
            (self.n_class is None or self.n_class >= 2, "--n_class must be at least 2"),
            (self.num_workers >= 0, "--num_workers must be 0 or more"),
            (self.patience >= 0, "--patience must be 0 or more"),
            (self.focal_gamma >= 0, "--focal_gamma must be 0 or more"),
            (self.mixup >= 0 and self.cutmix >= 0, "--mixup and --cutmix must be 0 or more"),
            (not (self.mixup or self.cutmix) or self.batch_size % 2 == 0,
             "--mixup/--cutmix need an even --batch_size"),
            (not (self.mixup or self.cutmix) or (self.loss == "ce" and self.class_weights == "none"),
             "--mixup/--cutmix train on mixed (soft) labels: use them with --loss ce --class_weights none "
             "(--sampler balanced still balances the classes)"),
            (0 <= self.near_dup_threshold <= 256, "--near_dup_threshold must be between 0 and 256 bits"),
            (not (self.groups and self.group_pattern), "give --groups or --group_pattern, not both"),
            (not (self.csv_group_column and (self.groups or self.group_pattern)),
             "give groups once: --csv_group_column, --groups or --group_pattern"),
            (self.folds == 0 or self.folds >= 2, f"--folds {self.folds}: use at least 2 folds, or 0 for one "
                                                 f"validation split"),
            (self.layer_decay is None or 0 < self.layer_decay <= 1, "--layer_decay must be in (0, 1]"),
            (self.crop_pct is None or 0 < self.crop_pct <= 1, "--crop_pct must be in (0, 1]"),
            (0 < self.model_ema_decay < 1, "--model_ema_decay must be between 0 and 1"),
        ]
        for ok, message in checks:
            if not ok:
                raise UserError(message)

    @property
    def resolved_data_dir(self) -> Path:
        return Path(self.data_dir) if self.data_dir else Path("data") / f"{self.data_name}_dataset"

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
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in vars(args).items() if k in known})


def _field_type(field_type: Any) -> Any:
    """The argparse ``type`` for a dataclass annotation (``Optional[int]`` -> ``int``)."""
    args = getattr(field_type, "__args__", None)
    if args:  # Optional[X]
        field_type = next(a for a in args if a is not type(None))
    return field_type


def add_dataclass_arguments(parser: argparse.ArgumentParser, config_cls: type = TrainConfig) -> None:
    hints = get_type_hints(config_cls)
    for f in dataclasses.fields(config_cls):
        kind = _field_type(hints[f.name])
        kwargs: dict[str, Any] = {"default": f.default, "help": f.metadata["help"]}
        if kind is bool:
            # nargs='?' keeps both spellings working: `--amp` alone and the original's `--pre_trained True`.
            kwargs.update(type=str2bool, nargs="?", const=True, metavar="True|False")
        else:
            kwargs["type"] = (lambda s: str(s).lower()) if f.metadata.get("lower") else kind
        if f.metadata.get("choices"):
            kwargs["choices"] = f.metadata["choices"]
        if "(default:" not in kwargs["help"]:  # a help text that words its own default keeps it
            kwargs["help"] += " (default: %(default)s)"
        parser.add_argument(f"--{f.name}", **kwargs)


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


def parse_with_config_file(parser: argparse.ArgumentParser, argv: Optional[list[str]] = None) -> argparse.Namespace:
    """Parse ``argv``; values from ``--config FILE`` become defaults, so flags on the command line still win."""
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
    return parser.parse_args(argv)
