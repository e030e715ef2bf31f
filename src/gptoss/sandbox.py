"""The sandbox of the built-in python tool: Linux namespaces made by util-linux `unshare`.

Each call runs as

    unshare --mount --pid --net --ipc --uts --cgroup --fork --kill-child [--user --map-root-user] sh -c SETUP

SETUP runs as pid 1 of the new PID namespace. It builds a new root on a fresh tmpfs: the system paths that
Python needs bound read-only (/usr, /lib…, the interpreter's prefix, ld.so.cache), /dev with null, zero,
full, random and urandom only, a read-only /proc of the new PID namespace, an empty writable /tmp and
/home/sandbox (the working folder); it moves into that root with pivot_root, detaches the old one, and runs
the code with no capabilities and no_new_privs. The shell stays pid 1: when the code exits, or when
`unshare` is killed at the time limit (--kill-child sends SIGKILL to pid 1), the kernel kills every process
left in the namespace, including those that called setsid() or double-forked.

Two kinds, chosen by who runs gptoss (the same namespaces and filesystem view in both):
- "nobody" (gptoss runs as root): the namespaces need no user namespace, and the code runs as uid/gid 65534,
  so RLIMIT_NPROC binds (the kernel exempts uid 0 from it, even uid 0 mapped into a user namespace).
- "userns" (anyone else): a user namespace maps you to its root; the code runs as that root without
  capabilities (outside, it is you), and user namespaces inside are disabled (max_user_namespaces = 0).

See docs/SANDBOX.md for what is and is not isolated.
"""

from __future__ import annotations

import functools
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
from typing import Sequence

from .errors import GptOssError

WORKDIR = "/home/sandbox"  # the code's working folder and HOME inside the sandbox
NOBODY = 65534
# Read-only in the sandbox where present: the interpreter's prefix is added by `_read_only_paths`.
# /etc stays out (it names users and hosts); only the loader's cache and the time zone are bound.
SYSTEM_PATHS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32",
                "/etc/ld.so.cache", "/etc/localtime")
DEVICES = ("null", "zero", "full", "random", "urandom")
KINDS = ("nobody", "userns")


class SandboxUnavailable(GptOssError):
    """This machine lets us make none of the isolation the python tool needs."""


def default_kind() -> str:
    """ "nobody" when we are root (the code runs as uid 65534), "userns" otherwise."""
    return "nobody" if os.geteuid() == 0 else "userns"


def _covered(path: str, by: Sequence[str]) -> bool:
    return any(path == p or path.startswith(p.rstrip("/") + "/") for p in by)


def _read_only_paths() -> list[str]:
    """The system paths plus the interpreter's own folders (a pyenv or venv outside /usr), each once."""
    system = [p for p in SYSTEM_PATHS if os.path.lexists(p)]
    resolved = [os.path.realpath(p) for p in system]
    python = {os.path.abspath(p) for p in (sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix,
                                           os.path.dirname(sys.executable))}
    extra = sorted(p for p in python if p != "/" and os.path.isdir(p)
                   and not _covered(p, system) and not _covered(os.path.realpath(p), resolved))
    return system + [p for p in extra if not _covered(p, [q for q in extra if q != p])]


