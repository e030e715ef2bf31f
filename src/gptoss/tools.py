"""Function tools for chat: definitions (OpenAI function-tool JSON), validation, and running them.

A tool is declared to the model in the developer message (Harmony renders it as TypeScript). When the model
calls one, the runner executes it: a built-in (`calculator`), a user command (`"command": [...]` in the
tools file; the JSON arguments arrive on stdin, stdout is the result), or, for a tool with neither, the
result is asked from the person at the keyboard — a human in the loop, as when testing a tool schema.
"""

from __future__ import annotations

import ast
import json
import math
import operator
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from .errors import GptOssError


class ToolError(GptOssError):
    pass


@dataclass
class Tool:
    name: str
    description: str = ""
    parameters: dict[str, Any] | None = None  # JSON schema of the arguments object
    command: list[str] | None = None  # run with the JSON arguments on stdin
    function: Callable[[dict[str, Any]], str] | None = field(default=None, repr=False)


# ---------------------------------------------------------------- built-in: calculator
_BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
           ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow}
_UNARY = {ast.UAdd: operator.pos, ast.USub: operator.neg}
_FUNCTIONS = {"sqrt": math.sqrt, "abs": abs, "round": round, "min": min, "max": max, "log": math.log,
              "exp": math.exp, "sin": math.sin, "cos": math.cos, "tan": math.tan}
_CONSTANTS = {"pi": math.pi, "e": math.e}


def evaluate(expression: str) -> int | float:
    """Arithmetic on numbers only (an AST walk, never eval): + − × ÷ // % **, sqrt, abs, round, min, max, ..."""
    def walk(node: ast.AST):
        if isinstance(node, ast.Expression):
            return walk(node.body)
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)) and not isinstance(node.value, bool):
            return node.value
        if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
            left, right = walk(node.left), walk(node.right)
            if isinstance(node.op, ast.Pow) and abs(right) > 1000:
                raise ToolError("exponent too large")
            return _BINARY[type(node.op)](left, right)
        if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
            return _UNARY[type(node.op)](walk(node.operand))
        if isinstance(node, ast.Name) and node.id in _CONSTANTS:
            return _CONSTANTS[node.id]
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in _FUNCTIONS
                and not node.keywords):
            return _FUNCTIONS[node.func.id](*map(walk, node.args))
        raise ToolError(f"unsupported expression element: {ast.dump(node)[:60]}")

    try:
        return walk(ast.parse(expression.replace("^", "**").replace("×", "*").replace("÷", "/"), mode="eval"))
    except (SyntaxError, ZeroDivisionError, OverflowError, ValueError, TypeError) as e:
        raise ToolError(f"cannot evaluate {expression!r}: {e}") from None


def _calculator(arguments: dict[str, Any]) -> str:
    value = evaluate(str(arguments.get("expression", "")))
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
        value = int(value)
    return json.dumps({"result": value})


CALCULATOR = Tool(
    name="calculator",
    description="Evaluate an arithmetic expression and return the exact result.",
    parameters={"type": "object", "properties": {"expression": {
        "type": "string", "description": "e.g. 1234 * 5678 or sqrt(2) + 1"}}, "required": ["expression"]},
    function=_calculator,
)
BUILTIN_TOOLS = {"calculator": CALCULATOR}


# ---------------------------------------------------------------- definitions from JSON
def tool_from_json(d: Any, where: str) -> Tool:
    """Accepts the OpenAI Chat Completions shape {"type": "function", "function": {...}} or the bare function."""
    if not isinstance(d, dict):
        raise ToolError(f"{where}: a tool must be a JSON object, got {type(d).__name__}")
    if d.get("type", "function") != "function":
        raise ToolError(f"{where}.type: only function tools are supported, got {d.get('type')!r}")
    f = d.get("function", d)
    name = f.get("name") if isinstance(f, dict) else None
    if not isinstance(name, str) or not name.replace("_", "a").replace("-", "a").isalnum():
        raise ToolError(f"{where}.name: must be a string of letters, digits, _ or -, got {name!r}")
    description = f.get("description", "")
    if not isinstance(description, str):
        raise ToolError(f"{where}.description: must be a string")
    parameters = f.get("parameters")
    if parameters is not None and (not isinstance(parameters, dict) or parameters.get("type", "object") != "object"):
        raise ToolError(f"{where}.parameters: must be a JSON schema of type object")
    command = d.get("command", f.get("command"))
    if command is not None and (not isinstance(command, list) or not all(isinstance(c, str) for c in command)):
        raise ToolError(f"{where}.command: must be a list of strings (argv)")
    return Tool(name, description, parameters, command)


def load_tools(path: str | Path) -> list[Tool]:
    """A JSON file holding a list of tools (or {"tools": [...]})."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ToolError(f"{path}: no such tools file") from None
    except json.JSONDecodeError as e:
        raise ToolError(f"{path}: not valid JSON ({e})") from None
    if isinstance(data, dict) and "tools" in data:
        data = data["tools"]
    if not isinstance(data, list):
        raise ToolError(f"{path}: expected a list of tools")
    tools = [tool_from_json(d, f"{path}[{i}]") for i, d in enumerate(data)]
    names = [t.name for t in tools]
    dup = next((n for n in names if names.count(n) > 1), None)
    if dup:
        raise ToolError(f"{path}: tool {dup!r} is declared twice")
    return tools


# ---------------------------------------------------------------- running a call
def parse_arguments(text: str) -> dict[str, Any]:
    try:
        args = json.loads(text) if text.strip() else {}
    except json.JSONDecodeError as e:
        raise ToolError(f"arguments are not valid JSON ({e.msg} at char {e.pos}): {text[:200]!r}") from None
    if not isinstance(args, dict):
        raise ToolError(f"arguments must be a JSON object, got {type(args).__name__}")
    return args


def run_tool(tool: Tool, arguments_text: str, ask: Callable[[str], str] | None = None, timeout: float = 60) -> str:
    """The tool's result as text. Errors become the result (the model should see them and recover)."""
    try:
        args = parse_arguments(arguments_text)
        if tool.function is not None:
            return tool.function(args)
        if tool.command is not None:
            done = subprocess.run(tool.command, input=json.dumps(args), capture_output=True, text=True,
                                  timeout=timeout)
            if done.returncode != 0:
                return json.dumps({"error": f"exit status {done.returncode}: {done.stderr.strip()[:500]}"})
            return done.stdout.strip()
        if ask is not None:
            return ask(f"{tool.name}({json.dumps(args)})")
        return json.dumps({"error": f"tool {tool.name!r} has no implementation"})
    except ToolError as e:
        return json.dumps({"error": str(e)})
    except subprocess.TimeoutExpired:
        return json.dumps({"error": f"tool {tool.name!r} timed out after {timeout:g}s"})
