"""The built-in python tool: code runs in a fresh subprocess with a time limit, a memory limit and no network;
the chat session sends `to=python` calls there and gives the output back as Harmony prescribes."""

from __future__ import annotations

import contextlib
import io
import socket
import time
from pathlib import Path

import pytest

from gptoss import harmony as h
from gptoss import tools
from gptoss.chat import ChatSession
from gptoss.generate import SamplingParams
from gptoss.tokenizer import get_tokenizer
from gptoss.tools import run_python
from test_chat import Scripted

TOK = get_tokenizer()


def test_output_and_the_value_of_a_last_expression():
    assert run_python("print('hello')\nx = 6 * 7\nx") == "hello\n42"
    assert run_python("x = 1") == "[no output]"
    assert run_python("None") == "[no output]"
    assert run_python("print('é 東京 😀')") == "é 東京 😀"


def test_errors_are_output_for_the_model():
    out = run_python("print('before')\n1 / 0")
    assert out.startswith("before\nTraceback (most recent call last):\n")  # stdout and stderr in order
    assert 'File "<python tool>", line 2' in out and out.endswith("ZeroDivisionError: division by zero\n"
                                                                  "[exit status 1]")
    out = run_python("def f(:")
    assert "SyntaxError" in out and "ast.py" not in out  # the code's error, not the runner's
    assert run_python("import sys; print('x'); sys.exit(3)") == "x\n[exit status 3]"


def test_time_limit_kills_the_code_and_keeps_its_output():
    start = time.monotonic()
    out = run_python("import time\nprint('started')\ntime.sleep(30)", timeout=1)
    assert time.monotonic() - start < 10
    assert out == "started\n[timed out after 1 seconds]"


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads /proc")
def test_time_limit_also_ends_what_the_code_started():
    out = run_python("import subprocess, sys, time\n"
                     "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
                     "print(child.pid)\ntime.sleep(60)", timeout=2)
    pid = int(out.splitlines()[0])
    assert out.endswith("[timed out after 2 seconds]")
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and alive(pid):
        time.sleep(0.1)
    assert not alive(pid)


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/status") as f:
            return "\nState:\tZ" not in f.read()  # a zombie has ended
    except FileNotFoundError:
        return False


def test_memory_limit():
    assert "MemoryError" in run_python("a = bytearray(4 * 2**30)", memory_mb=512)


def test_fresh_empty_folder_and_no_state_between_calls():
    assert run_python("import os; os.listdir('.')") == "[]"
    run_python("open('left_behind.txt', 'w').write('x'); y = 5")
    assert run_python("import os; os.listdir('.')") == "[]"
    assert "NameError" in run_python("y")


def test_no_network():
    """A listening socket on this machine gets no connection from the tool's code."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        server.setblocking(False)
        port = server.getsockname()[1]
        out = run_python(f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2)")
        assert "OSError" in out
        if tools._network_namespace():  # a network namespace too: even the raw C socket module gets nowhere
            out = run_python(f"import _socket\ns = _socket.socket()\ns.settimeout(2)\ns.connect(('127.0.0.1', {port}))")
            assert "Network is unreachable" in out or "OSError" in out, out
        with pytest.raises(BlockingIOError):
            server.accept()


PYTHON_SCRIPT = [  # completions of the model for one user turn: a python call, then the answer
    '<|channel|>analysis<|message|>Compute it exactly.<|end|>'
    '<|start|>assistant to=python<|channel|>analysis code<|message|>print(2**100)<|call|>',
    '<|channel|>final<|message|>2^100 = 1267650600228229401496703205376<|return|>',
]


def test_session_runs_python_calls_and_renders_the_result_as_harmony():
    engine = Scripted(PYTHON_SCRIPT)
    session = ChatSession(engine, SamplingParams(temperature=0, max_tokens=100), TOK, "low", python_timeout=10)
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
    """`gptoss chat --python` through the CLI (the model replaced by the scripted engine)."""
    from gptoss import chat, cli, loading

    engine = Scripted(PYTHON_SCRIPT)
    monkeypatch.setattr(loading, "load_model", lambda *args, **kwargs: None)
    monkeypatch.setattr(chat, "model_completer", lambda model, cache_bytes: contextlib.nullcontext(engine))
    monkeypatch.setattr("sys.stdin", io.StringIO("/reasoning\nWhat is 2**100?\n"))
    assert cli.main(["chat", "--python", "--python-timeout", "5", "--temperature", "0"]) in (0, None)
    assert capsys.readouterr().out == (
        ">>> /reasoning\n(reasoning shown)\n"
        ">>> What is 2**100?\n"
        "[thinking] Compute it exactly.\n"
        "[python]\nprint(2**100)\n"
        "[tool result]\n1267650600228229401496703205376\n"
        "2^100 = 1267650600228229401496703205376\n")
    assert "python will time out after 5 seconds" in TOK.decode(engine.prompts[0])
    assert cli.main(["chat", "--python", "--python-timeout", "0"]) not in (0, None)
    assert "--python-timeout must be a positive number" in capsys.readouterr().err
