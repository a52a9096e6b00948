"""The base of every recipe section (pydantic): unknown keys are errors, assignments are validated.

Here, not in samtune.finetune.recipe, because each data format (samtune.datasets) declares its
own recipe section and may not import finetune/.
"""

from pydantic import BaseModel, ConfigDict


class Section(BaseModel):
    # numbers are fine where text is expected (`model.checkpoint=2024`, `output.dir=2025`)
    model_config = ConfigDict(extra="forbid", validate_assignment=True, coerce_numbers_to_str=True)
