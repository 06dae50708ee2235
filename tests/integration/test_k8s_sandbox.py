"""The ``k8s`` sandbox against a recorded Kubernetes API conversation (tests/k8s_api_replay.py):
the real kubernetes client and websocket exec protocol on loopback, every request checked
against the recording, and the pod it asks for validated against the Kubernetes schema.

No cluster runs here: what a kubelet does with the pod (limits, the exec'd processes) is the
contract suite's to check where a cluster answers.
"""

from __future__ import annotations

import json

import pytest

pytest.importorskip("kubernetes", reason="the k8s sandbox needs the kubernetes client (the test extra has it)")
kubernetes_validate = pytest.importorskip("kubernetes_validate")

from k8s_api_replay import ApiReplay  # noqa: E402
from kubernetes import client  # noqa: E402

from arborl.rollout.sandboxes import (  # noqa: E402
    Limits,
    PodOptions,
    SandboxError,
    SandboxExpired,
    SandboxUnavailable,
    make_sandbox,
)
from arborl.rollout.sandboxes.k8s_pod import PodSpec, exit_code_of_status, pod_name  # noqa: E402
from arborl.rollout.settings import RolloutSettings  # noqa: E402

LIMITS = Limits(wall_s=3600, command_s=600, kill_grace_s=1)
OPTIONS = PodOptions(image="ghcr.io/example/arborl-sandbox:1", namespace="arborl-test")
SECRET = {"OPENAI_API_KEY": "sk-test-secret", "OPENAI_BASE_URL": "http://arborl-gateway:8000/v1"}


@pytest.fixture
def replay(request):
    server = ApiReplay.named(request.param)
    yield server
    server.close()


def sandbox_on(replay: ApiReplay, tmp_path, **options):
    return make_sandbox("k8s", tmp_path / "scratch", name="contract", limits=LIMITS,
                        pod=OPTIONS.model_copy(update=options), configuration=client.Configuration(host=replay.url))


def assert_as_recorded(replay: ApiReplay) -> None:
    assert replay.mismatches == []
    assert replay.finished, f"{len(replay.exchanges) - replay.position} recorded requests were never made"


@pytest.mark.parametrize("replay", ["lifecycle"], indirect=True)
def test_a_pod_sandbox_runs_its_life_through_the_api(replay, tmp_path):
    source = tmp_path / "task"
    source.mkdir()
    (source / "hello.txt").write_text("hello\n")
    sandbox = make_sandbox("k8s", tmp_path / "scratch", name="contract", limits=LIMITS, source=source, pod=OPTIONS,
                           configuration=client.Configuration(host=replay.url))
    assert sandbox.kind == "k8s" and sandbox.workspace_inside == "/workspace" and sandbox.home_inside == "/home/agent"

    failed = sandbox.run("cat hello.txt; echo oops >&2; exit 3", env=SECRET)
    assert (failed.exit_code, failed.stdout, failed.stderr, failed.timed_out) == (3, "hello\n", "oops\n", False)

    piped = sandbox.run(["tr", "a-z", "A-Z"], stdin="line\n", cwd="sub")
    assert piped.ok and piped.stdout == "LINE\n"

    slow = sandbox.run("sleep 30", timeout_s=0.5)
    assert slow.exit_code is None and slow.timed_out

    sandbox.copy_out("out", tmp_path / "out")
    assert (tmp_path / "out" / "result.txt").read_text() == "42\n"
    assert (tmp_path / "out" / "logs" / "run.log").read_text() == "ok\n"
    with pytest.raises(SandboxError, match="refused"):  # a link out of the destination
        sandbox.copy_out("out", tmp_path / "out2")
    assert not (tmp_path / "out2" / "leak").exists()

    process = sandbox.start(["bash", "-c", "echo started; sleep 1; echo done"])
    assert process.wait(timeout=30) == 0 and process.poll() == 0
    assert process.output() == "started\ndone\n"

    sandbox.kill_all()  # nothing left to kill: kill's own exit code 1 is no error
    sandbox.close()
    sandbox.close()  # idempotent: no second DELETE
    assert_as_recorded(replay)
    # no variable's value is ever in a request line (the API server's audit log): only on stdin
    assert "sk-test-secret" not in json.dumps(replay.requests)
    assert not (tmp_path / "scratch" / sandbox.id).exists()


