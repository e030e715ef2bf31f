"""Function tools for chat: definitions (OpenAI function-tool JSON), validation, and running them.

A tool is declared to the model in the developer message (Harmony renders it as TypeScript). When the model
calls one, the runner executes it: a built-in (`calculator`), a user command (`"command": [...]` in the
tools file; the JSON arguments arrive on stdin, stdout is the result), or, for a tool with neither, the
result is asked from the person at the keyboard — a human in the loop, as when testing a tool schema.

The built-in `python` tool is not a function: Harmony declares it in the system message (`## python`) and
the model writes code as the message (`<|start|>assistant to=python<|channel|>analysis code<|message|>…`).
`run_python` runs that code in a fresh interpreter in a sandbox (gptoss.sandbox: nothing of your files, no
network, its whole process tree killed at the time limit) with time, memory and process-count limits.
"""

from __future__ import annotations

import ast
import json
import math
import operator
import os
import signal
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from . import sandbox
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


# ---------------------------------------------------------------- built-in: python
PYTHON_TIMEOUT = 30.0
PYTHON_MAX_OUTPUT = 16_000  # characters of output given back to the model

# The first paragraph is the tool text GPT-oss was trained with (openai-harmony's `python` namespace); the
# second says what this runner really does instead of a stateful Jupyter notebook.
PYTHON_DESCRIPTION = (
    "Use this tool to execute Python code in your chain of thought. The code will not be shown to the user. "
    "This tool should be used for internal reasoning, but not for code that is intended to be visible to the "
    "user (e.g. when creating plots, tables, or files).\n\n"
    "When you send a message containing Python code to python, it will be executed in a new, stateless Python "
    "process, and its output (stdout and stderr, and the value of a final expression) will be returned to you. "
    "Nothing is kept between calls. python will time out after {timeout:g} seconds. "
    "Internet access for this session is disabled.")

# Runs in the child before the code: memory, CPU-time and process-count limits (argv 1 to 3; 0 leaves the
# process count alone), sockets refused with a message the model understands (the sandbox's network namespace
# is what really keeps it off the network), the code compiled as "<python tool>", and a last bare expression
# printed as a notebook cell would.
_PYTHON_PRELUDE = r"""
import ast, socket, sys
try:
    import resource
    resource.setrlimit(resource.RLIMIT_AS, (int(sys.argv[1]),) * 2)
    resource.setrlimit(resource.RLIMIT_CPU, (int(sys.argv[2]),) * 2)
    if int(sys.argv[3]):
        resource.setrlimit(resource.RLIMIT_NPROC, (int(sys.argv[3]),) * 2)
except ImportError:  # not POSIX: the time limit still holds, enforced by the parent
    pass
def _no_network(*args, **kwargs):
    raise OSError("network access is disabled in the python tool")
for _name in ("connect", "connect_ex", "sendto", "bind"):
    setattr(socket.socket, _name, _no_network)
socket.create_connection = socket.getaddrinfo = _no_network
_scope = {"__name__": "__main__"}
try:
    _tree = ast.parse(sys.stdin.read(), "<python tool>")
    _last = _tree.body.pop() if _tree.body and isinstance(_tree.body[-1], ast.Expr) else None
    exec(compile(_tree, "<python tool>", "exec"), _scope)
    if _last is not None:
        _value = eval(compile(ast.Expression(_last.value), "<python tool>", "eval"), _scope)
        if _value is not None:
            print(repr(_value))
except SystemExit:
    raise
except BaseException:  # the traceback of the code alone, without this prelude's frame
    import traceback
    _type, _error, _tb = sys.exc_info()
    traceback.print_exception(_type, _error, None if _type is SyntaxError else _tb.tb_next)
    sys.exit(1)
"""


def _exit_status(status: int, sandboxed: bool) -> str:
    """[exit status N], or [killed by SIGNAME]: Popen reports a signal as -N, the sandbox's shell as 128 + N."""
    number = -status if status < 0 else status - 128 if sandboxed and status > 128 else 0
    if not number:
        return f"[exit status {status}]"
    try:
        return f"[killed by {signal.Signals(number).name}]"
    except ValueError:
        return f"[killed by signal {number}]"


