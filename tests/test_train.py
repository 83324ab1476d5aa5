import math

from cifarcam.config import DataConfig, TrainConfig
from cifarcam.data.splits import load_splits
from cifarcam.training.loader import DeviceLoader
from cifarcam.training.models import ModelSpec, build_model
from cifarcam.training.train import fit


def test_nan_loss_ends_training_with_a_diverged_status():
    splits = load_splits(DataConfig())
    cfg = TrainConfig(model="resnet_tiny", optimizer="sgd", epochs=3, lr=1e12, weight_decay=0.0)
    model = build_model(ModelSpec("resnet_tiny", 10))
    seen = []
    history = fit(
        model,
        cfg,
        DeviceLoader(splits.train.images[:512], splits.train.labels[:512], 64),
        DeviceLoader(splits.val.images, splits.val.labels, 256, train=False),
        on_epoch_end=lambda m, *_: seen.append(m),
    )
    assert len(history) == 1 and history[0].diverged and not math.isfinite(history[0].train_loss)
    assert seen == history  # the callback hears about it, so a search can record it


def test_resume_continues_from_the_saved_epoch(tmp_path):
    from cifarcam.training.checkpoint import load_train_state, load_weights, save_checkpoint

    splits = load_splits(DataConfig())
    cfg = TrainConfig(model="resnet_tiny", epochs=2, lr=0.003)
    spec = ModelSpec("resnet_tiny", 10)
    train = DeviceLoader(splits.train.images[:640], splits.train.labels[:640], 64)
    val = DeviceLoader(splits.val.images, splits.val.labels, 256, train=False)
    model = build_model(spec)

    def save_first(metrics, model, opt, sched):
        if metrics.epoch == 1:
            save_checkpoint(tmp_path, model, spec, {}, opt, sched, epoch=1)

    fit(model, cfg, train, val, on_epoch_end=save_first)
    restored = build_model(spec)
    load_weights(restored, tmp_path, spec)
    history = fit(restored, cfg, train, val, resume=load_train_state(tmp_path))
    assert [h.epoch for h in history] == [2]
