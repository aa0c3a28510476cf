"""Sandbox launcher: runs ONE untrusted Python program, contained. Standard library only.

Processes: launcher (root, host namespaces) -> A (init of the new namespaces, root) -> B (the
program's parent: unprivileged uid, limits) -> C (the program, `python -I prog.py`).
Started by `rewire_jax.eval.sandbox` as `python -I -S _launcher.py CONFIG_JSON` with the program
source on stdin, in a new session (process group). It prints one JSON line on stdout:

    {"status": "exited" | "signalled" | "timeout" | "setup_error",
     "code": int | null, "signal": int | null, "marker": bool, "output": str (tail),
     "protections": [str, ...]}

Containment (each step is recorded in "protections" when it took effect):
  - unshare(CLONE_NEWNET | CLONE_NEWPID | CLONE_NEWNS | CLONE_NEWIPC | CLONE_NEWUTS) (as root): a
    network namespace with only a downed loopback (no connection anywhere, 127.0.0.1 included); a
    PID namespace whose init (A) exits with the program's parent (B), and then the kernel kills
    every process left in the namespace; a private mount namespace with fresh size-limited tmpfs on /tmp,
    /var/tmp and /dev/shm (the program's working directory is in that /tmp).
  - the program runs as an unprivileged uid/gid (root only), with RLIMIT_NPROC (per real uid, hence
    the unprivileged uid), RLIMIT_CPU, RLIMIT_AS, RLIMIT_FSIZE, RLIMIT_NOFILE, RLIMIT_CORE=0,
    PR_SET_PDEATHSIG=SIGKILL (dies with the launcher), stdin /dev/null, a cleaned environment.
  - a wall-clock timeout after which the program (and with it the whole PID namespace and its
    process group) is SIGKILLed.
The program proves it ran to its end by writing `marker` to fd 3 (a pipe to this launcher).
"""
import ctypes
import json
import os
import resource
import shutil
import signal
import sys
import tempfile
import time

CLONE_NEWNS, CLONE_NEWUTS, CLONE_NEWIPC = 0x00020000, 0x04000000, 0x08000000
CLONE_NEWPID, CLONE_NEWNET = 0x20000000, 0x40000000
MS_NOSUID, MS_NODEV, MS_REC, MS_PRIVATE = 2, 4, 16384, 1 << 18
PR_SET_PDEATHSIG = 1


def _isolate(libc, protections):
    """unshare namespaces (root only); private mounts + fresh tmpfs. Appends what worked."""
    if os.geteuid() != 0:
        return
    flags = CLONE_NEWNET | CLONE_NEWPID | CLONE_NEWNS | CLONE_NEWIPC | CLONE_NEWUTS
    if libc.unshare(flags) != 0:
        if libc.unshare(CLONE_NEWNET) == 0:
            protections.append("netns")
        return
    protections += ["netns", "pidns", "ipcns"]
    # make every mount private first: never let a mount below leak to the host
    if libc.mount(b"none", b"/", None, MS_REC | MS_PRIVATE, None) != 0:
        return
    ok = True
    for d in (b"/tmp", b"/var/tmp", b"/dev/shm"):
        if os.path.isdir(d):
            ok &= libc.mount(b"tmpfs", d, b"tmpfs", MS_NOSUID | MS_NODEV, b"size=64m,mode=1777") == 0
    if ok:
        protections.append("private-tmpfs")


def _exit_with(st):
    """Exit with a waited child's status: its code, or 128 + signal."""
    os._exit(os.WEXITSTATUS(st) if os.WIFEXITED(st) else 128 + os.WTERMSIG(st))


def _init(cfg, workdir, out_fd, marker_w):
    """Process A, pid 1 of the new PID namespace (root): forks the 'parent' B, reaps orphans, exits
    when B does (the kernel then kills everything left in the namespace). B killed -> status 255."""
    try:
        ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        os.setsid()
        b = os.fork()
        if b == 0:
            _parent(cfg, workdir, out_fd, marker_w)
        os.close(marker_w)
        while True:
            pid, st = os.wait()
            if pid == b:
                os._exit(255 if os.WIFSIGNALED(st) else os.WEXITSTATUS(st))
    except BaseException as e:   # noqa: BLE001
        os.write(out_fd, f"sandbox init failed: {e!r}\n".encode())
    os._exit(254)


