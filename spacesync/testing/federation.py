"""Two Synapse homeservers on loopback that really federate with each other.

Each server is named ``127.0.0.1:<federation port>``: an IP literal with an explicit port, so
Synapse connects straight to it without .well-known, SRV or DNS look-ups. Besides its plain-HTTP
client listener, each serves ``federation`` and ``keys`` over TLS on the federation port with a
self-signed certificate (subjectAltName IP:127.0.0.1) made by ``openssl`` at start.

Every one of the following settings is unsafe in production and exists only so that two
throwaway servers on one machine can talk to each other:

- ``federation_verify_certificates: false``: accepts any certificate, so anyone on the path
  can impersonate the other server's TLS endpoint.
- ``ip_range_blacklist: []`` and ``federation_ip_range_blacklist: []``: loopback and private
  ranges are blocked by default so that remote users cannot make the server request internal
  services (SSRF); here the peer lives on 127.0.0.1.
- ``trusted_key_servers: []``: no notary, so signing keys are fetched only from the origin
  itself and never cross-checked.
- ``federation_domain_whitelist`` of the two servers: closed federation.
- ``rc_federation`` lifted: a real server needs it to survive a flood from a peer.
- ``destination_min_retry_interval: 1s`` / ``destination_max_retry_interval: 5s``: a real
  server backs off for minutes to days so that it does not hammer a server that is down; here
  a stopped peer must be usable again within seconds of its restart.

With ``front_b=True``, B's federation endpoint as A sees it is a `FaultProxy` (``pair.b_front``)
that terminates TLS with B's certificate and forwards to B's own federation listener: B is named
after the proxy's port, so every request from A to B passes it, and a test can hold or fail chosen
federation requests (e.g. the ``/state_ids/`` reads with which A resyncs a partial-state join).
The proxy passes everything through until a rule says otherwise.
"""

from __future__ import annotations

import asyncio
import secrets
from pathlib import Path

from .client import TestbedRequestError, TestUser
from .faults import FaultProxy
from .homeserver import Synapse, free_port
from .service import Service
from .waiting import wait_for

__all__ = ["FederatedPair", "join_when_allowed", "wait_until_federating"]

_FEDERATION_TIMEOUT = 60.0


class FederatedPair(Service):
    """Two homeservers, ``a`` and ``b``, that federate only with each other over loopback."""

    def __init__(
        self, workdir: Path, *, default_room_version: str = "10", log_level: str = "WARNING", front_b: bool = False
    ) -> None:
        # Every port the pair needs, told apart up front: a client port drawn later could be one of these.
        ports: list[int] = []
        while len(ports) < (5 if front_b else 4):
            if (port := free_port()) not in ports:
                ports.append(port)
        client_a, client_b = ports.pop(), ports.pop()
        port_a, port_b = ports[:2]
        name_a, name_b = f"127.0.0.1:{port_a}", f"127.0.0.1:{ports[-1]}"
        self.a = Synapse(
            Path(workdir) / "a",
            port=client_a,
            federation_port=port_a,
            federation_peers=[name_b],
            default_room_version=default_room_version,
            log_level=log_level,
        )
        self.b = Synapse(
            Path(workdir) / "b",
            server_name=name_b,
            port=client_b,
            federation_port=port_b,
            federation_peers=[name_a],
            default_room_version=default_room_version,
            log_level=log_level,
        )
        self.b_front: FaultProxy | None = None
        """With `front_b`: the proxy that is B's federation endpoint for A (see the module's notes)."""
        if front_b:
            tls = (self.b.tls_certificate_path, self.b.tls_private_key_path)
            self.b_front = FaultProxy(f"https://127.0.0.1:{port_b}", port=ports[-1], tls=tls)

    @property
    def servers(self) -> tuple[Synapse, Synapse]:
        return (self.a, self.b)

    async def start(self, *, timeout: float = _FEDERATION_TIMEOUT) -> None:
        """Start both servers side by side and wait until a join from each into the other works."""
        results = await asyncio.gather(self.a.start(), self.b.start(), return_exceptions=True)
        errors = [result for result in results if isinstance(result, BaseException)]
        if errors:
            await self.stop()
            raise errors[0]
        try:
            if self.b_front is not None:  # after B's start, which makes the certificate it serves
                await self.b_front.start()
            await wait_until_federating(self.a, self.b, timeout=timeout)
        except BaseException:
            await self.stop()
            raise

    async def stop(self) -> None:
        await asyncio.gather(self.a.stop(), self.b.stop())
        if self.b_front is not None:
            await self.b_front.stop()


async def _probe_join(host: TestUser, guest: TestUser) -> None:
    """The guest joins a fresh public room on the host's server; raises until federation works."""
    room_id = await host.client.create_room(name="federation probe", join_rule="public")
    try:

        async def joined() -> bool:
            try:
                await guest.client.join(room_id, via=[host.client.server_name])
            except TestbedRequestError:
                return False
            return True

        await wait_for(joined, timeout=_FEDERATION_TIMEOUT, interval=0.2)
        await wait_for(lambda: _has_joined(host, room_id, guest.user_id), timeout=_FEDERATION_TIMEOUT, interval=0.1)
    finally:
        await guest.client.leave(room_id)


async def _has_joined(host: TestUser, room_id: str, user_id: str) -> bool:
    return user_id in await host.client.joined_members(room_id)


async def wait_until_federating(first: Synapse, second: Synapse, *, timeout: float = _FEDERATION_TIMEOUT) -> None:
    """Wait until a user of each server can join a room on the other (keys fetched, TLS accepted)."""
    suffix = secrets.token_hex(4)
    one = await first.register(f"fedprobe_{suffix}")
    two = await second.register(f"fedprobe_{suffix}")
    try:
        async with asyncio.timeout(timeout):
            await _probe_join(one, two)
            await _probe_join(two, one)
    except TimeoutError as exc:
        raise RuntimeError(
            f"{first.server_name} and {second.server_name} did not federate within {timeout:g} s; "
            f"see {first.log_path} and {second.log_path}"
        ) from exc
    finally:
        await one.client.close()
        await two.client.close()


async def join_when_allowed(user: TestUser, room_id: str, via: list[str], *, timeout: float = 30.0) -> str:
    """Join a restricted room on another server, retrying while that server cannot yet vouch for the user.

    A server that has just joined the allowed Space holds only partial state there (faster joins) and
    refuses restricted joins it cannot check ("You do not belong to any of the required rooms") until the
    full state has arrived: a few seconds on loopback."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        try:
            return await user.client.join(room_id, via=via)
        except TestbedRequestError as exc:
            if exc.status != 403 or loop.time() >= deadline:
                raise
        await asyncio.sleep(0.25)
