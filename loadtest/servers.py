"""Servers as subprocesses: start one on loopback port 0 (it writes the port it bound), wait for health SERVING, stop it
with SIGTERM and read its exit code. Used by the demo, the benchmarks and the drain tests."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any, Iterable, NoReturn

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from palr.serving.channels import open_channel

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[1]


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on right now (the OS picks it; tiny race until the server binds)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def scrape_metrics(port: int, host: str = "127.0.0.1") -> dict[str, float]:
    """A server's Prometheus samples, keyed as exposed: 'name' or 'name{label="value",...}'."""
    text = urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=5).read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
            samples[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return samples


def _temp_file(module: str, suffix: str) -> Path:
    """A new empty file of this harness's own (no other process is handed its name)."""
    fd, path = tempfile.mkstemp(prefix=f"{module}-", suffix=suffix)
    os.close(fd)
    return Path(path)


def _env_with_repo() -> dict[str, str]:
    """This checkout first on the subprocess's path, whatever the current directory."""
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path, "PYTHONUNBUFFERED": "1"}


class ServerProcess:
    """`python -m <module> <args> --host HOST --port PORT` in a subprocess, logs to a file.

    with ServerProcess("retrieval_server", ["--bundle", "bundle"]) as server:
        ...  # server.target is "127.0.0.1:PORT", health already SERVING
    """

    def __init__(self, module: str, args: list[str], *, host: str = "127.0.0.1", port: int | None = None,
                 log_path: Path | None = None, channel_kwargs: dict[str, Any] | None = None,
                 own_session: bool = False):
        self.module = module
        self.own_session = own_session  # True: a Ctrl-C in the terminal reaches only the parent, which stops it
        self.host = host
        self.port = port  # None until the server has bound one (it listens on port 0 and writes what it got)
        self.log_path = Path(log_path) if log_path else _temp_file(module, ".log")
        # a file of its own: one named after the log was shared by harnesses logging to one folder (make loadtest
        # beside the demo, both in reports/), and one's server could overwrite the other's port before it was read
        self.ports_file = _temp_file(module, ".ports.json")
        # --parent-pid: the server drains and exits if this process dies, even by SIGKILL (no orphans)
        self.argv = [sys.executable, "-m", module, *args, "--host", host, "--port", str(port or 0),
                     "--ports-file", str(self.ports_file), "--parent-pid", str(os.getpid())]
        self.channel_kwargs = channel_kwargs or {}
        self.process: subprocess.Popen | None = None

    @property
    def target(self) -> str:
        if self.port is None:
            raise RuntimeError(f"{self.module} has no port yet: it is known once the server listens (start())")
        return f"{self.host}:{self.port}"

    def start(self, timeout: float = 120.0) -> "ServerProcess":
        self.launch()
        self.wait_serving(timeout)
        return self

    def launch(self) -> subprocess.Popen:
        """The server process, its output appended to the log after a line naming this start. Appended: harnesses
        logging to one folder (make loadtest beside the demo, both in reports/) truncated each other's server
        logs, and their writes then overlapped at their own offsets; a run's lines now follow its start line."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log_file:
            log_file.write(f"==== {time.strftime('%Y-%m-%dT%H:%M:%S')} started by pid {os.getpid()}: "
                           f"{' '.join(self.argv[1:])}\n".encode())
            log_file.flush()
            self.process = subprocess.Popen(self.argv, stdout=log_file, stderr=subprocess.STDOUT,
                                            env=_env_with_repo(), start_new_session=self.own_session)
        return self.process

    def wait_listening(self, timeout: float, started: float | None = None) -> None:
        """Until the started process has written the port it bound (`--ports-file`): then `target` is known.
        `started`: when the wait began (perf_counter), if earlier than now."""
        started = time.perf_counter() if started is None else started
        while (ports := self._own_ports()) is None:
            self._check_running()
            if time.perf_counter() - started > timeout:
                self._give_up(timeout)
            time.sleep(0.05)
        self.port = ports["port"]
        self.ports_file.unlink(missing_ok=True)  # read: nothing left behind in the temp folder

    def _own_ports(self) -> dict | None:
        """The ports file's content once our process wrote it (empty until then; a server this object started
        before, stopped before it was read, wrote another pid)."""
        try:
            ports = json.loads(self.ports_file.read_text())
        except (FileNotFoundError, ValueError):
            return None
        return ports if ports.get("pid") == self.process.pid else None

    def _check_running(self) -> None:
        if self.process.poll() is not None:
            raise RuntimeError(f"{self.module} exited with {self.process.returncode} before serving:\n"
                               f"{self.log_tail()}")

    def _give_up(self, timeout: float) -> NoReturn:
        self.kill()
        where = f" on {self.target}" if self.port is not None else ""
        raise TimeoutError(f"{self.module} not SERVING{where} after {timeout:.0f} s:\n{self.log_tail()}")

    def wait_serving(self, timeout: float) -> float:
        """Waits for the server to listen, then polls grpc.health.v1 Check("") until SERVING; returns the seconds
        waited. Raises with the server's log tail when it exits or the timeout passes first."""
        started = time.perf_counter()
        self.wait_listening(timeout, started)
        with open_channel(self.target, aio=False, **self.channel_kwargs) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            while time.perf_counter() - started < timeout:
                self._check_running()
                try:
                    status = health.Check(health_pb2.HealthCheckRequest(), timeout=1.0).status
                    if status == health_pb2.HealthCheckResponse.SERVING:
                        return time.perf_counter() - started
                except grpc.RpcError:
                    pass  # not listening yet
                time.sleep(0.1)
        self._give_up(timeout)

    def stop(self, timeout: float = 60.0) -> int:
        """SIGTERM (graceful drain), wait, return the exit code; kills it if it does not exit."""
        if self.process is None:
            return 0
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
                raise RuntimeError(f"{self.module} did not exit within {timeout:.0f} s of SIGTERM; killed")
        return self.process.returncode

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def log_tail(self, lines: int = 30) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def __enter__(self) -> "ServerProcess":
        return self.start()

    def __exit__(self, *exc) -> None:
        try:
            self.stop()
        finally:
            self.kill()


def stop_all(servers: Iterable[ServerProcess]) -> None:
    """Each server drained and stopped, whatever the others did: none is left running. An interrupt while they
    drain kills the ones not yet stopped, then goes on up."""
    servers = list(servers)
    for i, server in enumerate(servers):
        try:
            code = server.stop()
        except RuntimeError as e:  # it did not drain in time and was killed
            log.warning("%s", e)
            continue
        except BaseException:
            for rest in servers[i:]:
                rest.kill()
            raise
        if server.process is not None:
            (log.info if code == 0 else log.warning)("%s stopped, exit code %d", server.module, code)