@pytest.mark.parametrize("replay", ["created"], indirect=True)
def test_the_pod_asked_for_is_a_valid_locked_down_pod(replay, tmp_path):
    sandbox_on(replay, tmp_path).close()
    assert_as_recorded(replay)
    [pod] = replay.pod_bodies
    for version in ("1.37.0", "1.30.0"):
        kubernetes_validate.validate(pod, version, strict=True)
    spec = pod["spec"]
    assert spec["automountServiceAccountToken"] is False and spec["restartPolicy"] == "Never"
    assert spec["securityContext"]["runAsNonRoot"] is True and spec["securityContext"]["runAsUser"] == 1000
    [container] = spec["containers"]
    assert container["securityContext"] == {"allowPrivilegeEscalation": False, "privileged": False,
                                            "capabilities": {"drop": ["ALL"]}}
    assert container["resources"]["limits"] == {"cpu": "1", "memory": f"{LIMITS.memory_mb}Mi"}
    assert spec["activeDeadlineSeconds"] > LIMITS.wall_s  # the kubelet ends a pod nobody deleted


@pytest.mark.parametrize("replay", ["image_pull_failure"], indirect=True)
def test_an_image_that_does_not_pull_is_an_unavailable_sandbox_and_its_pod_goes(replay, tmp_path):
    with pytest.raises(SandboxUnavailable, match="ErrImagePull.*not found"):
        sandbox_on(replay, tmp_path)
    assert_as_recorded(replay)  # the DELETE was made


@pytest.mark.parametrize("replay", ["forbidden"], indirect=True)
def test_a_namespace_the_worker_may_not_use_says_so(replay, tmp_path):
    with pytest.raises(SandboxUnavailable, match="403 pods is forbidden"):
        sandbox_on(replay, tmp_path)
    assert_as_recorded(replay)


@pytest.mark.parametrize("replay", ["exec_fails"], indirect=True)
def test_an_exec_that_fails_in_the_kubelet_is_an_error_not_an_exit_code(replay, tmp_path):
    sandbox = sandbox_on(replay, tmp_path)
    with pytest.raises(SandboxError, match="container is not created or running"):
        sandbox.run("true")
    sandbox.close()
    assert_as_recorded(replay)


def test_the_preamble_quotes_every_value_and_reads_exactly_the_stdin_given():
    spec = PodSpec(pod="arborl-x", sandbox_id="x", namespace="ns", options=OPTIONS, limits=LIMITS)
    preamble = spec.preamble({"A": "it's $HOME; rm -rf /", "B": "two\nlines"}, cwd="a b", stdin_bytes=12)
    assert int(preamble[:8]) == len(preamble) - 8
    line = preamble[8:].decode()
    assert line == ("cd -- '/workspace/a b' && head -c 12 | "
                    "env -i 'A=it'\"'\"'s $HOME; rm -rf /' 'B=two\nlines' \"$@\"")
    assert spec.preamble({}, cwd=".")[8:].decode().endswith('"$@" </dev/null')
    with pytest.raises(SandboxError):
        spec.preamble({}, cwd="../out")
    assert spec.exec_command(["ls"], timeout_s=None)[-1] == "ls"


def test_exit_codes_come_from_the_exec_status():
    assert exit_code_of_status(b'{"metadata":{},"status":"Success"}') == 0
    nonzero = {"status": "Failure", "reason": "NonZeroExitCode", "details": {"causes": [{"reason": "ExitCode",
                                                                                          "message": "137"}]}}
    assert exit_code_of_status(json.dumps(nonzero)) == 137
    with pytest.raises(SandboxError, match="without a status"):
        exit_code_of_status(b"")
    with pytest.raises(SandboxError, match="unreadable"):
        exit_code_of_status(b"{")


def test_pod_names_are_dns_labels_that_keep_the_random_suffix():
    long = pod_name("A_very_long.session-name" * 4 + "-0123abcd")
    assert len(long) <= 63 and long.endswith("-0123abcd") and long == long.lower()
    assert pod_name("train.t1-g0-r2-89abcdef") == "arborl-train-t1-g0-r2-89abcdef"


def test_a_k8s_sandbox_needs_an_image():
    with pytest.raises(ValueError, match="rollout.k8s.image"):
        RolloutSettings(sandbox="k8s")
    settings = RolloutSettings(sandbox="k8s", k8s={"image": "img:1", "runtime_class": "gvisor"})
    assert settings.k8s.runtime_class == "gvisor"


# -- the pod's half, for real: the launcher and the preamble run by this machine's sh, as the
# -- pod's would run them (an exec is ``sh -c LAUNCHER`` with the preamble first on its stdin)


