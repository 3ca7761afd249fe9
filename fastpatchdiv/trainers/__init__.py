"""The losses in an unchanged training loop: :func:`attach`, and the family registry behind it.

Example:
    >>> div = fastpatchdiv.attach(model, cosine_weight=1.0, contrastive_weight=0.5)
    >>> loss = criterion(model(images), targets) + div.loss()
"""

from fastpatchdiv.trainers import hf_families, timm_families, torchvision_families  # noqa: F401  (registration)
from fastpatchdiv.trainers.diversity import PatchDiversity, attach
from fastpatchdiv.trainers.record import Record, State
from fastpatchdiv.trainers.registry import FAMILIES, Family, Tap, TokenSpec, Wiring, find_family, register_family

try:  # wrap_task lives beside this package's modules once its author lands it
    from fastpatchdiv.trainers.timm_task import wrap_task  # noqa: F401
except ImportError:  # pragma: no cover - before it lands, or without timm
    pass

__all__ = [
    "FAMILIES",
    "Family",
    "PatchDiversity",
    "Record",
    "State",
    "Tap",
    "TokenSpec",
    "Wiring",
    "attach",
    "find_family",
    "register_family",
]
if "wrap_task" in globals():
    __all__.append("wrap_task")