def _read_in_background(process: subprocess.Popen, stdin: bytes, limit: int) -> tuple[bytearray, threading.Thread]:
    """Feed `stdin` and collect the first `limit` bytes of stdout, each in a thread of its own (neither may
    hold up the time limit); the rest is read and dropped, so that code printing forever fills no memory."""
    output = bytearray()

    def feed() -> None:
        try:
            process.stdin.write(stdin)
            process.stdin.close()
        except OSError:  # it ended without reading all of it
            pass

    def read() -> None:
        while chunk := process.stdout.read1(1 << 16):
            output.extend(chunk[:max(0, limit - len(output))])

    threading.Thread(target=feed, daemon=True).start()
    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    return output, reader


def run_python(code: str, timeout: float = PYTHON_TIMEOUT, memory_mb: int = 2048, max_processes: int = 64,
               unsafe: bool = False) -> str:
    """Run `code` in a fresh `python -I` in the sandbox (see gptoss.sandbox); its output as text.

    The sandbox: an empty working folder on a tmpfs, system paths read-only and nothing else of the machine's
    files, no network, its own PID namespace (the whole tree is killed at the time limit), at most
    `max_processes` processes and threads. SandboxUnavailable if this machine cannot make one; `unsafe=True`
    runs the code without it (an empty temporary folder, the same time and memory limits, nothing more).
    Errors (a traceback, a timeout, the memory limit) are part of the output: the model reads them and
    can fix its code."""
    kind = None if unsafe else sandbox.isolation()
    # threads count against the process limit too (Linux counts tasks): keep OpenMP/BLAS pools small
    threads = str(min(os.cpu_count() or 1, max(1, max_processes // 4)))
    with tempfile.TemporaryDirectory(prefix="gptoss-python-") as folder:
        home = sandbox.WORKDIR if kind else folder
        env = {"PATH": "/usr/local/bin:/usr/bin:/bin" if kind else os.environ.get("PATH", "/usr/bin:/bin"),
               "HOME": home, "OMP_NUM_THREADS": threads}
        # -I: no environment variables, user site or cwd on the path; -u: stdout and stderr in order.
        # RLIMIT_NPROC only in the sandbox: unconfined, it would count every process of the user.
        argv = [sys.executable, "-I", "-u", "-X", "utf8", "-B", "-c", _PYTHON_PRELUDE,
                str(memory_mb * 2**20), str(int(timeout) + 1), str(max_processes if kind else 0)]
        if kind:  # `folder` is only the mount point of the sandbox's own root; cwd is set inside
            argv = sandbox.command(argv, folder, kind)
        # a session of its own, so that a Ctrl-C at the terminal is not sent to it as well
        process = subprocess.Popen(argv, cwd=folder, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT, start_new_session=True)
        # UTF-8 takes at most 4 bytes a character: enough bytes for the characters given back, and one more
        output, reader = _read_in_background(process, code.encode(), limit=4 * (PYTHON_MAX_OUTPUT + 1))
        note = ""
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            note = f"\n[timed out after {timeout:g} seconds]"
        finally:  # on a timeout, or Ctrl-C while waiting
            if process.returncode is None:
                # sandboxed: `unshare` dies, --kill-child kills pid 1 of the namespace, the kernel all the rest;
                # unconfined: the process group goes (not what left it with setsid)
                if os.name == "posix":
                    try:
                        os.killpg(process.pid, 9)
                    except ProcessLookupError:
                        pass
                process.kill()
                process.wait()
        if process.returncode != 0 and not note:
            note = "\n" + _exit_status(process.returncode, sandboxed=kind is not None)
        # what was printed until the end; unconfined, what left the process group may hold the pipe open
        # for longer: then we take what came within a second
        reader.join(timeout=1)
    text = bytes(output).decode("utf-8", "replace").replace("\r\n", "\n").replace("\r", "\n")
    if len(text) > PYTHON_MAX_OUTPUT:
        text = text[:PYTHON_MAX_OUTPUT] + f"\n[output cut at {PYTHON_MAX_OUTPUT} characters]"
    return (text.rstrip("\n") + note).strip("\n") or "[no output]"
