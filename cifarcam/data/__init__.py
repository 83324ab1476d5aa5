"""Stage 1, the data: CIFAR-10/100 (official pickles, Parquet) and the synthetic shapes, as
image sets with train/val/test splits. Imports only the core (``cifarcam.config``, ``errors``)."""

from cifarcam.faces import lazy_face

__getattr__, __dir__, __all__ = lazy_face(
    __name__,
    {
        "image_set": ["ImageSet"],
        "splits": ["CIFAR_MEAN", "CIFAR_STD", "Splits", "check_data_present", "load_splits"],
    },
)
