"""Tune results -> table rows, without a cluster."""

from cifarcam.search import best_per_model


def _trial(trial_id: str, val_loss: float, val_top1: float) -> dict:
    return {"trial_id": trial_id, "model": "resnet_tiny", "best_checkpoint": f"/ckpt/{trial_id}", "status": "completed", "best_metric": val_loss, "best_val_top1": val_top1}


def test_the_best_trial_follows_the_configured_metric_and_mode():
    """metric: val_loss, mode: min must pick the lowest loss, not the lowest accuracy."""
    low_loss, high_loss = _trial("a", val_loss=0.4, val_top1=0.6), _trial("b", val_loss=0.9, val_top1=0.5)
    assert best_per_model([high_loss, low_loss], "min") == [low_loss]
    assert best_per_model([low_loss, high_loss], "max") == [high_loss]
