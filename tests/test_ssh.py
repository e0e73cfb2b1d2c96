"""Across machines over a real ssh gateway: an xdist worker reached through ``ssh`` (our own
``sshd`` on 127.0.0.1, started by the test) and a local ``popen`` worker run the benchmarks,
the tests rsynced to each worker's own directory. Proven here: the ssh worker's probe runs
under that ssh connection; every worker event reaches the controller's log once, tagged with
its ``host`` and ``worker``; the results JSON lists each preset once; and when the ssh worker
is killed mid-probe, the controller logs ``worker_crashed`` naming that preset. No process of
the run is left behind, on either side of the connection.

Skipped (with the reason) where ``/usr/sbin/sshd`` is missing or cannot start here."""

from __future__ import annotations

import getpass
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import pytest

from tests.helpers import events, orphans_of, read_log
from tests.test_hosts import hosts_layout

pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestWarning")

SSHD = "/usr/sbin/sshd"
RUN_TIMEOUT = 120  # seconds; each run takes a few


@dataclass
class Sshd:
    """Our own sshd on 127.0.0.1, and the client config that reaches it."""

    process: subprocess.Popen[bytes]
    port: int
    user: str
    client_config: Path
    log: Path

    def spec(self, chdir: Path) -> str:
        """The ``--tx`` of a worker over this sshd, running the same Python in ``chdir``."""
        return (
            f"ssh={self.user}@127.0.0.1//python={sys.executable}"
            f"//ssh_config={self.client_config}//chdir={chdir}"
        )

    def logins(self) -> int:
        """How many ssh connections sshd has let in so far."""
        return self.log.read_text().count(f"Accepted publickey for {self.user} from 127.0.0.1")

    def session_processes(self) -> list[psutil.Process]:
        """What sshd forked for connections (and what runs under them)."""
        try:
            return psutil.Process(self.process.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []

    def started_processes(self) -> list[psutil.Process]:
        """Every live process started over a connection to this sshd: its sessions, and
        whatever inherited their ``SSH_CONNECTION`` (a worker, its supervisor and probe),
        even once orphaned (sshd does not end a session's command when the client goes)."""
        found = {p.pid: p for p in self.session_processes()}
        for process in psutil.process_iter():
            try:
                if over_our_sshd(process.environ().get("SSH_CONNECTION"), self):
                    found.setdefault(process.pid, process)
            except psutil.Error:
                pass
        return [p for p in found.values() if _alive(p)]

    def stop(self) -> None:
        """The listener, then everything started over it (found while the listener lives)."""
        started = self.started_processes()
        self.process.kill()
        self.process.wait(timeout=10)
        for process in started:
            _kill_tree(process.pid)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _keygen(path: Path) -> None:
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "yourai-test", "-f", str(path)],
        check=True, capture_output=True, timeout=30,
    )  # fmt: skip


def _alive(process: psutil.Process) -> bool:
    try:
        return process.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _kill_tree(pid: int) -> None:
    """A process and everything under it (the sshd fixture's teardown ends the far side)."""
    try:
        root = psutil.Process(pid)
        tree = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    for process in tree:
        try:
            process.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(tree, timeout=10)


