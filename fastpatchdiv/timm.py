"""``fastpatchdiv.timm.attach``: kept importable; the code lives in :mod:`fastpatchdiv.trainers`.

Importing this module checks that timm is installed (``fastpatchdiv.attach`` itself needs no timm).

Example:
    >>> import fastpatchdiv.timm
    >>> div = fastpatchdiv.timm.attach(model, cosine_weight=1.0, contrastive_weight=0.5)
"""

from __future__ import annotations

try:
    import timm  # noqa: F401  (the check this module exists for)
except ImportError as exc:  # pragma: no cover - exercised in a subprocess by the tests
    raise ImportError("fastpatchdiv.timm hooks into timm vision transformers and needs timm: pip install timm") from exc

from fastpatchdiv.trainers import FAMILIES, PatchDiversity, TokenSpec, attach

SUPPORTED_FAMILIES = tuple(family.name for family in FAMILIES)
__all__ = ["attach", "PatchDiversity", "SUPPORTED_FAMILIES", "TokenSpec"]

try:  # wrap_task (timm >= 1.0.23 training tasks), once fastpatchdiv/trainers/timm_task.py exists
    from fastpatchdiv.trainers.timm_task import wrap_task  # noqa: F401

    __all__.append("wrap_task")
except ImportError:  # pragma: no cover
    pass
