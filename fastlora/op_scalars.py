"""The scalar arguments of a LoRA or DoRA op call, as one value on the Python side.

    y = x Wᵀ + b + s · (dropout_p(x) Aᵀ) Bᵀ,   computed on ``schedule``

``functional.lora_linear`` builds one :class:`OpScalars` per call and everything below it (the ops' bodies,
their autograd, the torch path's and the kernels' dispatch) reads its fields.  Only the registered ops' schemas
see them flattened (:meth:`OpScalars.flat`): a torch op schema has no dataclass type.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from fastlora.schedules import Schedule

__all__ = ["OpScalars"]


@dataclass(frozen=True)
class OpScalars:
    """s (``scaling``), the dropout probability p (0 outside training) and the schedule of one op call."""

    scaling: float
    dropout_p: float
    schedule: Schedule

    width: ClassVar[int] = 3  # fields in ``flat()``

    def flat(self) -> tuple[float, float, str]:
        """(scaling, dropout_p, schedule key): the ops' schema arguments."""
        return self.scaling, self.dropout_p, self.schedule.key

    @classmethod
    def from_flat(cls, scaling: float, dropout_p: float, schedule: str) -> "OpScalars":
        return cls(float(scaling), float(dropout_p), Schedule.from_key(schedule))

    @property
    def uses_kernels(self) -> bool:
        return self.schedule.uses_kernels
