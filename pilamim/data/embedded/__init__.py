"""The bundled Fashion-MNIST subset (``fashion_mnist_subset.npz``) and the script that makes it."""

from pathlib import Path

SUBSET_PATH = Path(__file__).with_name("fashion_mnist_subset.npz")
