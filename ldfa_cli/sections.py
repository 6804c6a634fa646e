"""The base of every recipe section and the numeric types they share: a pydantic model that
refuses unknown keys and checks its defaults. The recipe schema (``config/schema.py``) and
each model's own config class (beside its builder in ``models/``) build on it."""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field


class Section(BaseModel):
    # no infinities or NaN in any number (an lr of inf would train to a NaN loss)
    model_config = ConfigDict(extra="forbid", validate_default=True, allow_inf_nan=False)


PositiveInt = Annotated[int, Field(ge=1)]
NonNegative = Annotated[float, Field(ge=0.0)]
Fraction = Annotated[float, Field(ge=0.0, lt=1.0)]  # a dropout or drop-path rate
