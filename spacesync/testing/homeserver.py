"""A throwaway Synapse homeserver run as a child process: its config, start and stop, and registration."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import importlib.util
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import weakref
from pathlib import Path
from typing import Any, Final

import aiohttp

from .client import JSON, TestClient, TestUser, _matrix_request, _q
from .service import Service
from .stock import FEDERATION_DEVIATIONS, MSC4293_DEVIATION, STOCK_DEVIATIONS

__all__ = ["Synapse", "free_port"]

_START_TIMEOUT: Final = 60.0
_STOP_TIMEOUT: Final = 10.0
_LOG_TAIL_LINES: Final = 40


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _generate_signing_key() -> str:
    try:
        from signedjson.key import encode_signing_key_base64, generate_signing_key
    except ImportError as exc:
        raise RuntimeError("signedjson is missing: pip install matrix-synapse") from exc
    key = generate_signing_key(f"a_{secrets.token_hex(2)}")
    return f"{key.alg} {key.version} {encode_signing_key_base64(key)}"


def _reap(process: subprocess.Popen[bytes]) -> None:
    """Finaliser: make sure a homeserver does not outlive its owner."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(_STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


async def _wait_exit(process: subprocess.Popen[bytes], timeout: float) -> bool:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while process.poll() is None:
        if loop.time() >= deadline:
            return False
        await asyncio.sleep(0.01)
    return True


