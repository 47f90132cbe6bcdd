"""`spacesync demo` as a person runs it: the scripted story succeeds, and Ctrl-C cleans everything up."""

from __future__ import annotations

import importlib.util
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from ..conftest import unavailable

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _needs_synapse() -> None:
    if importlib.util.find_spec("synapse") is None:
        unavailable("matrix-synapse is not installed: pip install -e '.[test]'")


def _env() -> dict[str, str]:
    env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONIOENCODING="utf-8")
    for name in ("SPACESYNC_CONFIG", "SPACESYNC_ACCESS_TOKEN", "SPACESYNC_PASSWORD", "SPACESYNC_DATABASE_URL"):
        env.pop(name, None)
    return env


def _demo(workdir: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "spacesync", "demo", "--workdir", str(workdir), *extra]


def _run_demo(workdir: Path, *extra: str, timeout: float) -> str:
    """The demo run to its end: its output, once it exited 0."""
    result = subprocess.run(
        _demo(workdir, *extra), cwd=ROOT, env=_env(), capture_output=True, text=True, encoding="utf-8", timeout=timeout
    )
    output = result.stdout
    assert result.returncode == 0, f"exit {result.returncode}\n{output}\n--- stderr ---\n{result.stderr[-4000:]}"
    return output


def _port_open(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def _processes_mentioning(path: Path) -> list[str]:
    """Command lines of running processes that name `path` (Linux /proc; empty elsewhere)."""
    found = []
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if str(path) in cmdline:
            found.append(cmdline)
    return found


@pytest.mark.timeout(150)
def test_scripted_demo_tells_the_story_and_succeeds(tmp_path: Path) -> None:
    workdir = tmp_path / "demo"
    output = _run_demo(workdir, "--scripted", timeout=120)
    assert "alice leaves the Space" in output
    assert "the bot exempt from the stock rate limits" in output and "/override_ratelimit" in output
    assert re.search(r"✓ alice is out of general, random, Projects and project-x", output), output
    assert "✗" not in output, output
    assert "crypto recovery-key` prints its recovery key once" in output
    assert re.search(r"✓ master key \S+…, device signed", output), output
    assert "All 7 steps succeeded" in output
    assert not workdir.exists(), "the demo must remove its work directory"


@pytest.mark.timeout(150)
def test_federated_demo_spans_two_homeservers_and_succeeds(tmp_path: Path) -> None:
    workdir = tmp_path / "demo"
    output = _run_demo(workdir, "--scripted", "--federated", timeout=140)
    servers = re.findall(r"server name (127\.0\.0\.1:\d+)", output)
    assert len(set(servers)) == 2, output
    # the moderator (and the Space) on the second server, the bot on the first
    assert f"@moderator:{servers[1]}" in output and f"@spacesync:{servers[0]}" in output, output
    assert re.search(r"✓ alice is out of general, random, Projects and project-x", output), output
    assert re.search(r"✓ carol is banned from general, random, Projects and project-x", output), output
    assert "✗" not in output, output
    assert "All 7 steps succeeded" in output
    assert not workdir.exists(), "the demo must remove its work directory"


@pytest.mark.timeout(150)
def test_appservice_demo_runs_the_story_on_stock_rate_limits(tmp_path: Path) -> None:
    workdir = tmp_path / "demo"
    output = _run_demo(workdir, "--scripted", "--appservice", timeout=120)
    assert "registration.yaml (as `spacesync appservice registration` does)" in output, output
    assert "rate_limited: false, on stock rate limits" in output, output
    assert re.search(r"✓ alice is out of general, random, Projects and project-x", output), output
    assert re.search(r"✓ master key \S+…, device signed", output), output
    assert "✗" not in output, output
    assert "All 7 steps succeeded" in output
    assert not workdir.exists(), "the demo must remove its work directory"


@pytest.mark.timeout(150)
def test_interactive_demo_stops_cleanly_on_ctrl_c(tmp_path: Path) -> None:
    workdir = tmp_path / "demo"
    process = subprocess.Popen(
        _demo(workdir),
        cwd=ROOT,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        encoding="utf-8",
    )
    lines: list[str] = []
    hint = threading.Event()

    def read() -> None:
        assert process.stdout is not None
        for line in process.stdout:
            lines.append(line)
            if "Ctrl-C" in line:
                hint.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        assert hint.wait(120), "no Ctrl-C hint within 120 s:\n" + "".join(lines)
        output = "".join(lines)
        match = re.search(r"Homeserver\s+http://127\.0\.0\.1:(\d+)", output)
        assert match, output
        port = int(match.group(1))
        assert _port_open(port), "the homeserver should be up while the demo waits"

        started = time.monotonic()
        process.send_signal(signal.SIGINT)
        code = process.wait(15)
        assert code == 0, "".join(lines)
        assert time.monotonic() - started < 15
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    reader.join(5)
    deadline = time.monotonic() + 5
    while _port_open(port) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _port_open(port), "Synapse is still listening after the demo exited"
    assert not _processes_mentioning(workdir), "a process from the demo outlived it"
    assert not workdir.exists(), "the demo must remove its work directory"
    assert "cleaned up" in "".join(lines)
