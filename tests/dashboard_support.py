"""Helpers for the dashboard tests: tiny real digits studies, a real server process, plain HTTP."""

from __future__ import annotations

import http.client
import json
import os
import re
import select
import signal
import socket
import subprocess
import sys
import tempfile
import time
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import urlencode, urljoin, urlsplit

import optuna
from conftest import write_digits_run

from nas.cli import search_main

SPACE = {
    "stages": 1,
    "width": 8,
    "block": {
        "norm": {"type": {"choice": ["batch", "group", "none"]}, "position": {"choice": ["pre_conv", "post_conv"]}}
    },
    "training": {"lr": {"float": [0.01, 0.1], "log": True}},
}


def make_study(folder: Path, name: str, trials: int, epochs: int = 1) -> str:
    """A real nas-search on digits (2 folds) into folder/nas.db; returns the storage URL."""
    url = f"sqlite:///{folder}/nas.db"
    run = Path(tempfile.mkdtemp(dir=folder, prefix="run-"))  # a study name may be no file name ('a/b', '..')
    config = write_digits_run(
        run,
        SPACE,
        url,
        {"name": name, "sampler": "random", "trials": trials, "heartbeat_seconds": 1},
        {"folds": 2, "epochs": epochs},
    )
    assert search_main(["--config", str(config), "--no-progress"]) == 0
    return url


