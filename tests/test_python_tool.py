"""The built-in python tool: code runs in a fresh subprocess with a time limit and a memory limit, in the
sandbox (tests/test_sandbox.py shows what it isolates) or, with unsafe=True, without it; the chat session
sends `to=python` calls there and gives the output back as Harmony prescribes. The tool's behaviour is
tested both ways: it must not change with the sandbox."""

from __future__ import annotations

import contextlib
import functools
import io
import os
import resource
import socket
import time
import types
import uuid
from pathlib import Path

import pytest

from gptoss import sandbox, tools
from gptoss.chat import ChatSession
from gptoss.config import preset
from gptoss.generate import SamplingParams
from gptoss.sandbox import SandboxUnavailable
from gptoss.tokenizer import get_tokenizer
from gptoss.tools import run_python
from test_chat import Scripted

TOK = get_tokenizer()


def sandbox_here() -> str | None:
    """None where this machine can make the sandbox, else why not."""
    try:
        sandbox.isolation()
    except SandboxUnavailable as e:
        return str(e)
    return None


@pytest.fixture(params=["sandbox", "unsafe"])
def run(request):
    """run_python in the sandbox (skipped, saying why, where none can be made) or without it."""
    if request.param == "unsafe":
        return functools.partial(run_python, unsafe=True)
    if (reason := sandbox_here()) is not None:
        pytest.skip(reason)
    return run_python


def test_output_and_the_value_of_a_last_expression(run):
    assert run("print('hello')\nx = 6 * 7\nx") == "hello\n42"
    assert run("x = 1") == "[no output]"
    assert run("None") == "[no output]"
    assert run("print('é 東京 😀')") == "é 東京 😀"


def test_errors_are_output_for_the_model(run):
    out = run("print('before')\n1 / 0")
    assert out.startswith("before\nTraceback (most recent call last):\n")  # stdout and stderr in order
    assert 'File "<python tool>", line 2' in out and out.endswith("ZeroDivisionError: division by zero\n"
                                                                  "[exit status 1]")
    out = run("def f(:")
    assert "SyntaxError" in out and "ast.py" not in out  # the code's error, not the runner's
    assert run("import sys; print('x'); sys.exit(3)") == "x\n[exit status 3]"
    assert run("import os, signal; os.kill(os.getpid(), signal.SIGKILL)") == "[killed by SIGKILL]"


def test_time_limit_kills_the_code_and_keeps_its_output(run):
    start = time.monotonic()
    out = run("import time\nprint('started')\ntime.sleep(30)", timeout=1)
    assert time.monotonic() - start < 10
    assert out == "started\n[timed out after 1 seconds]"


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="looks for the child in /proc")
def test_time_limit_also_ends_what_the_code_started(run):
    token = f"gptoss-test-{uuid.uuid4().hex}"
    out = run("import subprocess, sys, time\n"
              f"child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)', {token!r}])\n"
              "print('started')\ntime.sleep(60)", timeout=2)
    assert out == "started\n[timed out after 2 seconds]"
    assert processes_with(token) == []


def processes_with(token: str) -> list[int]:
    """The live processes of this machine whose command line holds `token`."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:  # ended while we looked
            continue
        if token.encode() in cmdline and state != "Z":  # a zombie has ended
            found.append(int(pid))
    return found


def test_output_is_cut_and_endless_output_fills_no_memory(run):
    out = run("print('x' * 20_000)\nprint('not shown')")
    assert out == "x" * tools.PYTHON_MAX_OUTPUT + f"\n[output cut at {tools.PYTHON_MAX_OUTPUT} characters]"
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB
    out = run("import sys\nwhile True:\n    sys.stdout.buffer.write(b'y' * 2**20)", timeout=2)  # GBs in 2 s
    assert out.endswith(f"[output cut at {tools.PYTHON_MAX_OUTPUT} characters]\n[timed out after 2 seconds]")
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 100 * 1024


def test_memory_limit(run):
    assert "MemoryError" in run("a = bytearray(4 * 2**30)", memory_mb=512)


def test_fresh_empty_folder_and_no_state_between_calls(run):
    assert run("import os; os.listdir('.')") == "[]"
    run("open('left_behind.txt', 'w').write('x'); y = 5")
    assert run("import os; os.listdir('.')") == "[]"
    assert "NameError" in run("y")


def test_sockets_refused_with_a_message_for_the_model():
    """Without the sandbox only a monkeypatch stands between the code and the network (test_sandbox.py shows
    the network namespace that really holds): the model is at least told that it has no network."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        server.setblocking(False)
        port = server.getsockname()[1]
        out = run_python(f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2)", unsafe=True)
        assert "OSError: network access is disabled in the python tool" in out
        with pytest.raises(BlockingIOError):
            server.accept()