@pytest.fixture
def sshd(tmp_path: Path) -> Iterator[Sshd]:
    """Starts sshd on a free port with a throwaway config, host key and authorized key;
    yields once ``ssh true`` works through it; kills it (and its sessions) at teardown."""
    for tool in (SSHD, shutil.which("ssh"), shutil.which("ssh-keygen")):
        if not tool or not os.access(tool, os.X_OK):
            pytest.skip(f"needs openssh-server and openssh-client ({tool or 'ssh'} missing)")
    if sys.platform == "linux" and os.geteuid() == 0 and not Path("/run/sshd").is_dir():
        # Debian's sshd run as root needs its privilege separation directory, which the
        # service's start script creates (an empty runtime directory; nothing is installed).
        try:
            Path("/run/sshd").mkdir(mode=0o755, parents=True, exist_ok=True)
        except OSError as exc:
            pytest.skip(f"sshd cannot start here: no /run/sshd ({exc})")
    keys = tmp_path / "ssh"
    keys.mkdir()
    _keygen(keys / "host_key")
    _keygen(keys / "user_key")
    (keys / "authorized_keys").write_text((keys / "user_key.pub").read_text())
    port = _free_port()
    user = getpass.getuser()
    server_config = keys / "sshd_config"
    server_config.write_text(
        f"Port {port}\n"
        "ListenAddress 127.0.0.1\n"
        f"HostKey {keys / 'host_key'}\n"
        f"AuthorizedKeysFile {keys / 'authorized_keys'}\n"
        f"PidFile {keys / 'sshd.pid'}\n"
        "StrictModes no\n"
        "PermitRootLogin prohibit-password\n"
        "PasswordAuthentication no\n"
        "KbdInteractiveAuthentication no\n"
        "UsePAM no\n"
    )
    client_config = keys / "ssh_config"
    client_config.write_text(
        "Host *\n"
        f"  Port {port}\n"
        f"  IdentityFile {keys / 'user_key'}\n"
        "  IdentitiesOnly yes\n"
        "  StrictHostKeyChecking no\n"
        "  UserKnownHostsFile /dev/null\n"
        "  BatchMode yes\n"
        "  ConnectTimeout 10\n"
        "  LogLevel ERROR\n"
    )
    log = keys / "sshd.log"
    with log.open("wb") as sink:
        process = subprocess.Popen(
            [SSHD, "-D", "-e", "-f", str(server_config)], stdout=sink, stderr=subprocess.STDOUT
        )
    server = Sshd(process, port, user, client_config, log)
    try:
        deadline = time.monotonic() + 15
        while True:
            if process.poll() is not None:
                said = log.read_text().strip() or "nothing"
                pytest.skip(f"sshd cannot start here: it exited {process.returncode}: {said}")
            probe = subprocess.run(
                ["ssh", "-F", str(client_config), f"{user}@127.0.0.1", "true"],
                capture_output=True, text=True, timeout=15, check=False,
            )  # fmt: skip
            if probe.returncode == 0:
                break
            if time.monotonic() > deadline:
                pytest.skip(
                    f"sshd started but ssh to it fails: {probe.stderr.strip()} "
                    f"(sshd: {log.read_text().strip()})"
                )
            time.sleep(0.2)
        yield server
    finally:
        server.stop()


def where_probe(record: Path, hang_on_port: int | None) -> str:
    """A fake probe that notes where it ran (its ``SSH_CONNECTION``, its preset) in
    ``record``; given ``hang_on_port``, it hangs in training when run over an ssh connection
    to that port."""
    hang = (
        f"""
if os.environ.get("SSH_CONNECTION", "").split()[2:] == ["127.0.0.1", "{hang_on_port}"]:
    print("building block 1/2", flush=True)
    print("step 1/4 loss=2.0", flush=True)
    time.sleep(300)
"""
        if hang_on_port
        else ""
    )
    return (
        f"""
with open({str(record)!r}, "a") as f:
    f.write(json.dumps({{"preset": spec["preset"],
                        "ssh": os.environ.get("SSH_CONNECTION")}}) + "\\n")
"""
        + hang
        + """
print("building block 1/1", flush=True)
print("step 1/1 loss=1.0", flush=True)
result(status="ok", phase="done", peak_memory_gb=0.5, train_peak_memory_gb=0.5,
       backend=spec["backend"], preset=spec["preset"])
"""
    )


def ssh_layout(root: Path, server: Sshd, hang_over_ssh: bool) -> tuple[Path, list[str]]:
    """``tests.test_hosts``' layout, its first worker (gw0, in ``A``) reached over ssh;
    the second (gw1) stays a local ``popen`` worker in ``B``."""
    probe = where_probe(root / "where.jsonl", server.port if hang_over_ssh else None)
    controller, args = hosts_layout(root, probe)
    args[args.index("popen//chdir=../A")] = server.spec(root / "A")
    return controller, args


def probes_ran(root: Path) -> dict[str, str | None]:
    """Each preset's probe: the ``SSH_CONNECTION`` it ran under."""
    lines = (root / "where.jsonl").read_text().splitlines()
    return {r["preset"]: r["ssh"] for r in map(json.loads, lines)}


def over_our_sshd(connection: str | None, server: Sshd) -> bool:
    """``SSH_CONNECTION`` is ``client-ip client-port server-ip server-port``."""
    return (connection or "").split()[2:] == ["127.0.0.1", str(server.port)]


def assert_nothing_left(root: Path, server: Sshd) -> None:
    """Nothing started over ssh outlives the run; no process mentions the test's directory
    but sshd itself."""
    deadline = time.monotonic() + 15
    while server.started_processes() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert server.started_processes() == []
    assert [pid for pid in orphans_of(str(root)) if pid != server.process.pid] == []


