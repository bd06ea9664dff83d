"""`python -m loadtest.with_servers`: both real servers around a command, and never left running."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from loadtest.servers import REPO

# a command that, like Locust, writes its reports when interrupted with SIGINT (and takes a moment to)
REPORTING_COMMAND = """
import pathlib, signal, sys, time
def interrupted(*_):
    time.sleep(1)
    pathlib.Path(sys.argv[1]).write_text("reports written")
    sys.exit(130)
signal.signal(signal.SIGINT, interrupted)
print("ready", flush=True)
time.sleep(120)
"""
# a command that never finishes: it ignores SIGINT
STUCK_COMMAND = """
import os, signal, time
signal.signal(signal.SIGINT, signal.SIG_IGN)
print("ready", os.getpid(), flush=True)
time.sleep(120)
"""


def start(tiny_llm_bundle, tmp_path, *command: str, sigint_ignored: bool = False) -> tuple[subprocess.Popen, list[str]]:
    """with_servers running `command`, in its own session (as a terminal's job is); its output up to the
    command's "ready" line. `sigint_ignored`: started with SIGINT ignored, as a script's background job is (Python
    then installs no KeyboardInterrupt handler of its own)."""
    argv = [sys.executable, "-m", "loadtest.with_servers", "--bundle", str(tiny_llm_bundle), "--log-dir", str(tmp_path),
            "--", sys.executable, "-c", *command]
    ignore = (lambda: signal.signal(signal.SIGINT, signal.SIG_IGN)) if sigint_ignored else None
    process = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               start_new_session=True, preexec_fn=ignore)
    lines = []
    deadline = time.monotonic() + 300
    for line in process.stdout:
        lines.append(line)
        if line.startswith("ready") or time.monotonic() > deadline:
            break
    return process, lines


@pytest.mark.parametrize("interrupt", ["sigterm", "ctrl-c", "ctrl-c-started-ignoring-it"])
def test_an_interrupt_lets_the_command_write_its_reports_then_stops_both_servers(tiny_llm_bundle, tmp_path, interrupt):
    """A CI timeout sends SIGTERM to with_servers alone; Ctrl-C sends SIGINT to the whole process group.
    Either way the command gets one SIGINT and finishes what it does then (it was terminated mid-report
    before) while the servers still serve; then both drain and stop. Also when with_servers was started with
    SIGINT ignored (a background job of a script: it waited out the command before)."""
    report = tmp_path / "report.txt"
    process, lines = start(tiny_llm_bundle, tmp_path, REPORTING_COMMAND, str(report),
                           sigint_ignored=interrupt.endswith("ignoring-it"))
    if interrupt == "sigterm":
        process.send_signal(signal.SIGTERM)
    else:
        os.killpg(process.pid, signal.SIGINT)
    output = "".join(lines) + process.communicate(timeout=120)[0]
    expected = signal.SIGTERM if interrupt == "sigterm" else signal.SIGINT
    assert process.returncode == 128 + expected, output[-3000:]
    assert report.read_text() == "reports written"
    assert "the interrupted command exited with 130" in output
    assert "ranking_server stopped, exit code 0" in output and "retrieval_server stopped, exit code 0" in output, \
        output[-3000:] + "".join(f"\n--- {log.name}:\n" + log.read_text()[-2000:] for log in tmp_path.glob("*.log"))


def test_a_second_interrupt_stops_a_command_that_does_not_finish(tiny_llm_bundle, tmp_path):
    process, lines = start(tiny_llm_bundle, tmp_path, STUCK_COMMAND)
    child = int(lines[-1].split()[1])
    process.send_signal(signal.SIGTERM)
    time.sleep(1)  # the command ignores the SIGINT it was passed
    process.send_signal(signal.SIGTERM)
    output = "".join(lines) + process.communicate(timeout=60)[0]
    assert process.returncode == 128 + signal.SIGTERM, output[-3000:]
    assert "the command was stopped" in output
    with pytest.raises(ProcessLookupError):
        os.kill(child, 0)  # gone, not left running against stopped servers
    assert "ranking_server stopped, exit code 0" in output and "retrieval_server stopped, exit code 0" in output


def _processes_watching(pid: int) -> list[int]:
    """The servers started by process `pid` (their `--parent-pid PID`) that are still running."""
    marker = f"--parent-pid\0{pid}\0".encode()
    found = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and marker in (proc / "cmdline").read_bytes():
                found.append(int(proc.name))
        except OSError:
            pass  # it exited meanwhile
    return found


def test_ctrl_c_while_the_servers_start_stops_them_even_when_started_ignoring_it(tiny_llm_bundle, tmp_path):
    """with_servers started with SIGINT ignored (a script's background job: Python installs no KeyboardInterrupt)
    lost a `kill -INT` that came while its servers were starting, and ran the command anyway. It now exits 130 at
    once, and the server that was still starting is stopped with the others."""
    argv = [sys.executable, "-m", "loadtest.with_servers", "--bundle", str(tiny_llm_bundle), "--log-dir", str(tmp_path),
            "--", sys.executable, "-c", "print('ran', flush=True)"]
    process = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               start_new_session=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    deadline = time.monotonic() + 60
    while not (tmp_path / "retrieval_server.log").exists() and process.poll() is None:
        assert time.monotonic() < deadline, "the retrieval server was never started"
        time.sleep(0.01)  # the handlers are installed before the first server starts, so no race with start-up
    os.killpg(process.pid, signal.SIGINT)
    try:
        output = process.communicate(timeout=60)[0]
    except subprocess.TimeoutExpired:
        process.kill()
        pytest.fail("with_servers did not stop on SIGINT:\n" + process.communicate()[0][-3000:])
    assert process.returncode == 128 + signal.SIGINT, output[-3000:]
    assert "interrupted (SIGINT)" in output and "ran" not in output.split(), output[-3000:]
    assert _processes_watching(process.pid) == []


def test_an_interrupt_that_came_while_the_command_was_starting_still_reaches_it(tmp_path):
    """A signal recorded before the wait began (it arrived while the command was being started: raised there, it
    escaped before the command was passed its SIGINT) is handled like any other: one SIGINT, the reports."""
    from loadtest.with_servers import _wait

    report = tmp_path / "report.txt"
    child = subprocess.Popen([sys.executable, "-c", REPORTING_COMMAND, str(report)], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().startswith("ready")
        assert _wait(child, [signal.SIGTERM]) == 128 + signal.SIGTERM
    finally:
        if child.poll() is None:
            child.kill()
        child.wait()
    assert child.returncode == 130 and report.read_text() == "reports written"


def test_a_command_that_does_not_exist_is_refused_before_any_server_starts(tmp_path):
    from loadtest.with_servers import main

    with pytest.raises(SystemExit) as exit_:
        main(["--bundle", str(tmp_path / "no-bundle"), "--log-dir", str(tmp_path), "--", "no-such-command-xyz"])
    assert exit_.value.code == 2 and not list(tmp_path.iterdir())  # no server was started: no log written


def test_flags_a_shell_could_not_split_are_refused_naming_the_option(tmp_path, capsys):
    from loadtest.with_servers import main

    with pytest.raises(SystemExit) as exit_:
        main(["--bundle", str(tmp_path), "--log-dir", str(tmp_path), "--ranking-args", "--x 'y", "--", "true"])
    assert exit_.value.code == 2 and "--ranking-args: No closing quotation" in capsys.readouterr().err


def test_a_harness_takes_only_its_own_servers_ports_file(tmp_path):
    """A harness waits for the ports file its own server process wrote (its pid), never a port another process
    left there; and each harness has a ports file of its own, whatever folder its logs go to."""
    import json

    from loadtest.servers import ServerProcess

    server = ServerProcess("retrieval_server", [], log_path=tmp_path / "retrieval_server.log")
    beside = ServerProcess("retrieval_server", [], log_path=server.log_path)  # a second harness, same log folder
    assert server.ports_file != beside.ports_file
    beside.ports_file.unlink()
    server.log_path.write_text("binding...\n")
    server.process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])  # a server still binding
    try:
        server.ports_file.write_text(json.dumps({"port": 1111, "pid": server.process.pid + 1}))  # another's server
        with pytest.raises(TimeoutError, match="not SERVING after"):  # (and it is stopped)
            server.wait_listening(0.5)
        server.process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
        server.ports_file.write_text(json.dumps({"port": 2222, "pid": server.process.pid}))
        server.wait_listening(5)
        assert server.target == "127.0.0.1:2222"
    finally:
        server.kill()


def test_harnesses_logging_to_one_folder_keep_each_servers_log_lines(tmp_path):
    """make loadtest beside the demo (both log to reports/): the second start truncated the first server's log, and
    the two processes then wrote over each other at their own offsets."""
    from loadtest.servers import ServerProcess

    log = tmp_path / "ranking_server.log"
    log.write_text("an earlier run's last line\n")
    first, second = (ServerProcess("ranking_server", [], log_path=log) for _ in range(2))
    for name, server in (("first", first), ("second", second)):
        server.argv = [sys.executable, "-c", f"import time; print('{name} 1', flush=True); time.sleep(0.5); "
                                              f"print('{name} 2', flush=True)"]
    processes = [first.launch()]
    time.sleep(0.2)
    processes.append(second.launch())
    assert [p.wait(timeout=30) for p in processes] == [0, 0]
    lines = log.read_text().splitlines()
    assert lines[0] == "an earlier run's last line"
    assert {"first 1", "first 2", "second 1", "second 2"} <= set(lines), lines
    assert sum(line.startswith("==== ") and "started by pid" in line for line in lines) == 2, lines


def test_a_server_that_did_not_drain_and_exit_0_fails_a_command_that_passed(tmp_path):
    """make loadtest exited with Locust's 0 when a server was killed for not draining in time, or exited non-zero
    at SIGTERM (requests lost at shutdown): logged as a warning only."""
    from loadtest.servers import ServerProcess
    from loadtest.with_servers import EXIT_SERVER_STOP, server_stop_code

    servers = [ServerProcess(module, [], log_path=tmp_path / f"{module}.log")
               for module in ("retrieval_server", "ranking_server")]
    for server in servers:
        server.ports_file.unlink()

    def exited(code: int) -> subprocess.Popen:
        process = subprocess.Popen([sys.executable, "-c", f"raise SystemExit({code})"])
        process.wait(timeout=30)
        return process

    servers[0].process, servers[1].process = exited(0), exited(1)
    assert server_stop_code(servers) == EXIT_SERVER_STOP
    servers[1].process = exited(0)
    assert server_stop_code(servers) == 0


@pytest.mark.parametrize("options, named", [({"k": 0}, "--k must be >= 1"),
                                            ({"deadline": float("nan")}, "--deadline must be a finite number"),
                                            ({"startup_timeout": 0.0}, "--startup-timeout must be a finite number")])
def test_demo_options_that_cannot_work_are_refused_before_the_servers_start(options, named):
    from loadtest.demo import DemoConfig

    with pytest.raises(ValueError, match=named):
        DemoConfig(**options)