def run_as_the_pod_would(spec: PodSpec, argv, stdin: bytes, *, timeout_s=None, close_stdin=True):
    import subprocess

    proc = subprocess.Popen(spec.exec_command(argv, timeout_s=timeout_s), stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdin is not None
    proc.stdin.write(stdin)
    proc.stdin.flush()
    if close_stdin:
        proc.stdin.close()
    out, err = proc.stdout.read(), proc.stderr.read()  # to their end: the command exited (stdin open or not)
    proc.wait(timeout=20)
    return proc.returncode, out.decode(), err.decode()


def test_the_launcher_sets_exactly_the_environment_and_reads_exactly_the_stdin(tmp_path):
    from arborl.rollout.sandboxes.base import SYSTEM_PATH

    (tmp_path / "sub").mkdir()
    spec = PodSpec(pod="arborl-x", sandbox_id="x", namespace="ns", options=OPTIONS, limits=LIMITS,
                   workspace_at=str(tmp_path))
    env = {"PATH": SYSTEM_PATH, "A": "it's $HOME; `touch pwned`", "B": "two\nlines"}
    data = b"fed to the command\n"
    stdin = spec.preamble(env, cwd="sub", stdin_bytes=len(data)) + data + b"not the command's"
    code, out, _ = run_as_the_pod_would(
        spec, ["bash", "-c", 'printf "%s|" "$A" "$B" "$PWD"; echo; cat; compgen -e | tr "\\n" " "'],
        stdin, timeout_s=10)
    assert code == 0
    assert out.startswith(f"it's $HOME; `touch pwned`|two\nlines|{tmp_path}/sub|\nfed to the command\n")
    assert out.rsplit("\n", 1)[-1].split() == ["A", "B", "PATH", "PWD", "SHLVL"]  # nothing of ours leaks in
    assert not (tmp_path / "sub" / "pwned").exists()


def test_a_command_without_stdin_ends_though_the_exec_keeps_its_stdin_open(tmp_path):
    spec = PodSpec(pod="arborl-x", sandbox_id="x", namespace="ns", options=OPTIONS, limits=LIMITS,
                   workspace_at=str(tmp_path))
    code, out, _ = run_as_the_pod_would(spec, ["bash", "-c", "cat; echo read-nothing"],
                                        spec.preamble({"PATH": "/usr/bin:/bin"}), close_stdin=False)
    assert (code, out) == (0, "read-nothing\n")


def test_a_command_past_its_timeout_is_stopped_inside(tmp_path):
    spec = PodSpec(pod="arborl-x", sandbox_id="x", namespace="ns", options=OPTIONS,
                   limits=Limits(wall_s=60, command_s=10, kill_grace_s=0.2), workspace_at=str(tmp_path))
    code, _, _ = run_as_the_pod_would(spec, ["sleep", "30"], spec.preamble({"PATH": "/usr/bin:/bin"}), timeout_s=0.3)
    assert code == 124


def test_an_archive_sent_through_the_preamble_unpacks_as_copy_in_sends_it(tmp_path):
    import io
    import tarfile

    from arborl.rollout.sandboxes.archive import UNPACK_SCRIPT

    workspace = tmp_path / "workspace"
    workspace.mkdir()
    spec = PodSpec(pod="arborl-x", sandbox_id="x", namespace="ns", options=OPTIONS, limits=LIMITS,
                   workspace_at=str(workspace))
    source = tmp_path / "source"
    (source / "pkg").mkdir(parents=True)
    (source / "pkg" / "mod.py").write_text("x = 1\n")
    archive = io.BytesIO()
    with tarfile.open(fileobj=archive, mode="w") as tar:
        tar.add(source, arcname=".")
    data = archive.getvalue()
    code, _, err = run_as_the_pod_would(
        spec, ["bash", "-c", UNPACK_SCRIPT, "copy_in", f"{workspace}/into"],
        spec.preamble({"PATH": "/usr/bin:/bin"}, stdin_bytes=len(data)) + data, timeout_s=10, close_stdin=False)
    assert code == 0, err
    assert (workspace / "into" / "pkg" / "mod.py").read_text() == "x = 1\n"


@pytest.mark.parametrize("replay", ["wall_limit"], indirect=True)
def test_the_wall_limit_kills_what_runs_and_ends_the_sandbox(replay, tmp_path):
    sandbox = make_sandbox("k8s", tmp_path / "scratch", name="contract",
                           limits=Limits(wall_s=1, command_s=600, kill_grace_s=1), pod=OPTIONS,
                           configuration=client.Configuration(host=replay.url))
    result = sandbox.run("sleep 30")  # its exec ends with 137 once the watchdog's kill_all ran
    assert result.exit_code is None and result.timed_out and sandbox.expired
    with pytest.raises(SandboxExpired):
        sandbox.run("true")
    sandbox.close()
    assert_as_recorded(replay)
