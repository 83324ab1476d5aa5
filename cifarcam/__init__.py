"""cifarcam: distributed hyperparameter search, training and Grad-CAM for CIFAR classifiers.

Importing the package starts nothing: no Ray, no downloads, no argument parsing.
"""

__version__ = "0.1.0"