PYTHON_SCRIPT = [  # completions of the model for one user turn: a python call, then the answer
    '<|channel|>analysis<|message|>Compute it exactly.<|end|>'
    '<|start|>assistant to=python<|channel|>analysis code<|message|>print(2**100)<|call|>',
    '<|channel|>final<|message|>2^100 = 1267650600228229401496703205376<|return|>',
]


def test_session_runs_python_calls_and_renders_the_result_as_harmony():
    engine = Scripted(PYTHON_SCRIPT)
    session = ChatSession(engine, SamplingParams(temperature=0, max_tokens=100), TOK, "low", python_timeout=10,
                          python_unsafe=sandbox_here() is not None)  # the session's logic, on any machine
    events = [(e.kind, e.text, e.name) for e in session.send("What is 2**100?")]
    result = "1267650600228229401496703205376"
    assert ("tool_call", "print(2**100)", "python") in events
    assert ("tool_result", result, "python") in events
    assert "".join(text for kind, text, _ in events if kind == "final") == "2^100 = " + result
    assert events[-1] == ("done", "", None)
    first, second = (TOK.decode(p) for p in engine.prompts)
    assert "# Tools\n\n## python\n\nUse this tool to execute Python code" in first
    assert "python will time out after 10 seconds" in first
    assert second.endswith("<|start|>assistant to=python<|channel|>analysis code<|message|>print(2**100)<|call|>"
                           f"<|start|>python to=assistant<|channel|>analysis<|message|>{result}<|end|>"
                           "<|start|>assistant")
    # the finished turn's analysis (the call and its result included) is not shown again
    assert [m.channel for m in session.messages] == [None, "final"]


def test_python_call_without_the_tool_is_answered_not_run():
    engine = Scripted(PYTHON_SCRIPT)
    session = ChatSession(engine, SamplingParams(temperature=0, max_tokens=100), TOK, "low")
    events = [(e.kind, e.text, e.name) for e in session.send("What is 2**100?")]
    assert ("tool_result", "python is not available in this conversation", "python") in events
    assert "## python" not in TOK.decode(engine.prompts[0])


def test_chat_cli_python_flag(monkeypatch, capsys):
    """`gptoss chat --python` through the CLI (the model replaced by the scripted engine; --python-unsafe where
    this machine cannot make a sandbox)."""
    from gptoss import chat, cli, loading

    python = "--python" if sandbox_here() is None else "--python-unsafe"

    engine = Scripted(PYTHON_SCRIPT)
    # a stand-in for the model: the chat reads only its context length (the scripted engine answers)
    monkeypatch.setattr(loading, "load_model", lambda *args, **kwargs: types.SimpleNamespace(config=preset("tiny")))
    monkeypatch.setattr(chat, "model_completer", lambda model, cache_bytes: contextlib.nullcontext(engine))
    monkeypatch.setattr("sys.stdin", io.StringIO("/reasoning\nWhat is 2**100?\n"))
    assert cli.main(["chat", python, "--python-timeout", "5", "--temperature", "0"]) in (0, None)
    assert capsys.readouterr().out == (
        ">>> /reasoning\n(reasoning shown)\n"
        ">>> What is 2**100?\n"
        "[thinking] Compute it exactly.\n"
        "[python]\nprint(2**100)\n"
        "[tool result]\n1267650600228229401496703205376\n"
        "2^100 = 1267650600228229401496703205376\n")
    assert "python will time out after 5 seconds" in TOK.decode(engine.prompts[0])
    assert cli.main(["chat", python, "--python-timeout", "0"]) not in (0, None)
    assert "--python-timeout must be a positive number" in capsys.readouterr().err
