"""What every request and result model shares: strict JSON numbers, no unknown fields, and a
request's strings checked for text no encoder can write (``textcheck``)."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, Strict, model_validator

from .textcheck import file_names, surrogate_problem, unpaired_surrogate

__all__ = ["_INT32", "_INT64", "Bool", "Float", "Int", "_Input", "_Model"]

# Numbers and booleans as JSON's only: pydantic's lax mode reads `true` as 1, "0.7" as 0.7 and
# "yes" as true, which hides a client's mistake. Integers fit what providers take (int32 counts,
# int64 seeds).
_INT32 = 2**31 - 1
_INT64 = 2**63 - 1
Float = Annotated[float, Strict(), Field(allow_inf_nan=False)]
Int = Annotated[int, Strict()]
Bool = Annotated[bool, Strict()]


class _Model(BaseModel):
    # Assignments are checked as construction is: ``request.params.temperature = 5`` was taken,
    # and the model failed (or silently clamped) later, far from the mistake.
    model_config = ConfigDict(extra="forbid", populate_by_name=True, validate_assignment=True)


class _Input(_Model):
    """A request: every string it holds, nested ones included, is checked once for unpaired
    surrogates ("\\ud800": no tokenizer, file name or speech engine takes one; ``textcheck``)."""

    @model_validator(mode="after")
    def _whole_characters(self) -> Any:
        for name, value in self.__dict__.items():
            if name.endswith(("_path", "_paths")) and file_names(value):
                # A file name need not be UTF-8 on Linux: Python holds its other bytes as
                # surrogates (os.fsdecode) and writes them back when it opens the file.
                continue
            bad = unpaired_surrogate(value)
            if bad is not None:
                raise ValueError(f"{name} {surrogate_problem(bad)}")
        return self
