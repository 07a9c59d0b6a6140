"""Data sets: Fashion-MNIST (embedded benchmark)."""

from add_bench.data.fashion_mnist import (  # noqa: F401
    CLASS_NAMES,
    NUM_CLASSES,
    PROMPTS,
    Split,
    balanced_indices,
    balanced_labels,
    load_split,
    prompt,
    to_model_range,
    to_uint8,
)
