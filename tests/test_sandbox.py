"""The python tool's sandbox holds: code sees none of the machine's files, writes none, reaches no network,
leaves no process behind at the time limit (setsid included) and cannot fork without limit. Where no
sandbox can be made the tool refuses, and `--python-unsafe` is the way to run it anyway.

Each isolation test runs in both sandbox kinds this machine can make ("nobody" as root, "userns"
otherwise; root can make both), and skips, saying why, where a kind cannot be made."""

from __future__ import annotations

import contextlib
import functools
import io
import os
import socket
import sys
import time
import types
import uuid
from pathlib import Path

import pytest

from gptoss import sandbox
from gptoss.chat import ChatSession
from gptoss.config import preset
from gptoss.generate import SamplingParams
from gptoss.sandbox import SandboxUnavailable
from gptoss.tools import run_python
from test_chat import Scripted
from test_python_tool import PYTHON_SCRIPT, TOK, processes_with

FORK_LIMIT_EXEMPT = "as root, a user namespace maps its root to uid 0, which the kernel exempts from RLIMIT_NPROC"


@pytest.fixture(params=["nobody", "userns"])
def kind(request, monkeypatch) -> str:
    """Every run_python in the test uses a sandbox of this kind."""
    if request.param == "nobody" and os.geteuid() != 0:
        pytest.skip("only root can run the code as uid 65534")
    reason = probe(request.param)
    if reason is not None:
        pytest.skip(f"no {request.param!r} sandbox on this machine: {reason}")
    monkeypatch.setattr(sandbox, "isolation", lambda: request.param)
    return request.param


probe = functools.cache(sandbox.probe)  # once per kind and test session


def timed(code: str, timeout: float) -> tuple[str, float]:
    start = time.monotonic()
    out = run_python(code, timeout=timeout)
    return out, time.monotonic() - start


