"""The bot's cross-signing identity: a master key, a self-signing key that signs the bot's one device, and a
user-signing key, so that clients excluding insecure devices (Element, MSC4153) share room keys with the bot
and show what it says.

The private keys live in two places: in the bot's database, encrypted under the pickle key (so a restart, a
password re-login or a standby taking over signs with the same keys), and in secret storage on the homeserver
(SSSS, account data) under a recovery key, so a new database restores the same identity from the recovery key.
The recovery key is kept in the database, encrypted, only until `spacesync crypto recovery-key` shows it once.

An account whose master key the bot cannot open is never overwritten by accident: that takes
`spacesync crypto reset-identity`."""

from __future__ import annotations

import hashlib
import json
from typing import TYPE_CHECKING, Any, cast

import structlog
from mautrix.api import Method
from mautrix.crypto.cross_signing_key import CrossSigningSeeds
from mautrix.crypto.ssss import Key as SSSSKey
from mautrix.crypto.ssss.types import EncryptedKeyData
from mautrix.errors import MatrixRequestError
from mautrix.util.async_db import Database

if TYPE_CHECKING:
    from mautrix.crypto import OlmMachine

    from .adapter import MatrixAdapter

log = structlog.get_logger("spacesync.crypto")

SEEDS = ("master_key", "self_signing_key", "user_signing_key")


class IdentityError(Exception):
    """The cross-signing identity cannot be set up: one line for the operator (log, /ready, notice)."""


def _kv_key(kind: str, user_id: str) -> str:
    return f"crypto:{kind}:{user_id}"


class Vault:
    """Secrets kept in the bot's database, encrypted under a key derived from the pickle key."""

    def __init__(self, db: Database, user_id: str, pickle_key: str) -> None:
        self.db = db
        self.user_id = user_id
        digest = hashlib.sha256(b"spacesync cross-signing\0" + pickle_key.encode()).digest()
        self._key = SSSSKey(id="spacesync", key=digest, metadata=cast(Any, None))

    async def get(self, kind: str) -> bytes | None:
        raw = await self.db.fetchval("SELECT value FROM kv WHERE key=$1", _kv_key(kind, self.user_id))
        if raw is None:
            return None
        try:
            return self._key.decrypt(kind, EncryptedKeyData.deserialize(json.loads(raw)))
        except ValueError as e:
            raise IdentityError(f"bot.pickle_key does not open the stored {kind.replace('_', ' ')}") from e

    async def put(self, kind: str, value: bytes) -> None:
        sealed = json.dumps(self._key.encrypt(kind, value).serialize())
        await self.db.execute(
            "INSERT INTO kv (key, value) VALUES ($1, $2) ON CONFLICT (key) DO UPDATE SET value=excluded.value",
            _kv_key(kind, self.user_id),
            sealed,
        )

    async def delete(self, kind: str) -> None:
        await self.db.execute("DELETE FROM kv WHERE key=$1", _kv_key(kind, self.user_id))

    async def seeds(self) -> CrossSigningSeeds | None:
        raw = await self.get("cross_signing")
        if raw is None:
            return None
        data = json.loads(raw)
        return CrossSigningSeeds(*(bytes.fromhex(data[name]) for name in SEEDS))

    async def put_seeds(self, seeds: CrossSigningSeeds) -> None:
        await self.put("cross_signing", json.dumps({n: getattr(seeds, n).hex() for n in SEEDS}).encode())


async def request_reset(db: Database, user_id: str) -> None:
    """Mark the identity for replacement at the bot's next start (`spacesync crypto reset-identity`)."""
    await db.execute(
        "INSERT INTO kv (key, value) VALUES ($1, '1') ON CONFLICT (key) DO UPDATE SET value=excluded.value",
        _kv_key("reset_identity", user_id),
    )


class ServerIdentity:
    """What the homeserver holds for the bot's account: its master and self-signing public keys, and
    which keys signed the bot's device."""

    def __init__(self, answer: dict[str, Any], user_id: str, device_id: str) -> None:
        def only_key(section: str) -> str | None:
            keys = ((answer.get(section) or {}).get(user_id) or {}).get("keys") or {}
            return next(iter(keys.values()), None) if isinstance(keys, dict) else None

        self.master = only_key("master_keys")
        self.self_signing = only_key("self_signing_keys")
        device = ((answer.get("device_keys") or {}).get(user_id) or {}).get(device_id) or {}
        self.device_signers = set(((device.get("signatures") or {}).get(user_id) or {}).keys())

    @property
    def device_signed(self) -> bool:
        return self.self_signing is not None and f"ed25519:{self.self_signing}" in self.device_signers


