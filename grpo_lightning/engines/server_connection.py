"""The HTTP side of the vLLM server engine: bounded JSON requests, and the life of a managed server process.

:class:`ServerConnection` knows nothing of models or rollouts. It sends one request at a time with a timeout and
a few retries, notices a managed server that exited, starts one in its own process group (so that stopping it
stops the engine-core processes it spawns too), waits for ``/health`` within a bound, and stops it. Every
failure is a :class:`VLLMServerError` naming the URL.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from typing import Any


class VLLMServerError(ConnectionError):
    """The vLLM server cannot serve the run: the message names its URL and what was expected."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:  # in the child, before exec: the kernel sends SIGTERM when the trainer dies
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class ServerConnection:
    """A server at ``url``: a process this object started (``process``) or one started by someone else.

    Args:
        url: The server's base URL; ``None`` until a managed server is launched.
        api_key: Sent as a bearer token on every request.
        startup_timeout: Seconds a server may take to answer ``/health``.
        request_timeout: Seconds one request may take.
        retries: Further tries of a request that failed to connect or timed out.
    """

    def __init__(self, url: str | None, api_key: str | None, startup_timeout: float, request_timeout: float, retries: int):
        self.url = url.rstrip("/") if url else None
        self.api_key = api_key
        self.startup_timeout, self.request_timeout, self.retries = startup_timeout, request_timeout, retries
        self.process: subprocess.Popen | None = None
        self.log_file = "(not managed)"

    def _request(self, path: str, body: dict | None = None, timeout: float | None = None, retries: int | None = None) -> Any:
        """One JSON request, retried on connection failures and timeouts; a clear error when they run out."""
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        data = None if body is None else json.dumps(body).encode()
        last: Exception | None = None
        for attempt in range(1 + (self.retries if retries is None else retries)):
            self._check_alive()
            request = urllib.request.Request(self.url + path, data=data, headers=headers, method="GET" if data is None else "POST")
            try:
                with urllib.request.urlopen(request, timeout=timeout or self.request_timeout) as answer:
                    text = answer.read().decode()
                    return json.loads(text) if text else None
            except urllib.error.HTTPError as e:  # the server answered: retrying will not change its mind
                raise VLLMServerError(f"the vLLM server at {self.url} refused {path}: HTTP {e.code} {e.read().decode()[:300]}") from e
            except (urllib.error.URLError, TimeoutError, ConnectionError, OSError) as e:
                last = e
                time.sleep(min(2.0 ** attempt, 10.0))
        self._check_alive()
        raise VLLMServerError(f"the vLLM server at {self.url} did not answer {path}: {last}") from last

    def _check_alive(self) -> None:
        if self.process is not None and self.process.poll() is not None:
            raise VLLMServerError(
                f"the managed vLLM server at {self.url} exited with status {self.process.returncode}; its log: {self.log_file}"
            )

    def _launch(self, command: list[str], env: dict[str, str], log_file: str) -> None:
        """Start ``command`` (a server on ``self.url``) in its own process group, its output appended to ``log_file``."""
        self.log_file = log_file
        os.makedirs(os.path.dirname(os.path.abspath(log_file)), exist_ok=True)
        with open(log_file, "ab") as log:
            self.process = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, env=env, preexec_fn=_die_with_parent, start_new_session=True
            )

    def _wait_healthy(self) -> None:
        """Until ``/health`` answers; an error once the server exits or ``startup_timeout`` has passed."""
        deadline = time.monotonic() + self.startup_timeout
        while True:
            try:
                self._request("/health", timeout=5, retries=0)
                return
            except VLLMServerError as e:
                if self.process is not None and self.process.poll() is not None or time.monotonic() > deadline:
                    raise VLLMServerError(f"{e} (waited up to {self.startup_timeout:.0f} s for /health)") from None
                time.sleep(1.0)

    def _stop(self) -> None:
        """Stop a managed server: SIGTERM to its process group, then SIGKILL to whatever is left after 20 s."""
        process, self.process = self.process, None
        if process is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)  # the group: the server and the engine core it spawned
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=20)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=10)
