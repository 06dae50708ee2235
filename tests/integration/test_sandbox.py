"""Process sandboxes (local, bwrap), real processes: output, environment, limits, cleanup, isolation.

Every test that could hurt the machine runs under small limits (64 processes, 512 MB, seconds
of time). "Nothing left" is checked with a /proc scan written here, independently of the
sandbox's own: any live process that carries the sandbox's mark in its environment or runs as
its uid.
"""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from arborl.rollout.sandboxes import (
    SYSTEM_PATH,
    BwrapSandbox,
    Limits,
    LocalSandbox,
    ProcessSandbox,
    SandboxClosed,
    SandboxError,
    SandboxExpired,
    bwrap_unavailable_reason,
    make_sandbox,
)

LIMITS = Limits(wall_s=60, command_s=10, memory_mb=512, processes=64, output_bytes=64_000, kill_grace_s=0.3)
IS_ROOT = os.geteuid() == 0
BWRAP_MISSING = bwrap_unavailable_reason()
KINDS = ["local", pytest.param("bwrap", marks=pytest.mark.skipif(BWRAP_MISSING is not None, reason=str(BWRAP_MISSING)))]
needs_bwrap = pytest.mark.skipif(BWRAP_MISSING is not None, reason=str(BWRAP_MISSING))


def leftovers(sandbox: ProcessSandbox) -> list[int]:
    """Live processes marked as the sandbox's (its environment mark, or its uid when it has one)."""
    mark = f"ARBORL_SANDBOX_ID={sandbox.id}".encode()
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == os.getpid():
            continue
        try:
            status = Path(f"/proc/{name}/status").read_text()
            environ = Path(f"/proc/{name}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        if fields["State"].split()[0] in ("Z", "X"):
            continue
        uids = {int(uid) for uid in fields["Uid"].split()}
        if mark in environ or (sandbox.switches_uid and sandbox.uid in uids):
            found.append(int(name))
    return found


def wait_reaped(sandbox: ProcessSandbox, timeout_s: float = 5.0) -> None:
    """Wait until no zombie of the sandbox's uid is left. Killed orphans count against its
    process limit until init reaps them, and this container's init reaps only every second or so
    (a real init, or bwrap's, does it at once)."""
    if not sandbox.switches_uid:
        return
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        zombies = 0
        for name in os.listdir("/proc"):
            try:
                status = Path(f"/proc/{name}/status").read_text() if name.isdigit() else ""
            except OSError:
                continue
            if f"\nUid:\t{sandbox.uid}\t" in status and "State:\tZ" in status:
                zombies += 1
        if not zombies:
            return
        time.sleep(0.05)


@pytest.fixture
def layout() -> Iterator[Path]:
    """A folder other users can search (pytest's tmp_path sits under a 0700 folder, which a
    local sandbox's uid could not cross), holding a fake run folder next to the sandboxes."""
    top = Path(tempfile.mkdtemp(prefix="arborl-sandbox-test-"))
    top.chmod(0o755)
    run = top / "run"
    run.mkdir()
    (run / "store.sqlite").write_text("not really sqlite, but world-readable like one")
    (run / "store.sqlite").chmod(0o644)
    (run / "admin-token").write_text("admin-secret-token")
    (run / "admin-token").chmod(0o600)
    try:
        yield top
    finally:
        shutil.rmtree(top, ignore_errors=True)


@pytest.fixture(params=KINDS)
def sandbox(request, layout: Path) -> Iterator[ProcessSandbox]:
    with make_sandbox(request.param, layout / "sandboxes", name="test", limits=LIMITS) as box:
        yield box
    assert leftovers(box) == []
    assert not box.dir.exists()


# -- commands ----------------------------------------------------------------------------------


def test_run_returns_output_exit_codes_and_honours_cwd_and_stdin(sandbox: ProcessSandbox):
    result = sandbox.run("echo out; echo err >&2; exit 3")
    assert (result.exit_code, result.stdout, result.stderr, result.timed_out) == (3, "out\n", "err\n", False)
    assert result.seconds < 5

    assert sandbox.run(["printf", "%s|", "a b", "c"]).stdout == "a b|c|"
    assert sandbox.run("mkdir -p sub/dir && echo hi > sub/dir/f").ok
    assert (sandbox.workspace / "sub/dir/f").read_text() == "hi\n"
    assert sandbox.run("pwd", cwd="sub/dir").stdout.strip() == f"{sandbox.workspace_inside}/sub/dir"
    assert sandbox.run("pwd").stdout.strip() == sandbox.workspace_inside
    assert sandbox.run("cat", stdin="piped in").stdout == "piped in"
    assert sandbox.run("cat").stdout == ""  # stdin is /dev/null, never the gateway's
    # a command killed by a signal of its own reports 128 + the signal, as a shell does
    assert sandbox.run(["python3", "-c", "import os, signal; os.kill(os.getpid(), signal.SIGSEGV)"]).exit_code == 139
    with pytest.raises(SandboxError):
        sandbox.run("true", cwd="../elsewhere")


def test_environment_is_fresh_and_leaks_nothing_from_the_parent(sandbox: ProcessSandbox, monkeypatch):
    monkeypatch.setenv("ARBORL_ADMIN_TOKEN", "admin-secret-from-the-gateway")
    monkeypatch.setenv("OPENAI_API_KEY", "sk-parent-secret")
    monkeypatch.setenv("ARBORL_RUN_DIR", "/somewhere/runs/default")
    output = sandbox.run("env", env={"ANTHROPIC_BASE_URL": "http://127.0.0.1:1/s/x"}).stdout
    env = dict(line.split("=", 1) for line in output.splitlines() if "=" in line)
    assert "admin-secret-from-the-gateway" not in output and "sk-parent-secret" not in output
    assert "ARBORL_ADMIN_TOKEN" not in env and "OPENAI_API_KEY" not in env and "ARBORL_RUN_DIR" not in env
    assert env["ANTHROPIC_BASE_URL"] == "http://127.0.0.1:1/s/x"
    assert env["HOME"] == sandbox.home_inside and env["ARBORL_SANDBOX_ID"] == sandbox.id
    assert env["PATH"] == SYSTEM_PATH  # not the parent's (here it holds /root/.pyenv)
    # the caller cannot unmark a process (the mark is how close() finds it)
    assert sandbox.run("echo $ARBORL_SANDBOX_ID", env={"ARBORL_SANDBOX_ID": "other"}).stdout.strip() == sandbox.id
    assert sandbox.run("echo hi > $HOME/h && cat $HOME/h").stdout == "hi\n"
    assert (sandbox.home / "h").read_text() == "hi\n"


def test_output_over_the_limit_keeps_head_and_tail(sandbox: ProcessSandbox):
    result = sandbox.run("echo FIRST; head -c 1000000 /dev/zero | tr '\\0' x; echo; echo LAST")
    assert result.ok
    assert len(result.stdout) < LIMITS.output_bytes + 200
    assert result.stdout.startswith("FIRST\n") and result.stdout.endswith("LAST\n")
    assert "bytes omitted" in result.stdout


def test_timeout_kills_the_whole_group_and_leaves_nothing(sandbox: ProcessSandbox):
    started = time.monotonic()
    result = sandbox.run("sleep 100 & sleep 100 & while :; do :; done", timeout_s=1)
    assert result.timed_out and result.exit_code is None
    assert 1 <= result.seconds < 1 + LIMITS.kill_grace_s + 2
    assert time.monotonic() - started < 5
    assert leftovers(sandbox) == []
    # the sandbox stays usable
    assert sandbox.run("echo again").stdout == "again\n"


def test_background_jobs_do_not_hold_run_and_die_by_close_at_the_latest(sandbox: ProcessSandbox):
    result = sandbox.run("sleep 100 & echo started")  # the job holds stdout: run must not wait for it
    assert result.stdout == "started\n" and result.seconds < 2
    # local: it lives on, as in a terminal; bwrap: it ended with the command's pid namespace
    assert bool(leftovers(sandbox)) == (sandbox.kind == "local")
    sandbox.kill_all()
    assert leftovers(sandbox) == []


# -- limits ------------------------------------------------------------------------------------


FORK_COUNTER = """
import os, signal, time
children = []
for _ in range(1000):
    try:
        pid = os.fork()
    except OSError:
        continue
    if pid == 0:
        time.sleep(30)
        os._exit(0)
    children.append(pid)
for pid in children:
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
print(len(children))
"""

FORK_BOMB = """
import os
while True:
    try:
        os.fork()
    except OSError:
        pass
"""


def test_process_limit_holds_and_fork_bombs_leave_nothing(sandbox: ProcessSandbox):
    counted = sandbox.run(["python3", "-c", FORK_COUNTER], timeout_s=10)
    assert counted.ok, counted.stderr
    assert 0 < int(counted.stdout) < LIMITS.processes  # the limit stopped it, not the loop's end
    assert leftovers(sandbox) == []
    wait_reaped(sandbox)

    classic = sandbox.run(":(){ :|:& };:", timeout_s=2)  # returns at once, leaving its jobs (local)
    assert not classic.timed_out
    sandbox.kill_all()
    assert leftovers(sandbox) == []
    wait_reaped(sandbox)

    bomb = sandbox.run(["python3", "-c", FORK_BOMB], timeout_s=1.5)
    assert bomb.timed_out and bomb.exit_code is None
    assert leftovers(sandbox) == []


def test_memory_hog_is_stopped_by_the_memory_limit(sandbox: ProcessSandbox):
    hog = sandbox.run(["python3", "-c", "x = bytearray(1024 * 1024 * 1024); print('allocated')"])
    assert hog.exit_code not in (0, None) and "MemoryError" in hog.stderr and "allocated" not in hog.stdout
    fits = sandbox.run(["python3", "-c", "x = bytearray(100 * 1024 * 1024); print('allocated')"])
    assert fits.ok and fits.stdout == "allocated\n"


# -- processes that outlive their command ---------------------------------------------------------

DAEMON = """
import os
child = os.fork()
if child == 0:
    os.setsid()
    if os.fork() == 0:
        os.execve("/bin/sleep", ["sleep", "300"], {})   # double-forked, own session, no environment
    os._exit(0)
os.waitpid(child, 0)  # the daemon has left the command's group before the command exits
print("daemonised")
"""


def test_daemon_that_escaped_its_command_is_killed_by_close(layout: Path):
    sandbox = LocalSandbox(layout / "sandboxes", name="daemon", limits=LIMITS)
    result = sandbox.run(["python3", "-c", DAEMON])
    assert result.stdout == "daemonised\n"
    time.sleep(0.2)
    alive = sandbox.processes()
    if IS_ROOT:  # its own uid finds it even without the environment mark
        assert alive and set(alive) <= set(leftovers(sandbox))
    sandbox.close()
    assert leftovers(sandbox) == [] and sandbox.processes() == []
    assert not sandbox.dir.exists()


@needs_bwrap
def test_bwrap_daemon_ends_with_its_pid_namespace(layout: Path):
    with BwrapSandbox(layout / "sandboxes", name="daemon", limits=LIMITS) as sandbox:
        assert sandbox.run(["python3", "-c", DAEMON]).stdout == "daemonised\n"
        assert leftovers(sandbox) == []


def test_popen_is_tracked_and_killed_with_everything_it_started(sandbox: ProcessSandbox):
    log = sandbox.dir / "scaffold.log"
    with log.open("wb") as out:
        proc = sandbox.popen(["bash", "-c", "setsid sleep 300 & echo up; exec sleep 301"], stdout=out)
    deadline = time.monotonic() + 5
    while log.read_text() != "up\n" and time.monotonic() < deadline:
        time.sleep(0.02)
    assert proc.poll() is None and len(leftovers(sandbox)) >= 2
    sandbox.close()
    assert proc.returncode is not None
    assert leftovers(sandbox) == []
    with pytest.raises(SandboxClosed):
        sandbox.run("true")


def test_wall_limit_kills_long_running_processes_and_ends_the_sandbox(layout: Path):
    limits = Limits(wall_s=1.0, command_s=10, memory_mb=512, processes=64, kill_grace_s=0.2)
    with LocalSandbox(layout / "sandboxes", name="wall", limits=limits) as sandbox:
        proc = sandbox.popen(["sleep", "100"])
        assert proc.wait(timeout=5) is not None
        assert sandbox.expired
        deadline = time.monotonic() + 3  # the watchdog thread may still be sweeping
        while leftovers(sandbox) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert leftovers(sandbox) == []
        with pytest.raises(SandboxExpired):
            sandbox.run("true")


# -- files ---------------------------------------------------------------------------------------


def test_source_is_copied_and_host_files_are_handed_over(sandbox: ProcessSandbox, layout: Path, tmp_path: Path):
    source = tmp_path / "repo"
    (source / "pkg").mkdir(parents=True)
    (source / "pkg/mod.py").write_text("X = 1\n")
    with make_sandbox(sandbox.kind, layout / "sandboxes", name="seeded", limits=LIMITS, source=source) as seeded:
        (seeded.workspace / "written-by-host.txt").write_text("host\n")  # as task.materialize would
        assert seeded.run("cat pkg/mod.py && echo more >> written-by-host.txt").ok
        assert (seeded.workspace / "written-by-host.txt").read_text() == "host\nmore\n"
    assert (source / "pkg/mod.py").read_text() == "X = 1\n"  # the source itself is untouched


def test_copy_in_writes_as_the_sandbox_and_refuses_to_escape(sandbox: ProcessSandbox, layout: Path, tmp_path: Path):
    hidden = tmp_path / "hidden"
    hidden.mkdir()
    (hidden / "test_x.py").write_text("def test_x(): pass\n")
    (hidden / "run.sh").write_text("#!/bin/sh\necho ran\n")
    (hidden / "run.sh").chmod(0o755)
    sandbox.copy_in(hidden, "tests")
    sandbox.copy_in(hidden / "test_x.py", "deep/er/renamed.py")
    assert sandbox.run("tests/run.sh && cat deep/er/renamed.py").stdout == "ran\ndef test_x(): pass\n"
    assert (sandbox.workspace / "tests/test_x.py").stat().st_uid == sandbox.uid

    # the agent leaves a symlink to a host folder where the tests will go
    sandbox.run(f"rm -rf tests && ln -s {layout / 'run'} tests")
    with pytest.raises(SandboxError):
        sandbox.copy_in(hidden / "test_x.py", "tests/test_x.py")
    assert not (layout / "run/test_x.py").exists()
    with pytest.raises(SandboxError):
        sandbox.copy_in(hidden, "../outside")


# -- isolation -----------------------------------------------------------------------------------


@pytest.fixture
def loopback_server() -> Iterator[int]:
    """A TCP server on 127.0.0.1 that greets each connection (a stand-in for the gateway)."""
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(0.2)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            with conn:
                conn.sendall(b"hello from the gateway\n")

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield server.getsockname()[1]
    stop.set()
    thread.join()
    server.close()


@needs_bwrap
def test_bwrap_sees_only_its_own_workspace_and_reaches_loopback(layout: Path, loopback_server: int):
    root = layout / "sandboxes"
    with BwrapSandbox(root, name="a", limits=LIMITS) as a, BwrapSandbox(root, name="b", limits=LIMITS) as b:
        (b.workspace / "secret.txt").write_text("b's work")
        (a.workspace / "mine.txt").write_text("a's work")

        assert a.run("pwd && cat /workspace/mine.txt").stdout == "/workspace\na's work"
        for path in [b.workspace / "secret.txt", layout / "run/store.sqlite", layout / "run/admin-token"]:
            assert not a.run(["cat", str(path)]).ok, path
        for folder in [root, layout, layout / "run"]:
            assert not a.run(["ls", str(folder)]).ok, folder
        visible = set(a.run("ls /").stdout.split())
        assert visible <= {"bin", "dev", "etc", "home", "lib", "lib32", "lib64", "libx32", "proc", "sbin", "tmp",
                           "usr", "workspace"}, visible
        assert a.run("ls /home").stdout == "agent\n"

        for outside in ["/usr/x", "/etc/x", "/x", "/home/x", "/proc/x"]:
            assert not a.run(["touch", outside]).ok, outside
        assert a.run("touch /workspace/w /tmp/t $HOME/h && ls /tmp").stdout == "t\n"
        assert (a.workspace / "w").exists() and (a.home / "h").exists()

        # its own pid namespace: no view of the host's processes
        assert len(a.run("ls /proc | grep -c '^[0-9]'").stdout.strip()) <= 2

        greeting = a.run(f"exec 3<>/dev/tcp/127.0.0.1/{loopback_server} && head -n 1 <&3")
        assert greeting.stdout == "hello from the gateway\n", greeting.stderr


@pytest.mark.skipif(not IS_ROOT, reason="uid isolation needs arborl to run as root")
def test_local_isolates_by_uid_but_not_the_filesystem(layout: Path):
    root = layout / "sandboxes"
    with LocalSandbox(root, name="a", limits=LIMITS) as a, LocalSandbox(root, name="b", limits=LIMITS) as b:
        assert a.uid != b.uid
        (b.workspace / "secret.txt").write_text("b's work")
        b.hand_over()
        assert not a.run(["cat", str(b.workspace / "secret.txt")]).ok
        assert not a.run(["cat", str(layout / "run/admin-token")]).ok  # 0600: root only
        assert not a.run(["touch", str(layout / "run/planted")]).ok
        # what local does not isolate: world-readable files are readable (use bwrap for that)
        assert a.run(["cat", str(layout / "run/store.sqlite")]).ok


@pytest.mark.skipif(not IS_ROOT, reason="only a root-run local sandbox needs a searchable root")
def test_local_refuses_a_root_its_uid_cannot_reach(tmp_path: Path):
    hidden = tmp_path / "private"
    hidden.mkdir(mode=0o700)
    with pytest.raises(SandboxError, match="not searchable"):
        LocalSandbox(hidden / "sandboxes", name="x", limits=LIMITS)
    assert list((hidden / "sandboxes").iterdir()) == []


def test_bad_arguments_are_clear_errors(layout: Path):
    with pytest.raises(SandboxError, match="unknown sandbox kind"):
        make_sandbox("vm", layout, name="x", limits=LIMITS)  # type: ignore[arg-type] (docker is a kind now)
    with pytest.raises(ValueError):
        Limits(processes=0)
    with pytest.raises(SandboxError):
        make_sandbox("local", layout, name="x", limits=LIMITS, source=layout / "missing")


def test_keep_leaves_the_scratch_folder_but_no_process(layout: Path):
    sandbox = LocalSandbox(layout / "sandboxes", name="../../kept", limits=LIMITS, keep=True)
    assert sandbox.dir.parent == layout / "sandboxes"  # the name cannot climb out
    sandbox.run("echo result > out.txt; (setsid sleep 300 &)")
    sandbox.close()
    assert (sandbox.workspace / "out.txt").read_text() == "result\n"
    assert leftovers(sandbox) == []
    if IS_ROOT:  # given back to root: a later sandbox leasing the same uid cannot read it
        assert (sandbox.workspace / "out.txt").stat().st_uid == 0


@needs_bwrap
def test_bwrap_exposes_host_paths_read_only(layout: Path):
    tools = layout / "toolchain"
    tools.mkdir()
    (tools / "tool.sh").write_text("echo tool ran\n")
    tools.chmod(0o755)
    (tools / "tool.sh").chmod(0o755)
    with make_sandbox("bwrap", layout / "sandboxes", name="x", limits=LIMITS, expose=[tools]) as sandbox:
        assert sandbox.run([str(tools / "tool.sh")]).stdout == "tool ran\n"
        assert not sandbox.run(["touch", str(tools / "new")]).ok
        assert not sandbox.run(["ls", str(layout / "run")]).ok  # only what was exposed


@needs_bwrap
def test_bwrap_puts_the_workspace_where_the_task_expects_it(layout: Path):
    # Harbor tasks assume their working directory is /app: there it is, and nowhere else
    with make_sandbox("bwrap", layout / "sandboxes", name="x", limits=LIMITS, workspace_at="/app") as sandbox:
        (sandbox.workspace / "given.txt").write_text("from the task\n")
        assert sandbox.workspace_inside == "/app"
        assert sandbox.run("pwd && cat /app/given.txt && touch /app/made.txt").stdout == "/app\nfrom the task\n"
        assert (sandbox.workspace / "made.txt").exists()
        assert not sandbox.run(["ls", "/workspace"]).ok
        (sandbox.workspace / "sub").mkdir()
        sandbox.hand_over()
        assert sandbox.run("pwd", cwd="sub").stdout == "/app/sub\n"
    for where in ("app", "/", "/usr/app", "/proc", "/home/agent", "/tmp/x", "/a/../etc"):
        with pytest.raises(SandboxError, match="workspace"):
            make_sandbox("bwrap", layout / "sandboxes", name="x", limits=LIMITS, workspace_at=where)


def test_local_cannot_move_its_workspace_and_says_where_it_is(layout: Path):
    with make_sandbox("local", layout / "sandboxes", name="x", limits=LIMITS, workspace_at="/app") as sandbox:
        assert sandbox.workspace_inside == str(sandbox.workspace)  # the caller rewrites /app to this
        assert sandbox.run("pwd").stdout == f"{sandbox.workspace}\n"