class CrossSigning:
    """Creates, restores and checks the bot's cross-signing identity at every start of its crypto."""

    def __init__(
        self,
        matrix: MatrixAdapter,
        machine: OlmMachine,
        vault: Vault,
        *,
        recovery_key: str | None,
    ) -> None:
        self.matrix = matrix
        self.machine = machine
        self.vault = vault
        self.recovery_key = recovery_key
        self.master_key: str | None = None
        """The bot's master public key, once the identity is in place."""

    @property
    def user_id(self) -> str:
        return str(self.machine.client.mxid)

    async def query(self) -> ServerIdentity:
        """The account's keys as the homeserver has them now (a failed read raises: unknown is not absent)."""
        answer = await self.matrix.request(
            Method.POST, "/_matrix/client/v3/keys/query", {"device_keys": {self.user_id: []}}
        )
        return ServerIdentity(answer, self.user_id, str(self.machine.client.device_id))

    async def ensure(self) -> None:
        """The identity in place and the bot's device signed by it; IdentityError when that needs the operator."""
        server = await self.query()
        stored = await self.vault.seeds()
        if await self.vault.db.fetchval("SELECT value FROM kv WHERE key=$1", _kv_key("reset_identity", self.user_id)):
            await self._create(replacing=server.master)
            await self.vault.db.execute("DELETE FROM kv WHERE key=$1", _kv_key("reset_identity", self.user_id))
            return
        if stored is not None and server.master == stored.to_keys().master_key.public_key:
            await self._use(stored, server)
            return
        if server.master is None:
            await self._create(replacing=None)
            return
        if self.recovery_key is not None:
            await self._use(await self._restore(server.master), server)
            log.info("cross-signing identity restored from the recovery key", master_key=server.master)
            return
        raise IdentityError(
            f"the account {self.user_id} already has a cross-signing identity (master key {server.master}) "
            "that this database cannot open, so clients that exclude unverified devices ignore the bot: set "
            "bot.recovery_key (or bot.recovery_key_file), or run `spacesync crypto reset-identity` to replace it"
        )

    async def _use(self, seeds: CrossSigningSeeds, server: ServerIdentity) -> None:
        self.machine._import_cross_signing_keys(seeds)
        public = seeds.to_keys().public_keys
        await self.vault.put_seeds(seeds)
        self.master_key = public.master_key
        if not server.device_signed or server.self_signing != public.self_signing_key:
            await self.machine.sign_own_device(self.machine.own_identity)
            await self._check_signed()

    async def _restore(self, master: str) -> CrossSigningSeeds:
        assert self.recovery_key is not None
        try:
            key_id, key_data = await self.machine.ssss.get_default_key_data()
            ssss_key = key_data.verify_recovery_key(key_id, self.recovery_key)
            seeds = await self.machine._fetch_cross_signing_keys_from_ssss(ssss_key)
        except (ValueError, MatrixRequestError) as e:
            raise IdentityError(
                f"bot.recovery_key does not open the secret storage of {self.user_id} ({e}); set the recovery key "
                "`spacesync crypto recovery-key` showed, or run `spacesync crypto reset-identity` to replace it"
            ) from e
        if seeds.to_keys().master_key.public_key != master:
            raise IdentityError(
                f"the secret storage of {self.user_id} holds another master key than the account's ({master}); "
                "run `spacesync crypto reset-identity` to replace the identity"
            )
        return seeds

    async def _create(self, replacing: str | None) -> None:
        seeds = CrossSigningSeeds.generate()
        # The private keys are in the database before anything is uploaded: a crash in between leaves keys
        # the bot can open (the next start sees its own master key on the server, or uploads again).
        await self.vault.put_seeds(seeds)
        recovery_key = await self.machine.generate_recovery_key(seeds=seeds)
        await self.vault.put("recovery_key", recovery_key.encode())
        self.master_key = seeds.to_keys().master_key.public_key
        await self._check_signed()
        log.warning(
            "created the bot's cross-signing identity"
            if replacing is None
            else "replaced the bot's cross-signing identity: moderators' clients will say the bot's identity changed",
            master_key=self.master_key,
            replaced=replacing,
            next_step="run `spacesync crypto recovery-key` once and keep the key it prints (see docs/deployment.md)",
        )

    async def _check_signed(self) -> None:
        server = await self.query()
        if not server.device_signed:
            raise IdentityError(
                f"the homeserver did not keep the signature on the bot's device {self.machine.client.device_id}; "
                "restart the bot"
            )


async def upload_with_auth(matrix: MatrixAdapter, user_id: str, password: str | None, content: dict[str, Any]) -> None:
    """POST /keys/device_signing/upload, answering user-interactive auth with the bot's password when asked.
    Synapse takes a first upload without auth (MSC3967); replacing keys needs it."""
    path = "/_matrix/client/v3/keys/device_signing/upload"
    try:
        await matrix.request(Method.POST, path, content)
        return
    except MatrixRequestError as e:
        if e.http_status != 401:
            raise
        try:
            session = json.loads(getattr(e, "text", "") or "{}").get("session")
        except ValueError:
            session = None
        if not password or not session:
            raise IdentityError(
                "the homeserver wants the bot's password to replace its cross-signing keys: set bot.password "
                "(or bot.password_file) for this start"
            ) from e
    auth = {
        "type": "m.login.password",
        "identifier": {"type": "m.id.user", "user": user_id},
        "password": password,
        "session": session,
    }
    await matrix.request(Method.POST, path, {**content, "auth": auth})


__all__ = [
    "CrossSigning",
    "IdentityError",
    "ServerIdentity",
    "Vault",
    "request_reset",
    "upload_with_auth",
]
