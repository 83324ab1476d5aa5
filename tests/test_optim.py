import pytest
import torch

from cifarcam.config import TrainConfig
from cifarcam.training.optim import build_optimizer, build_scheduler


def _lrs(scheduler_name, steps_per_epoch=10, **kw):
    model = torch.nn.Linear(2, 2)
    cfg = TrainConfig(scheduler=scheduler_name, lr=0.1, epochs=4, warmup_epochs=1, **kw)
    opt = build_optimizer(model, cfg)
    sched = build_scheduler(opt, cfg, steps_per_epoch)
    lrs = []
    for _ in range(cfg.epochs * steps_per_epoch):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return lrs


@pytest.mark.parametrize("name", ["cosine", "onecycle", "multistep", "none"])
def test_every_schedule_warms_up_then_follows_its_shape(name):
    lrs = _lrs(name)
    assert lrs[0] < 0.02  # warmup starts low
    assert max(lrs) == pytest.approx(0.1, rel=0.05)  # and reaches the configured lr
    peak = lrs.index(max(lrs))
    assert 8 <= peak <= 11 or name == "none"
    if name in ("cosine", "onecycle"):
        assert lrs[-1] < 0.01
    if name == "multistep":
        assert lrs[-1] == pytest.approx(0.001)  # two 10x drops, at 50% and 75%
    if name == "none":
        assert lrs[-1] == pytest.approx(0.1)


def test_optimizers_come_from_timm():
    model = torch.nn.Linear(2, 2)
    sgd = build_optimizer(model, TrainConfig(optimizer="sgd", lr=0.1, momentum=0.9))
    assert isinstance(sgd, torch.optim.SGD) and sgd.defaults["nesterov"] and sgd.defaults["momentum"] == 0.9
    adamw = build_optimizer(model, TrainConfig(optimizer="adamw", lr=0.1, weight_decay=0.05))
    assert isinstance(adamw, torch.optim.AdamW)
    # no weight decay on biases (timm's filter_bias_and_bn)
    assert sorted(g["weight_decay"] for g in adamw.param_groups) == [0.0, 0.05]