class Synapse(Service):
    """A throwaway Synapse homeserver (SQLite, loopback only) run as a child process."""

    def __init__(
        self,
        workdir: Path,
        *,
        server_name: str = "localhost",
        port: int | None = None,
        msc4293: bool = False,
        default_room_version: str = "10",
        log_level: str = "WARNING",
        federation_port: int | None = None,
        federation_peers: list[str] | None = None,
        app_service_config_files: list[Path] | None = None,
    ) -> None:
        self.workdir = Path(workdir)
        self.app_service_config_files = [str(p) for p in app_service_config_files or []]
        """Appservice registrations the server loads (spacesync's own, for appservice mode)."""
        self.federation_port = federation_port
        """With a port, the server federates over TLS on it and is named ``127.0.0.1:<port>``."""
        self.federation_peers = list(federation_peers or [])
        """Server names allowed to federate with this one (besides itself)."""
        if federation_port is not None and server_name == "localhost":
            server_name = f"127.0.0.1:{federation_port}"
        self.server_name = server_name
        self.msc4293 = msc4293
        """Synapse's unstable MSC4293 (`experimental_features.msc4293_enabled`): off, as shipped, unless asked."""
        self.default_room_version = default_room_version
        self.log_level = log_level
        self._port = port
        self._process: subprocess.Popen[bytes] | None = None
        self._finalizer: weakref.finalize[[subprocess.Popen[bytes]], Synapse] | None = None
        self._session: aiohttp.ClientSession | None = None
        self._shared_secret = secrets.token_urlsafe(24)
        self._signing_key: str | None = None
        self._admin_token: str | None = None

    @property
    def config_path(self) -> Path:
        return self.workdir / "homeserver.yaml"

    @property
    def log_path(self) -> Path:
        """Synapse's own log, at ``log_level``."""
        return self.workdir / "homeserver.log"

    @property
    def console_log_path(self) -> Path:
        """The child process's stdout and stderr (start-up errors end up here)."""
        return self.workdir / "console.log"

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("the homeserver has not been started yet")
        return self._port

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    # Process lifecycle

    async def start(self) -> None:
        """Write the config, start the homeserver and wait until it answers."""
        if self.running:
            raise RuntimeError(f"Synapse is already running (pid {self.pid})")
        if importlib.util.find_spec("synapse") is None:
            raise RuntimeError("matrix-synapse is not installed: pip install matrix-synapse")
        self.workdir.mkdir(parents=True, exist_ok=True)
        if self._port is None:
            self._port = free_port()
        if self.federation_port is not None:
            self._make_certificate()
        self._write_config()
        with self.console_log_path.open("ab") as console:
            self._process = subprocess.Popen(
                [sys.executable, "-m", "synapse.app.homeserver", "-c", str(self.config_path)],
                stdin=subprocess.DEVNULL,
                stdout=console,
                stderr=subprocess.STDOUT,
                cwd=self.workdir,
                start_new_session=True,
            )
        self._finalizer = weakref.finalize(self, _reap, self._process)
        try:
            await self._wait_until_ready()
        except BaseException:
            await self.kill()
            raise

    async def stop(self) -> None:
        """SIGTERM the homeserver and wait for it to exit (SIGKILL after 10 s)."""
        await self._halt(signal.SIGTERM)

    async def kill(self) -> None:
        """SIGKILL the homeserver, as in a crash."""
        await self._halt(signal.SIGKILL)

    async def restart(self) -> None:
        """Stop and start again on the same port with the same database."""
        await self.stop()
        await self.start()

    async def _halt(self, sig: signal.Signals) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
        process = self._process
        if process is None:
            return
        if process.poll() is None:
            os.kill(process.pid, sig)
            if not await _wait_exit(process, _STOP_TIMEOUT):
                os.kill(process.pid, signal.SIGKILL)
                await _wait_exit(process, _STOP_TIMEOUT)
        if self._finalizer is not None:
            self._finalizer.detach()
            self._finalizer = None
        self._process = None

    async def _wait_until_ready(self) -> None:
        assert self._process is not None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + _START_TIMEOUT
        probe_timeout = aiohttp.ClientTimeout(total=2)
        async with aiohttp.ClientSession(timeout=probe_timeout) as session:
            while True:
                returncode = self._process.poll()
                if returncode is not None:
                    raise RuntimeError(
                        f"Synapse exited with status {returncode} while starting; "
                        f"see {self.console_log_path}:\n{self._log_tail()}"
                    )
                try:
                    async with session.get(f"{self.url}/_matrix/client/versions") as resp:
                        if resp.status == 200:
                            return
                except (TimeoutError, aiohttp.ClientError):
                    pass
                if loop.time() >= deadline:
                    raise RuntimeError(
                        f"Synapse did not answer within {_START_TIMEOUT:g} s; "
                        f"see {self.console_log_path} and {self.log_path}:\n{self._log_tail()}"
                    )
                await asyncio.sleep(0.05)

    def _log_tail(self) -> str:
        lines: list[str] = []
        for path in (self.console_log_path, self.log_path):
            if path.exists():
                lines += path.read_text(errors="replace").splitlines()[-_LOG_TAIL_LINES:]
        return "\n".join(lines)

    @property
    def tls_certificate_path(self) -> Path:
        return self.workdir / "federation.crt"

    @property
    def tls_private_key_path(self) -> Path:
        return self.workdir / "federation.key"

    def _make_certificate(self) -> None:
        """A self-signed certificate for IP 127.0.0.1, made once per workdir with ``openssl``."""
        if self.tls_certificate_path.exists() and self.tls_private_key_path.exists():
            return
        command = [
            "openssl", "req", "-x509", "-nodes", "-days", "7",
            "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
            "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
            "-keyout", str(self.tls_private_key_path), "-out", str(self.tls_certificate_path),
        ]  # fmt: skip
        try:
            subprocess.run(command, check=True, capture_output=True, timeout=30)
        except FileNotFoundError as exc:
            raise RuntimeError("openssl is missing: install it to run a federating homeserver") from exc
        except subprocess.CalledProcessError as exc:
            stderr = exc.stderr.decode(errors="replace").strip()
            raise RuntimeError(f"openssl could not make the federation certificate: {stderr}") from exc

    def _federation_config(self) -> JSON:
        """FEDERATION_DEVIATIONS, with this server's paths and peers."""
        if self.federation_port is None:
            return {}
        config: JSON = {key: deviation.value for key, deviation in FEDERATION_DEVIATIONS.items()}
        config |= {
            "tls_certificate_path": str(self.tls_certificate_path),
            "tls_private_key_path": str(self.tls_private_key_path),
            "federation_domain_whitelist": sorted({self.server_name, *self.federation_peers}),
        }
        return config

    def _listeners(self) -> list[JSON]:
        listeners: list[JSON] = [
            {
                "port": self.port,
                "bind_addresses": ["127.0.0.1"],
                "type": "http",
                "tls": False,
                "x_forwarded": False,
                "resources": [{"names": ["client"], "compress": False}],
            }
        ]
        if self.federation_port is not None:
            listeners.append(
                {
                    "port": self.federation_port,
                    "bind_addresses": ["127.0.0.1"],
                    "type": "http",
                    "tls": True,
                    "x_forwarded": False,
                    "resources": [{"names": ["federation", "keys"], "compress": False}],
                }
            )
        return listeners

    def _write_config(self) -> None:
        if self._signing_key is None:
            self._signing_key = _generate_signing_key()
        log_config_path = self.workdir / "log.config"
        log_config = {
            "version": 1,
            "disable_existing_loggers": False,
            "formatters": {
                "precise": {"format": "%(asctime)s - %(name)s - %(lineno)d - %(levelname)s - %(request)s - %(message)s"}
            },
            "filters": {"context": {"()": "synapse.logging.context.LoggingContextFilter"}},
            "handlers": {
                "file": {
                    "class": "logging.FileHandler",
                    "filename": str(self.log_path),
                    "formatter": "precise",
                    "filters": ["context"],
                    "encoding": "utf8",
                }
            },
            "root": {"level": self.log_level, "handlers": ["file"]},
        }
        config: JSON = {key: deviation.value for key, deviation in STOCK_DEVIATIONS.items()}
        config |= {
            "server_name": self.server_name,
            "report_stats": False,
            "signing_key": self._signing_key,
            "media_store_path": str(self.workdir / "media_store"),
            "registration_shared_secret": self._shared_secret,
            "enable_registration": False,
            "default_room_version": self.default_room_version,
            "listeners": self._listeners(),
            "database": {
                "name": "sqlite3",
                "args": {"database": str(self.workdir / "homeserver.db")},
            },
            "log_config": str(log_config_path),
            **self._federation_config(),
            **({"app_service_config_files": self.app_service_config_files} if self.app_service_config_files else {}),
        }
        if self.msc4293:
            config["experimental_features"] = MSC4293_DEVIATION.value
        # JSON is valid YAML, so no YAML library is needed here.
        log_config_path.write_text(json.dumps(log_config, indent=2))
        self.config_path.write_text(json.dumps(config, indent=2))

    # Admin API

    async def _request(self, method: str, path: str, json_body: Any = None, *, token: str | None = None) -> Any:
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60))
        return await _matrix_request(self._session, method, self.url + path, token=token, json_body=json_body)

    async def _register_raw(self, localpart: str, password: str, admin: bool, displayname: str | None) -> JSON:
        path = "/_synapse/admin/v1/register"
        nonce: str = (await self._request("GET", path))["nonce"]
        mac = hmac.new(self._shared_secret.encode(), digestmod=hashlib.sha1)
        for part in (nonce, localpart, password):
            mac.update(part.encode())
            mac.update(b"\x00")
        mac.update(b"admin" if admin else b"notadmin")
        body: JSON = {
            "nonce": nonce,
            "username": localpart,
            "password": password,
            "admin": admin,
            "mac": mac.hexdigest(),
        }
        if displayname is not None:
            body["displayname"] = displayname
        result: JSON = await self._request("POST", path, body)
        return result

    async def register(
        self,
        localpart: str,
        *,
        password: str | None = None,
        admin: bool = False,
        displayname: str | None = None,
        exempt: bool = False,
    ) -> TestUser:
        """Register an account with the shared secret and return it with a ready client; `exempt`: exempt it
        from rate limits (`exempt()`)."""
        password = password if password is not None else secrets.token_urlsafe(12)
        result = await self._register_raw(localpart, password, admin, displayname)
        if exempt:
            await self.exempt(result["user_id"])
        return TestUser(
            user_id=result["user_id"],
            access_token=result["access_token"],
            password=password,
            device_id=result["device_id"],
            client=TestClient(self.url, result["access_token"], result["user_id"]),
        )

    async def _admin(self) -> str:
        """The test bed's own admin account (registered with the shared secret on first use): its token."""
        if self._admin_token is None:
            localpart = f"testbed_admin_{secrets.token_hex(4)}"
            result = await self._register_raw(localpart, secrets.token_urlsafe(12), True, None)
            self._admin_token = result["access_token"]
        return self._admin_token

    def _override_path(self, user_id: str) -> str:
        return f"/_synapse/admin/v1/users/{_q(user_id)}/override_ratelimit"

    async def exempt(self, user_id: str) -> None:
        """Exempt one account from every rate limit, as an operator does for the bot: Synapse's admin API
        ``POST /_synapse/admin/v1/users/<id>/override_ratelimit`` with ``messages_per_second: 0``."""
        token = await self._admin()
        await self._request(
            "POST", self._override_path(user_id), {"messages_per_second": 0, "burst_count": 0}, token=token
        )

    async def enable_feature(self, user_id: str, feature: str) -> None:
        """Turn one of Synapse's per-account experimental features on (``msc4222``: `use_state_after`), through
        the admin API as an operator would: the server's config stays stock."""
        path = f"/_synapse/admin/v1/experimental_features/{_q(user_id)}"
        await self._request("PUT", path, {"features": {feature: True}}, token=await self._admin())

    async def unexempt(self, user_id: str) -> None:
        """Put one account back under the stock rate limits."""
        await self._request("DELETE", self._override_path(user_id), token=await self._admin())

    async def exemption(self, user_id: str) -> JSON:
        """What ``GET`` on the override path shows: ``{}`` when the account has no override."""
        result: JSON = await self._request("GET", self._override_path(user_id), token=await self._admin())
        return result
