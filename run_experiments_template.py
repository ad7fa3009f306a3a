"""Sweep template for run_experiments.py: plain Python, three names.

BASE  options every run shares (main.py flag names without '--').
GRID  option -> list of values; every combination is one run.
RUNS  optional explicit list of option sets; each is combined with every GRID combination.

Flags given on the run_experiments.py command line override BASE; GRID/RUNS values override both.
The same keys work in a YAML file (base:, grid:, runs:).
"""

BASE = {
    "data_name": "skin",
    "epochs": 30,
    "batch_size": 32,
    "optimizer": "adamw",
    "weight_decay": 0.01,
    "pre_trained": True,
    "patience": 8,
}

GRID = {
    "model_name": ["efficientnet_b0", "resnet18", "mobilenet_v3_large"],
    "lr_ae": [0.001, 0.0003],
    "img_size": [224],
    "random_state": [42],
}

# Imbalance handling to compare for every GRID combination: plain cross-entropy against the balanced options.
RUNS = [
    {"loss": "ce", "class_weights": "none", "sampler": "random"},
    {"loss": "ce", "class_weights": "auto", "sampler": "random"},
    {"loss": "focal", "class_weights": "auto", "sampler": "random"},
]