# ---------------------------------------------------------------- isolation
def test_reads_no_file_outside_its_folder(kind, tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("do not read")
    out, elapsed = timed(
        "import os, sys\n"
        f"for path in [{str(secret)!r}, {__file__!r}, '/etc/passwd', '/etc/hostname', '/proc/1/environ']:\n"
        "    try:\n"
        "        print(path, 'READ', open(path).read()[:20])\n"
        "    except OSError as e:\n"
        "        print(path, type(e).__name__)\n"
        "print(os.getcwd(), os.listdir('.'), sorted(os.listdir('/dev')))", timeout=5)
    assert "READ" not in out and "do not read" not in out, out
    assert f"{secret} FileNotFoundError" in out and f"{__file__} FileNotFoundError" in out
    assert "/etc/passwd FileNotFoundError" in out
    assert out.splitlines()[-1] == "/home/sandbox [] " + str(sorted(["full", "null", "random", "shm", "urandom",
                                                                     "zero"]))
    assert elapsed < 5 + 1


def test_writes_no_file_outside_its_folder(kind, tmp_path):
    inside_prefix = Path(sys.prefix) / f"gptoss-sandbox-{uuid.uuid4().hex}"
    targets = [tmp_path / "written.txt", inside_prefix, Path("/usr/gptoss-sandbox-test")]
    try:
        out, elapsed = timed(
            "import subprocess\n"
            # a remount would make the read-only system paths writable: the code has no right to it
            "print(subprocess.run(['mount', '-o', 'remount,bind,rw', '/usr'], capture_output=True).returncode)\n"
            f"for path in {[str(t) for t in targets]!r}:\n"
            "    try:\n"
            "        open(path, 'w').write('x'); print(path, 'WRITTEN')\n"
            "    except OSError as e:\n"
            "        print(path, e.strerror)\n"
            "open('mine.txt', 'w').write('its own folder is writable')\n"
            "print(open('mine.txt').read())", timeout=5)
        assert "WRITTEN" not in out, out
        assert out.splitlines()[0] != "0"  # mount failed
        assert f"{targets[0]} No such file or directory" in out  # the host's folders are not there
        assert "Read-only file system" in out or "Permission denied" in out
        assert out.endswith("its own folder is writable")
        assert not any(t.exists() for t in targets)
        assert elapsed < 5 + 1
    finally:
        for t in targets:
            if t.is_file():
                t.unlink()


def test_setsid_child_is_killed_at_the_time_limit(kind, tmp_path):
    """A child in a session of its own (the escape from a process-group kill) dies with the call."""
    token, late = f"gptoss-test-{uuid.uuid4().hex}", tmp_path / "late.txt"
    child = ("import os, sys, time; os.setsid(); time.sleep(1.5); "  # leaves the code's session and group
             "open(sys.argv[1], 'w').write('written after the time limit')")
    out, elapsed = timed(
        "import subprocess, sys, time\n"
        f"subprocess.Popen([sys.executable, '-c', {child!r}, {str(late)!r}, {token!r}])\n"
        "print('started')\n"
        "time.sleep(30)", timeout=1)
    assert out == "started\n[timed out after 1 seconds]"
    assert elapsed < 1 + 1
    assert processes_with(token) == []  # gone when the call returns, not some time later
    time.sleep(1.0)  # past the child's sleep: it never woke up to write
    assert processes_with(token) == [] and not late.exists()


def test_nothing_outlives_a_call_that_ends(kind):
    token = f"gptoss-test-{uuid.uuid4().hex}"
    out = run_python("import subprocess, sys\n"
                     f"subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(30)', {token!r}],"
                     " start_new_session=True)\nprint('left a child behind')", timeout=5)
    assert out == "left a child behind"
    assert processes_with(token) == []


def test_200_forks_are_refused(kind):
    if kind == "userns" and os.geteuid() == 0:
        pytest.skip(FORK_LIMIT_EXEMPT)
    out, elapsed = timed(
        "import os, time\n"
        "n = 0\n"
        "try:\n"
        "    for _ in range(200):\n"
        "        if os.fork() == 0:\n"
        "            time.sleep(30)\n"
        "            os._exit(0)\n"
        "        n += 1\n"
        "except OSError as e:\n"
        "    print('refused after', n, e.strerror)\n"
        "else:\n"
        "    print('forked', n)", timeout=5)
    assert out.startswith("refused after") and "Resource temporarily unavailable" in out, out
    assert int(out.split()[2]) < 64
    assert elapsed < 5 + 1  # the children sleeping 30 s ended with the code


def test_fork_bomb_is_contained_and_ends_at_the_time_limit(kind):
    if kind == "userns" and os.geteuid() == 0:
        pytest.skip(FORK_LIMIT_EXEMPT)
    out, elapsed = timed("import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass",
                         timeout=2)  # every process it makes spins, forking as well
    assert out == "[timed out after 2 seconds]"
    assert elapsed < 2 + 1


def test_disk_is_a_small_tmpfs(kind):
    out = run_python("open('big', 'wb').write(bytes(300 * 2**20))", timeout=10)
    assert "No space left on device" in out


def test_no_network(kind):
    """Not even the raw C socket module (which the monkeypatch in the prelude does not cover) gets out."""
    token = uuid.uuid4().hex
    with socket.socket() as tcp, socket.socket(socket.AF_UNIX) as unix:
        tcp.bind(("127.0.0.1", 0))
        tcp.listen()
        tcp.setblocking(False)
        unix.bind(f"\0gptoss-test-{token}")  # an abstract socket: it belongs to our network namespace
        unix.listen()
        unix.setblocking(False)
        out, elapsed = timed(
            "import _socket\n"
            f"for family, address in [(_socket.AF_INET, ('127.0.0.1', {tcp.getsockname()[1]})),"
            f" (_socket.AF_UNIX, '\\0gptoss-test-{token}')]:\n"
            "    s = _socket.socket(family, _socket.SOCK_STREAM)\n"
            "    s.settimeout(2)\n"
            "    try:\n"
            "        s.connect(address); print('CONNECTED')\n"
            "    except OSError as e:\n"
            "        print(e.strerror)\n"
            "print(sorted(name for _, name in _socket.if_nameindex()))", timeout=5)
        assert out.splitlines() == ["Network is unreachable", "Connection refused", "['lo']"], out
        for server in (tcp, unix):
            with pytest.raises(BlockingIOError):
                server.accept()
        assert elapsed < 5 + 1


# ---------------------------------------------------------------- where no sandbox can be made
@pytest.fixture
def no_sandbox(tmp_path, monkeypatch):
    """A machine that forbids namespaces, as a container without CAP_SYS_ADMIN and user namespaces does:
    an `unshare` first on PATH that fails as the real one does there."""
    fake = tmp_path / "bin" / "unshare"
    fake.parent.mkdir()
    fake.write_text("#!/bin/sh\necho 'unshare: unshare failed: Operation not permitted' >&2\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake.parent}{os.pathsep}{os.environ.get('PATH', '/usr/bin:/bin')}")
    sandbox.isolation.cache_clear()
    yield
    sandbox.isolation.cache_clear()


def test_refuses_to_run_unconfined(no_sandbox):
    with pytest.raises(SandboxUnavailable) as e:
        run_python("print('never run')")
    message = str(e.value)
    assert "cannot isolate the model's code on this machine" in message
    assert "unshare failed: Operation not permitted" in message and "--python-unsafe" in message
    with pytest.raises(SandboxUnavailable):  # at the start of a chat, not at the model's first call
        ChatSession(Scripted(PYTHON_SCRIPT), SamplingParams(temperature=0, max_tokens=100), TOK, python_timeout=5)


def test_unsafe_opt_out_runs_without_the_sandbox(no_sandbox, tmp_path):
    seen = tmp_path / "visible.txt"
    seen.write_text("a file of yours")
    assert run_python(f"print(open({str(seen)!r}).read())", unsafe=True) == "a file of yours"
    session = ChatSession(Scripted(PYTHON_SCRIPT), SamplingParams(temperature=0, max_tokens=100), TOK,
                          python_timeout=5, python_unsafe=True)
    events = [(e.kind, e.text) for e in session.send("What is 2**100?")]
    assert ("tool_result", "1267650600228229401496703205376") in events


def test_chat_cli_refuses_and_python_unsafe_opts_out(no_sandbox, monkeypatch, capsys):
    from gptoss import chat, cli, loading

    engine = Scripted(PYTHON_SCRIPT)
    loaded = []
    # a stand-in for the model: the chat reads only its context length (the scripted engine answers)
    stand_in = types.SimpleNamespace(config=preset("tiny"))
    monkeypatch.setattr(loading, "load_model", lambda *args, **kwargs: loaded.append(1) or stand_in)
    monkeypatch.setattr(chat, "model_completer", lambda model, cache_bytes: contextlib.nullcontext(engine))
    monkeypatch.setattr("sys.stdin", io.StringIO("What is 2**100?\n"))
    assert cli.main(["chat", "--python"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("gptoss chat: error: the python tool cannot isolate the model's code")
    assert "--python-unsafe" in err
    assert loaded == []  # refused before loading the model
    assert cli.main(["chat", "--python-unsafe", "--temperature", "0"]) in (0, None)
    assert "[tool result]\n1267650600228229401496703205376\n" in capsys.readouterr().out