def wait_for(condition, timeout: float = 120.0, interval: float = 0.3, what: str = "condition"):
    """Poll until `condition()` is truthy (returns it) or fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = condition()
        if result:
            return result
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


class Row(HTMLParser):
    """The links and form actions of each study row of the list page, by study name, as paths a browser
    resolves them to (`/studies/..` is `/`)."""

    def __init__(self, page: str, base: str):
        super().__init__()
        self.rows: dict[str, dict] = {}
        self.current, self.base = None, base + "/"
        self.feed(page)

    def resolve(self, href: str) -> str:
        url = urlsplit(urljoin(self.base, href))
        return url.path + (f"?{url.query}" if url.query else "")

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "tr" and "data-study" in attrs:
            self.current = self.rows.setdefault(attrs["data-study"], {"actions": {}})
        elif self.current is not None and tag == "a" and "page" not in self.current:
            self.current["page"] = self.resolve(attrs["href"])
        elif self.current is not None and tag == "form":
            self.current["actions"][attrs["action"].rsplit("/", 1)[1]] = self.resolve(attrs["action"])

    def handle_endtag(self, tag):
        if tag == "tr":
            self.current = None


class Dashboard:
    """A `python -m nas dashboard` process on a free port, and an HTTP client for it."""

    def __init__(self, storage: str, workdir: Path, *extra: str, env: dict | None = None, token: str | None = None):
        self.token = token  # sent as a Bearer header (how the dashboard got it is in `extra` or `env`)
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "nas",
                "dashboard",
                "--storage",
                storage,
                "--port",
                "0",
                "--workdir",
                str(workdir),
                *extra,
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=None if env is None else {**os.environ, **env},
        )
        try:
            self._start()
        except BaseException:
            self.process.kill()  # a dashboard that did not come up is not left behind
            self.process.wait(30)
            raise

    def _start(self) -> None:
        line = self._first_line(timeout=90)
        match = re.search(r"on (http://\S+)", line)
        assert match, line
        self.url = match.group(1)
        parts = urlsplit(self.url)
        self.host, self.port = parts.hostname, parts.port
        self.address = "::1" if self.host == "::1" else "127.0.0.1"  # loopback, in the family it listens on
        self.netloc = f"[::1]:{self.port}" if self.address == "::1" else f"127.0.0.1:{self.port}"
        self.base = f"http://{self.netloc}"
        self.csrf = re.search(r'name="csrf-token" content="([^"]+)"', self.get("/", **self.auth())[2]).group(1)

    def auth(self) -> dict:
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}

    def _first_line(self, timeout: float) -> str:
        ready, _, _ = select.select([self.process.stdout], [], [], timeout)
        assert ready, "nas-dashboard printed nothing"
        line = self.process.stdout.readline()
        assert line, self.process.stderr.read()
        return line

    def request(self, method: str, path: str, body: str | bytes | None = None, headers: dict | None = None):
        conn = http.client.HTTPConnection(self.address, self.port, timeout=60)
        try:
            conn.request(method, path, body=body, headers={"Host": self.netloc, **(headers or {})})
            reply = conn.getresponse()
            return reply.status, dict(reply.getheaders()), reply.read().decode(errors="replace")
        finally:
            conn.close()

    def upload(
        self, path: str, headers: dict, size: int, head: bytes = b"", tail: bytes = b""
    ) -> tuple[int | None, int]:
        """POST `head`, then filler, then `tail` (`size` bytes in all) while watching for an early answer, as curl
        does; returns the status (None: no answer) and the bytes sent before it came."""
        sock = socket.create_connection((self.address, self.port), timeout=60)
        lines = "".join(f"{k}: {v}\r\n" for k, v in {"Host": self.netloc, "Content-Length": size, **headers}.items())
        sock.sendall(f"POST {path} HTTP/1.1\r\n{lines}\r\n".encode())
        filler, sent, answer = b"x" * (1 << 16), 0, b""

        def piece() -> bytes:
            if sent < len(head):
                return head[sent:]
            if sent < size - len(tail):
                return filler[: size - len(tail) - sent]
            return tail[sent - (size - len(tail)) :]

        try:
            while b"\r\n" not in answer:
                readable, writable, _ = select.select([sock], [sock] if sent < size else [], [], 60)
                if readable:
                    data = sock.recv(65536)
                    if not data:
                        break
                    answer += data
                elif writable:
                    sent += sock.send(piece())
                else:
                    break
        except (BrokenPipeError, ConnectionResetError):
            pass
        finally:
            sock.close()
        match = re.match(rb"HTTP/1\.[01] (\d{3})", answer)
        return (int(match.group(1)) if match else None), sent

    def get(self, path: str, **headers):
        return self.request("GET", path, headers=headers)

    def api(self, path: str) -> dict:
        status, _, body = self.get(path, **self.auth())
        assert status == 200, (status, body)
        return json.loads(body)

    def post(self, path: str, fields: dict | None = None, **headers):
        """A POST as the dashboard's own page sends it: same Origin, CSRF header, form body, JSON answer."""
        body = urlencode(fields or {})
        sent = {
            "Origin": self.base,
            "X-CSRF-Token": self.csrf,
            "Content-Type": "application/x-www-form-urlencoded",
            "Accept": "application/json",
            **self.auth(),
            **headers,
        }
        status, _, text = self.request("POST", path, body, {k: v for k, v in sent.items() if v is not None})
        return status, (json.loads(text) if text.startswith("{") else text)

    def links(self, name: str) -> dict:
        """The study's row on the list page: `page` (its link), `api` (its JSON) and `actions`
        (form targets by name)."""
        status, _, page = self.get("/", **self.auth())
        assert status == 200, (status, page)
        row = Row(page, self.base).rows[name]
        return row | {"api": "/api" + row["page"], "fragment": "/fragments" + row["page"]}

    def study(self, name: str) -> dict:
        return self.api(self.links(name)["api"])

    def act(self, name: str, action: str, fields: dict | None = None, **headers):
        """Press a button of the study's row (its form's action), as the page's script does."""
        return self.post(self.links(name)["actions"][action], fields, **headers)

    def close(self) -> None:
        """End the workers this dashboard started (by their pids), then the dashboard."""
        if self.process.poll() is None:
            try:
                for study in self.api("/api/studies")["studies"]:
                    if study.get("state") == "unreadable":
                        continue
                    worker = self.study(study["name"]).get("worker")
                    if worker and worker["status"] == "running":
                        os.kill(worker["pid"], signal.SIGTERM)
            finally:
                self.process.terminate()
                self.process.wait(30)


def trials(storage: str, name: str) -> list[optuna.trial.FrozenTrial]:
    return optuna.load_study(study_name=name, storage=storage).get_trials()