def setup_script(argv: Sequence[str], root: str, kind: str, disk_mb: int) -> str:
    """The shell script that `unshare` runs as pid 1: build the new root at `root` (an empty folder of the
    host, covered by a tmpfs seen only in the new mount namespace), enter it, run `argv` without privileges."""
    if kind not in KINDS:
        raise ValueError(f"sandbox kind must be one of {', '.join(KINDS)}, got {kind!r}")
    q = shlex.quote
    r = q(root)
    links, folders, files, binds = [], ["/dev/shm", "/proc", "/tmp", WORKDIR], [], []
    for path in _read_only_paths():
        if path in SYSTEM_PATHS and os.path.islink(path):  # /bin -> usr/bin on merged-/usr systems
            links.append(path)
            continue
        (folders if os.path.isdir(path) else files).append(path)
        binds.append(f"mount --bind -o ro,nosuid,nodev {q(os.path.realpath(path))} {r}{q(path)}")
    devices = [f"/dev/{d}" for d in DEVICES if os.path.exists(f"/dev/{d}")]
    files += devices
    binds += [f"mount --bind {d} {r}{d}" for d in devices]
    folders += sorted({os.path.dirname(p) for p in files + links} - {"/"})
    lines = ["set -e", "PATH=/usr/sbin:/usr/bin:/sbin:/bin",
             f"mount -t tmpfs -o size={disk_mb}m,mode=755,nosuid,nodev gptoss-sandbox {r}",
             "mkdir -p " + " ".join(r + q(f) for f in folders),
             "touch " + " ".join(r + q(f) for f in files),
             f"chmod 1777 {r}/tmp {r}/dev/shm",
             *(f"ln -s {q(os.readlink(link))} {r}{q(link)}" for link in links), *binds]
    lines.append(f"mount -t proc -o nosuid,nodev,noexec proc {r}/proc")
    if kind == "userns":  # a user namespace inside would give the code capabilities again (over copies only)
        lines.append(f"echo 0 > {r}/proc/sys/user/max_user_namespaces")
    else:
        lines.append(f"chown {NOBODY}:{NOBODY} {r}{WORKDIR}")
    # read-only: no write to /proc/sys or /proc/<pid>/* even by a uid that owns them
    lines.append(f"mount -o remount,ro,nosuid,nodev,noexec {r}/proc")
    # pivot_root, not chroot: the old root is detached, so there is nothing left to climb back to
    lines.append(f"cd {r} && mkdir .old && pivot_root . .old && umount -l /.old && rmdir /.old")
    drop = ["setpriv"] + ([f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"] if kind == "nobody" else [])
    drop += ["--no-new-privs", "--bounding-set=-all", "--inh-caps=-all", "--"]
    # Not `exec`: this shell must stay pid 1, so that the namespace ends with the code. The code runs in a
    # subshell with the stderr we were given; this shell's own goes away (it would add "Killed" to the output).
    lines += [f"cd {WORKDIR}", "exec 3>&2 2>/dev/null", f"(exec {shlex.join([*drop, *argv])} 2>&3 3>&-)", "exit $?"]
    return "\n".join(lines)


def command(argv: Sequence[str], root: str, kind: str, disk_mb: int = 256) -> list[str]:
    """`argv` inside a sandbox whose new root is mounted at `root` (an empty folder; see setup_script)."""
    user = ["--user", "--map-root-user"] if kind == "userns" else []
    # found on our PATH, as the probe found it (the code's environment has a PATH of its own)
    return [shutil.which("unshare") or "unshare", *user, "--mount", "--pid", "--net", "--ipc", "--uts", "--cgroup",
            "--fork", "--kill-child", "sh", "-c", setup_script(argv, root, kind, disk_mb)]


def probe(kind: str) -> str | None:
    """None where a sandbox of this kind runs Python here, else why not (the first lines of what failed)."""
    if not sys.platform.startswith("linux"):
        return f"it needs Linux namespaces and this is {sys.platform}"
    missing = [tool for tool in ("unshare", "setpriv", "pivot_root", "mount") if shutil.which(tool) is None]
    if missing:
        return f"{', '.join(missing)} not found (util-linux)"
    with tempfile.TemporaryDirectory(prefix="gptoss-sandbox-") as root:
        argv = command([sys.executable, "-I", "-c", "print('ok')"], root, kind)
        try:
            done = subprocess.run(argv, capture_output=True, text=True, errors="replace", timeout=30,
                                  stdin=subprocess.DEVNULL, env={"PATH": "/usr/bin:/bin"})
        except subprocess.TimeoutExpired:
            return "a trial sandbox did not start within 30 s"
    if done.returncode == 0 and done.stdout == "ok\n":
        return None
    reason = (done.stderr or done.stdout).strip().splitlines()
    return "; ".join(reason[:3]) or f"a trial sandbox exited with status {done.returncode}"


@functools.cache  # a property of the machine: probed once per process
def isolation() -> str:
    """The sandbox kind that works here ("nobody" or "userns"); SandboxUnavailable if none does."""
    k = default_kind()
    reason = probe(k)
    if reason is not None:
        need = ("mount, PID and network namespaces (CAP_SYS_ADMIN) and an interpreter that uid 65534 can run"
                if k == "nobody" else "unprivileged user namespaces")
        raise SandboxUnavailable(
            f"the python tool cannot isolate the model's code on this machine: {reason}. It needs Linux, "
            f"util-linux (unshare, setpriv, pivot_root, mount) and {need}. To run the code without a sandbox "
            "(it can then read and write your files and use the network), pass --python-unsafe.")
    return k
