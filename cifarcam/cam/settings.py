"""What the CAM stage is asked for (``jobs.cam``'s options), checked before any cluster time:
methods, layers, targets, batch size, the faithfulness and sanity samples, and the actors.

Each option is declared once, here: ``CamSettings``'s field and its default, and ``CLI`` for its
flag and help; ``jobs.cam`` derives its command line from them. Errors name the command-line
option: the registries they check against (``cam.METHODS``, the model's modules) leave the wording
to this module. Importing it is cheap (torch is imported where it is used), so `--help` is quick.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING

from cifarcam.errors import ConfigError, did_you_mean

if TYPE_CHECKING:
    from cifarcam.cam.faithfulness import FaithfulnessSettings
    from cifarcam.training import CamLayer, ModelSpec

TARGET_KINDS = ("pred", "label")


def _method_name(name: str) -> str:
    from cifarcam.cam.methods import METHODS, find_method, method_key

    found = find_method(name)
    if found is None:
        hint = did_you_mean(method_key(name), METHODS) or f"expected one of {', '.join(METHODS)}"
        raise ConfigError(f"--methods: unknown CAM method {name!r}; {hint}")
    return found.name


def _once(option: str, given: tuple[str, ...], names: tuple[str, ...]) -> None:
    """At least one name, and none twice (``names``: ``given`` as the registry spells them)."""
    if not names:
        raise ConfigError(f"{option}: expected at least one name, got none")
    for i, name in enumerate(names):
        if name in names[:i]:
            first = given[names.index(name)]
            twice = f"{first!r} and {given[i]!r}" if first != given[i] else f"{first!r}"
            raise ConfigError(f"{option}: {twice} name{'' if first != given[i] else 's'} {name!r} twice; give each once")


@dataclass(frozen=True)
class CamSettings:
    methods: tuple[str, ...] = ("gradcam",)  # any spelling on the way in; registry keys once built
    layers: tuple[str, ...] | None = None  # None: every CAM layer the family names
    targets: tuple[str, ...] = TARGET_KINDS
    batch_size: int = 128
    # deletion / insertion steps; 0 turns faithfulness off. 12 quadratic steps: every margin closer to 64 uniform
    # steps' than 16 uniform steps came, at 11 forwards per curve instead of 15 (README, "Faithfulness: where the steps fall")
    faithfulness_steps: int = 12
    faithfulness_images: int = 128  # the seeded sample it is measured on
    faithfulness_spacing: str = "quadratic"  # where the steps fall (faithfulness.step_pixels)
    sanity_images: int = 64  # the randomisation sanity check's sample; 0 turns it off
    sanity_seed: int = 0  # the randomisations' first seed
    sanity_draws: int = 2  # independent randomisations, each image's rho averaged over them
    actors: int | None = None  # None: one per GPU share, else one per CPU but the writer's
    gpus_per_actor: float = 1.0  # where the cluster has GPUs; 0: CPU actors even there

    def __post_init__(self) -> None:
        given = self.methods
        object.__setattr__(self, "methods", tuple(_method_name(m) for m in given))
        # Each would be computed and stored twice: one row per image, layer, method and target.
        _once("--methods", given, self.methods)
        _once("--targets", self.targets, self.targets)
        if self.layers is not None:
            _once("--layers", self.layers, self.layers)
        for t in self.targets:
            if t not in TARGET_KINDS:
                raise ConfigError(f"--targets: unknown target {t!r}; expected pred, label, or both as pred,label")
        if self.batch_size <= 0:
            raise ConfigError(f"--cam-batch-size: must be > 0, got {self.batch_size}")
        for name in ("faithfulness_steps", "faithfulness_images", "sanity_images"):
            if getattr(self, name) < 0:
                raise ConfigError(f"--{name.replace('_', '-')}: must be >= 0, got {getattr(self, name)}")
        from cifarcam.results import SPACINGS

        if self.faithfulness_spacing not in SPACINGS:
            raise ConfigError(f"--faithfulness-spacing: expected {' or '.join(SPACINGS)}, got {self.faithfulness_spacing!r}")
        if self.sanity_draws < 1:
            raise ConfigError(f"--sanity-draws: must be >= 1, got {self.sanity_draws}")
        if self.actors is not None and self.actors <= 0:
            raise ConfigError(f"--actors: must be > 0, got {self.actors}")
        if not 0 <= self.gpus_per_actor <= 1:  # an actor computes on one device: more would sit idle
            raise ConfigError(f"--gpus-per-actor: expected a share of one GPU from 0 (CPU actors) to 1, got {self.gpus_per_actor:g}")

    @property
    def faithfulness(self) -> FaithfulnessSettings:
        from cifarcam.cam.faithfulness import FaithfulnessSettings

        return FaithfulnessSettings(steps=self.faithfulness_steps, images=self.faithfulness_images, spacing=self.faithfulness_spacing)

    def comparable(self) -> dict:
        """What must match for existing partitions to be reused (also each file's metadata)."""
        from cifarcam import results

        faithfulness = self.faithfulness.metadata() if self.faithfulness.enabled else None
        return {"columns": results.CAMS_VERSION, "targets": list(self.targets), "faithfulness": faithfulness}


# Each field's command-line flag and help; the default shown is the field's.
CLI: dict[str, tuple[str, str]] = {
    "methods": ("--methods", "comma-separated pytorch-grad-cam methods"),
    "layers": ("--layers", "comma-separated layer names (default: every CAM layer of each model)"),
    "targets": ("--targets", "explain the predicted class (pred), the true label (label), or both"),
    "batch_size": ("--cam-batch-size", "images per CAM batch"),
    "faithfulness_steps": ("--faithfulness-steps", "deletion / insertion steps per heatmap; 0 turns faithfulness off"),
    "faithfulness_images": ("--faithfulness-images", "the seeded sample of test images faithfulness is measured on"),
    "faithfulness_spacing": (
        "--faithfulness-spacing",
        "where the steps fall: quadratic ((k / steps)^2 of the pixels, dense in the curves' steep start) or uniform (k / steps)",
    ),
    "sanity_images": ("--sanity-images", "test images for the weight-randomisation sanity check; 0 turns it off"),
    "sanity_seed": ("--sanity-seed", "first seed of the sanity check's weight randomisations"),
    "sanity_draws": ("--sanity-draws", "independent weight randomisations of the sanity check (each image's correlation is their mean)"),
    "actors": ("--actors", "CAM actors (default: one per GPU share, else one per CPU but one, which Ray Data's writer keeps)"),
    "gpus_per_actor": ("--gpus-per-actor", "GPU share of each actor where the cluster has GPUs; 0 runs CPU actors there"),
}


def resolve_layers(spec: ModelSpec, requested: tuple[str, ...] | None, where: str) -> list[CamLayer]:
    """The ``--layers`` of one model with their feature-map sizes (default: the family's CAM
    layers); any named module may be explained. ``where`` names the model in errors."""
    from cifarcam.training import build_model, cam_layers, measure_layers

    model = build_model(spec)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # jobs.cam warns once per layer, on the terminal
        known = cam_layers(model, spec)
    if requested is None:
        return known
    names = dict(model.named_modules())
    for name in requested:
        if name not in names:
            cam_names = [layer.name for layer in known]
            hint = did_you_mean(name, cam_names + list(names)) or f"{spec.family} has CAM layers {cam_names}"
            raise ConfigError(f"--layers: {where} has no layer {name!r}; {hint}")
    by_name = {layer.name: layer for layer in known}
    others = [name for name in requested if name not in by_name]
    if others:  # measured as the family's CAM layers are, in one forward pass
        by_name |= {layer.name: layer for layer in measure_layers(model, spec, others)}
    return [by_name[name] for name in requested]
