"""cifarcam: distributed hyperparameter search, training and Grad-CAM for CIFAR classifiers.

Importing the package starts nothing: no Ray, no downloads, no argument parsing.
"""

__version__ = "0.1.0"

from cifarcam.moved_modules import install as _resolve_old_module_names

_resolve_old_module_names()
