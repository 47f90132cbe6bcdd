// A moderator's client as Element Web runs it: matrix-js-sdk with its Rust crypto (matrix-sdk-crypto-wasm),
// its own device cross-signed, excluding insecure devices (OnlySignedDevicesIsolationMode): room keys only for
// devices their owner cross-signed, and messages from other devices not decrypted.
//
// Driven by the tests over stdin/stdout, one JSON object a line each way:
//   {"cmd": "start", "homeserver", "user_id", "access_token", "device_id", "password"} -> {"ok": true, "master_key"}
//   {"cmd": "ask", "room_id", "text", "timeout_ms"} -> {"ok": true, "event_id", "body", "encrypted", "shield"}
//   {"cmd": "send", "room_id", "text"} -> {"ok": true, "event_id"}
//   {"cmd": "reply", "event_id", "timeout_ms"} -> the decrypted reply to that event, as for "ask"
//   {"cmd": "reset_identity"} -> {"ok": true, "master_key"}: new cross-signing keys, this device signed with them
//   {"cmd": "devices", "user_id"} -> {"ok": true, "master_key", "devices": [{"device_id", "signed_by_owner"}]}
//   {"cmd": "stop"} -> {"ok": true}, then exit
// Any failure answers {"ok": false, "error": "..."}. The SDK's own logging goes to stderr.

import readline from "node:readline";

const out = (obj) => process.stdout.write(JSON.stringify(obj) + "\n");
for (const level of ["log", "info", "debug", "warn", "trace"]) {
    console[level] = (...args) => process.stderr.write(args.map(String).join(" ") + "\n");
}

const sdk = await import("matrix-js-sdk");
const { logger } = await import("matrix-js-sdk/lib/logger.js");
const { OnlySignedDevicesIsolationMode } = await import("matrix-js-sdk/lib/crypto-api/index.js");
logger.setLevel("warn");

let client = null;
const replies = new Map(); // event id replied to -> the decrypted reply event

function replyTarget(event) {
    const relates = event.getContent()["m.relates_to"] || {};
    return (relates["m.in_reply_to"] || {}).event_id;
}

async function onTimeline(event) {
    if (event.getSender() === client.getUserId()) return;
    await client.decryptEventIfNeeded(event);
    if (event.getType() !== "m.room.message") return;
    const target = replyTarget(event);
    if (target && !replies.has(target)) replies.set(target, event);
}

let password = null;

async function authUploadDeviceSigningKeys(makeRequest) {
    try {
        await makeRequest(null);
    } catch (e) {
        const session = e && e.data && e.data.session;
        if (!session) throw e;
        await makeRequest({
            type: "m.login.password",
            identifier: { type: "m.id.user", user: client.getUserId() },
            password,
            session,
        });
    }
}

async function start(msg) {
    password = msg.password;
    client = sdk.createClient({
        baseUrl: msg.homeserver,
        userId: msg.user_id,
        accessToken: msg.access_token,
        deviceId: msg.device_id,
    });
    await client.initRustCrypto({ useIndexedDB: false });
    const crypto = client.getCrypto();
    crypto.setDeviceIsolationMode(new OnlySignedDevicesIsolationMode());
    await crypto.bootstrapCrossSigning({ authUploadDeviceSigningKeys });
    client.on(sdk.RoomEvent.Timeline, (event) => {
        onTimeline(event).catch((e) => console.warn("timeline:", e));
    });
    client.on(sdk.MatrixEventEvent.Decrypted, (event) => {
        if (event.getType() === "m.room.message" && replyTarget(event) && !replies.has(replyTarget(event))) {
            if (event.getSender() !== client.getUserId()) replies.set(replyTarget(event), event);
        }
    });
    await client.startClient({ initialSyncLimit: 20 });
    await new Promise((resolve) => {
        const ready = (state) => {
            if (state === "PREPARED" || state === "SYNCING") {
                client.off(sdk.ClientEvent.Sync, ready);
                resolve();
            }
        };
        client.on(sdk.ClientEvent.Sync, ready);
    });
    const status = await crypto.getCrossSigningStatus();
    if (!status.publicKeysOnDevice || !status.privateKeysCachedLocally.selfSigningKey) {
        throw new Error(`own cross-signing not set up: ${JSON.stringify(status)}`);
    }
    const own = await crypto.getDeviceVerificationStatus(msg.user_id, msg.device_id);
    if (!own || !own.signedByOwner) throw new Error("own device not cross-signed");
    return { master_key: (await crypto.getCrossSigningKeyId()) || null };
}

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

async function ask(msg) {
    const sent = await client.sendMessage(msg.room_id, { msgtype: "m.text", body: msg.text });
    return await reply({ event_id: sent.event_id, timeout_ms: msg.timeout_ms });
}

async function send(msg) {
    const sent = await client.sendMessage(msg.room_id, { msgtype: "m.text", body: msg.text });
    return { event_id: sent.event_id };
}

async function reply(msg) {
    const deadline = Date.now() + (msg.timeout_ms || 30000);
    const sent = { event_id: msg.event_id };
    while (Date.now() < deadline) {
        const reply = replies.get(sent.event_id);
        if (reply && !reply.isBeingDecrypted() && !reply.isDecryptionFailure()) {
            const shield = await client.getCrypto().getEncryptionInfoForEvent(reply);
            return {
                event_id: sent.event_id,
                body: reply.getContent().body,
                encrypted: reply.isEncrypted(),
                shield: shield ? { colour: shield.shieldColour, reason: shield.shieldReason } : null,
            };
        }
        await sleep(100);
    }
    throw new Error(`no decrypted reply to ${sent.event_id} within ${msg.timeout_ms || 30000} ms`);
}

async function devices(msg) {
    const crypto = client.getCrypto();
    const map = await crypto.getUserDeviceInfo([msg.user_id], true);
    const result = [];
    for (const device of (map.get(msg.user_id) || new Map()).values()) {
        const status = await crypto.getDeviceVerificationStatus(msg.user_id, device.deviceId);
        result.push({ device_id: device.deviceId, signed_by_owner: Boolean(status && status.signedByOwner) });
    }
    const identity = await crypto.getUserVerificationStatus(msg.user_id);
    const keys = await client.downloadKeysForUsers([msg.user_id]);
    const master = ((keys.master_keys || {})[msg.user_id] || {}).keys || {};
    return {
        devices: result,
        master_key: Object.values(master)[0] || null,
        identity_known: Boolean(identity),
    };
}

async function resetIdentity() {
    const crypto = client.getCrypto();
    await crypto.bootstrapCrossSigning({ setupNewCrossSigning: true, authUploadDeviceSigningKeys });
    return { master_key: (await crypto.getCrossSigningKeyId()) || null };
}

const handlers = { start, ask, send, reply, devices, reset_identity: resetIdentity };
const lines = readline.createInterface({ input: process.stdin });
for await (const line of lines) {
    if (!line.trim()) continue;
    const msg = JSON.parse(line);
    if (msg.cmd === "stop") {
        if (client) client.stopClient();
        out({ ok: true });
        process.exit(0);
    }
    try {
        out({ ok: true, ...(await handlers[msg.cmd](msg)) });
    } catch (e) {
        out({ ok: false, error: `${e && e.name}: ${e && e.message}` });
    }
}
if (client) client.stopClient();
process.exit(0);
