"""The demo's function tools: the built-in calculator and a unit converter (what its training data declares)."""

from __future__ import annotations

import json
from typing import Any

from ..tools import BUILTIN_TOOLS, Tool, ToolError
from .data import CONVERT_DEF, convert, fmt_number


def _convert_units(arguments: dict[str, Any]) -> str:
    value, unit_from, unit_to = arguments.get("value"), arguments.get("from"), arguments.get("to")
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise ToolError(f"value must be a number, got {value!r}")
    try:
        result = convert(float(value), str(unit_from), str(unit_to))
    except ValueError as e:
        raise ToolError(str(e)) from None
    return json.dumps({"result": json.loads(fmt_number(result)), "unit": unit_to})


CONVERT_UNITS = Tool(name=CONVERT_DEF["name"], description=CONVERT_DEF["description"],
                     parameters=CONVERT_DEF["parameters"], function=_convert_units)
DEMO_TOOLS = {"calculator": BUILTIN_TOOLS["calculator"], "convert_units": CONVERT_UNITS}