def _parent(cfg, workdir, out_fd, marker_w):
    """Process B: drops to the unprivileged uid and the limits, forks the program C and exits with
    its status. A program that kills its parent (B) therefore fails: A sees B die and exits 255."""
    try:
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.dup2(out_fd, 1)
        os.dup2(out_fd, 2)
        os.dup2(marker_w, 3)
        os.closerange(4, 1 << 16)
        lim = cfg["limits"]
        for name, value in (("RLIMIT_CPU", lim["cpu_s"]), ("RLIMIT_AS", lim["address_space"]),
                            ("RLIMIT_FSIZE", lim["file_size"]), ("RLIMIT_NOFILE", lim["open_files"]),
                            ("RLIMIT_CORE", 0)):
            resource.setrlimit(getattr(resource, name), (value, value))
        os.chdir(workdir)
        # RLIMIT_NPROC counts the processes of the real uid (and is not enforced for root): it
        # bounds the sandbox only together with the switch to the unprivileged uid
        resource.setrlimit(resource.RLIMIT_NPROC, (lim["processes"], lim["processes"]))
        if os.geteuid() == 0:
            os.setgroups([])
            os.setgid(cfg["gid"])
            os.setuid(cfg["uid"])
        libc = ctypes.CDLL(None)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)   # after setuid, which clears it
        c = os.fork()
        if c == 0:
            libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
            env = {"PATH": "/usr/bin:/bin", "HOME": workdir, "TMPDIR": workdir, "LANG": "C.UTF-8",
                   "PYTHONHASHSEED": "0", "PYTHONDONTWRITEBYTECODE": "1"}
            os.execve(cfg["python"], [cfg["python"], "-I", "prog.py"], env)
        os.close(3)
        _exit_with(os.waitpid(c, 0)[1])
    except BaseException as e:   # noqa: BLE001 - report anything, never return into the launcher
        os.write(2, f"sandbox setup failed: {e!r}\n".encode())
    os._exit(254)


def _wait(pid, timeout):
    """-> (status, code, signal); SIGKILLs the child (and its group) at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        done, st = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() >= deadline:
            for kill in (lambda: os.killpg(pid, signal.SIGKILL), lambda: os.kill(pid, signal.SIGKILL)):
                try:
                    kill()
                except OSError:
                    pass
            os.waitpid(pid, 0)
            return "timeout", None, signal.SIGKILL
        time.sleep(0.005)
    if os.WIFSIGNALED(st):
        return "signalled", None, os.WTERMSIG(st)
    return "exited", os.WEXITSTATUS(st), None


def main():
    cfg = json.loads(sys.argv[1])
    src = sys.stdin.buffer.read()
    protections = []
    libc = ctypes.CDLL(None, use_errno=True)
    _isolate(libc, protections)
    workdir = tempfile.mkdtemp(prefix="sample-", dir="/tmp")
    if os.geteuid() == 0:
        os.chown(workdir, cfg["uid"], cfg["gid"])
        protections.append("unprivileged-uid")
    with open(os.path.join(workdir, "prog.py"), "wb") as f:
        f.write(src)
    out_path = os.path.join(workdir, ".output")
    out_fd = os.open(out_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    marker_r, marker_w = os.pipe()
    pid = os.fork()   # A: with CLONE_NEWPID, pid 1 of the new namespace
    if pid == 0:
        _init(cfg, workdir, out_fd, marker_w)
    os.close(marker_w)
    os.close(out_fd)
    status, code, sig = _wait(pid, cfg["timeout_s"])
    os.set_blocking(marker_r, False)
    try:
        got = os.read(marker_r, 4096)
    except BlockingIOError:
        got = b""
    with open(out_path, "rb") as f:
        f.seek(max(0, os.path.getsize(out_path) - cfg["output_tail"]))
        output = f.read().decode("utf-8", "replace")
    shutil.rmtree(workdir, ignore_errors=True)
    marker = got.strip() == cfg["marker"].encode()
    print(json.dumps({"status": status, "code": code, "signal": sig, "marker": marker, "output": output,
                      "protections": protections}), flush=True)


if __name__ == "__main__":
    main()
