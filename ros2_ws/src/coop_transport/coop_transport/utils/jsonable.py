"""Plain-JSON views of configs and results (dataclasses, paths, numpy values) for the JSON files runs write."""

from __future__ import annotations

from dataclasses import asdict, is_dataclass
from pathlib import PurePath

import numpy as np


def to_jsonable(value):
    """Recursively: dicts and sequences kept, dataclasses as dicts, paths as strings, numpy values as Python
    numbers or lists; anything else as its ``str``."""
    if isinstance(value, dict):
        return {k: to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, PurePath):
        return str(value)
    if isinstance(value, (np.ndarray, np.generic)):
        return value.tolist()
    if is_dataclass(value) and not isinstance(value, type):
        return to_jsonable(asdict(value))
    return str(value)