def test_an_ssh_worker_and_a_local_one_tell_the_controller_everything(
    tmp_path: Path, sshd: Sshd
) -> None:
    controller, args = ssh_layout(tmp_path, sshd, hang_over_ssh=False)
    logins = sshd.logins()
    run = subprocess.run(
        args, cwd=controller, capture_output=True, text=True, timeout=RUN_TIMEOUT, check=False
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert sshd.logins() == logins + 1  # gw0's gateway: one ssh connection, rsync included
    records = read_log(controller / "benchmark_log.jsonl")
    from_workers = [r for r in records if r.get("worker") != "main"]
    assert {r["worker"] for r in from_workers} == {"gw0", "gw1"}
    # 127.0.0.1 is this machine: both workers' host tag is its name.
    assert {r["host"] for r in records} == {socket.gethostname()}
    for name in ("model_start", "preflight_check", "subprocess_spawned", "subprocess_completed"):
        assert sorted(r["preset"] for r in events(records, name)) == ["tiny-llama", "tiny-qwen2"]
    # gw0's probe ran under our sshd's connection; gw1's did not.
    ran_by = {r["preset"]: r["worker"] for r in events(records, "subprocess_spawned")}
    assert sorted(ran_by.values()) == ["gw0", "gw1"]
    ran = probes_ran(tmp_path)
    assert sorted(ran) == ["tiny-llama", "tiny-qwen2"]
    for preset, worker in ran_by.items():
        assert over_our_sshd(ran[preset], sshd) == (worker == "gw0"), (preset, ran)
    # Each worker's own log is in its directory (A over ssh, B local) and holds its events
    # only; the controller's holds each of them once, sent over the relay channel.
    for name, worker in (("A", "gw0"), ("B", "gw1")):
        local = read_log(tmp_path / name / "benchmark_log.jsonl")
        assert local and {r["worker"] for r in local} == {worker}
        assert local == [r for r in from_workers if r["worker"] == worker]
    assert (tmp_path / "A" / "benchmarks" / "test_lora_memory.py").is_file()  # rsynced
    document = json.loads((controller / "results.json").read_text())
    assert sorted(r["preset"] for r in document["results"]) == ["tiny-llama", "tiny-qwen2"]
    assert_nothing_left(tmp_path, sshd)


def _wait_for(
    log: Path, predicate: Callable[[dict[str, Any]], bool], seconds: float
) -> list[dict[str, Any]]:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if log.exists():
            lines = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
            if any(predicate(r) for r in lines):
                return lines
        time.sleep(0.1)
    raise AssertionError(f"nothing matched in {log} within {seconds} s")


def test_the_ssh_worker_killed_mid_probe_is_logged_on_the_controller(
    tmp_path: Path, sshd: Sshd
) -> None:
    controller, args = ssh_layout(tmp_path, sshd, hang_over_ssh=True)
    log = controller / "benchmark_log.jsonl"
    pytest_run = subprocess.Popen(
        args, cwd=controller, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        # The ssh worker's probe progress reaches the controller while the probe hangs.
        records = _wait_for(
            log, lambda r: r["event"] == "probe_progress" and r.get("worker") == "gw0", 45
        )
        spawned = next(r for r in events(records, "subprocess_spawned") if r["worker"] == "gw0")
        preset = spawned["preset"]
        worker = psutil.Process(psutil.Process(int(spawned["pid"])).ppid())
        # It is the worker python that our sshd started for the connection.
        assert worker in sshd.session_processes()
        os.killpg(int(spawned["pid"]), signal.SIGKILL)
        worker.kill()
        out, _ = pytest_run.communicate(timeout=RUN_TIMEOUT)
    finally:
        if pytest_run.poll() is None:  # (the test failed before the run ended)
            _kill_tree(pytest_run.pid)
            pytest_run.communicate(timeout=30)
    assert pytest_run.returncode == 1, out
    assert over_our_sshd(probes_ran(tmp_path)[preset], sshd)
    records = read_log(log)
    (crash,) = events(records, "worker_crashed")
    assert crash["worker"] == "gw0" and crash["preset"] == preset
    assert crash["host"] == spawned["host"] and crash["last_event"]["event"] == "probe_progress"
    assert records[-1]["event"] == "benchmark_complete"
    other = ({"tiny-llama", "tiny-qwen2"} - {preset}).pop()
    verdicts = {r["preset"]: r["verdict"] for r in events(records, "test_verdict")}
    assert verdicts == {preset: "Crashed", other: "Pass"}
    assert f"worker gw0 on {spawned['host']} crashed while running {preset}" in out
    assert_nothing_left(tmp_path, sshd)
