"""Names and shapes of the built-in backbones and datasets (plain data, no torch).

Kept apart from the data loaders and the backbones so that validating a spec, reading a
storage or drawing a report never imports torch.
"""

from __future__ import annotations

MODELS = ("mlp", "cnn", "gru", "lstm", "logreg")
DATASETS = ("mnist1d", "mnist", "fashionmnist", "cifar10")

#: Shape of one input example (without the batch dimension), per dataset.
INPUT_SHAPES: dict[str, tuple[int, ...]] = {
    "mnist1d": (40,),
    "mnist": (1, 28, 28),
    "fashionmnist": (1, 28, 28),
    "cifar10": (3, 32, 32),
}
NUM_CLASSES = 10
