"""Stage 2, training: the model zoo, optimizers and schedules, the training loop, checkpoints
and evaluation, on one device or one DDP rank. Imports the data and the core."""

from cifarcam.faces import lazy_face

__getattr__, __dir__, __all__ = lazy_face(
    __name__,
    {
        "checkpoint": [
            "META_FILE",
            "MODEL_FILE",
            "check_weights",
            "load_model",
            "load_train_state",
            "load_weights",
            "read_meta",
            "save_checkpoint",
            "weights_sha256",
        ],
        "evaluate": ["evaluate_checkpoint"],
        "loader": ["DeviceLoader", "to_model_input"],
        "models": ["FAMILIES", "CamLayer", "ModelSpec", "build_model", "cam_layers", "measure_layers"],
        "names": ["check_names", "load_experiment"],
        "train": ["EpochMetrics", "fit"],
    },
)
