"""Entry points: `spacesync run`, `check-config`, `plan`, `crypto`, `appservice` and `demo`."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
import sys
from collections.abc import Sequence

import structlog

from . import __version__
from .config import Config, ConfigError, default_config_path, load_config
from .logs import setup_logging
from .model import Plan

log = structlog.get_logger("spacesync")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="spacesync",
        description="Keeps a Matrix Space's child rooms in step with the Space: evictions, bans, "
        "power levels and join rules.",
    )
    parser.add_argument("-c", "--config", default=None, help="config file (default: $SPACESYNC_CONFIG or config.yaml)")
    parser.add_argument("--version", action="version", version=f"spacesync {__version__}")
    config_anywhere = argparse.ArgumentParser(add_help=False)
    config_anywhere.add_argument(
        "-c", "--config", default=argparse.SUPPRESS, help="config file (default: $SPACESYNC_CONFIG or config.yaml)"
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.add_parser(
        "run",
        parents=[config_anywhere],
        help="run the bot in the foreground until SIGTERM or SIGINT",
        description="Run the bot in the foreground: follow the managed Spaces and act, until "
        "SIGTERM or SIGINT (then exit 0 once in-flight actions are safe).",
    )
    sub.add_parser(
        "check-config",
        parents=[config_anywhere],
        help="validate the config file: exit 0 if valid, 2 if not",
        description="Validate the config file. Exit 0 if it is valid; else exit 2 with one line "
        "naming the key and what is expected.",
    )
    plan = sub.add_parser(
        "plan",
        parents=[config_anywhere],
        help="print what the bot would do now, changing nothing",
        description="Read the managed Spaces and print what the bot would do now: actions, "
        "held batches and warnings. Changes nothing.",
    )
    plan.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    crypto = sub.add_parser(
        "crypto",
        parents=[config_anywhere],
        help="the bot's cross-signing identity: show its recovery key once, or replace the identity",
        description="The bot's cross-signing identity (see docs/deployment.md).",
    )
    crypto.add_argument(
        "action",
        choices=["recovery-key", "reset-identity"],
        help="recovery-key: print the recovery key of the identity the bot created, once (keep it safe; "
        "bot.recovery_key restores the identity on a new database). reset-identity: replace the identity "
        "at the bot's next start (moderators' clients will say the bot's identity changed).",
    )
    appservice = sub.add_parser(
        "appservice",
        parents=[config_anywhere],
        help="run as an application service: write the registration for the homeserver",
        description="spacesync as an application service (see docs/deployment.md).",
    )
    appservice.add_argument("action", choices=["registration"], help="registration: write the registration file")
    appservice.add_argument(
        "-o",
        "--output",
        default=None,
        help="where to write it (default: appservice.registration from the config, else registration.yaml)",
    )
    appservice.add_argument(
        "--url", default=None, help="where the homeserver reaches spacesync (default: http://<appservice.listen>)"
    )
    demo = sub.add_parser(
        "demo",
        help="run against a throwaway local Synapse with a sample Space",
        description="Start a throwaway local Synapse with a sample Space, run the bot against "
        "it and narrate what happens. Ctrl-C stops and removes everything.",
    )
    demo.add_argument("--workdir", default=".demo", help="where the throwaway homeserver lives (default .demo)")
    demo.add_argument("--scripted", action="store_true", help="run the story once and exit (no waiting)")
    demo.add_argument(
        "--federated",
        action="store_true",
        help="two federating homeservers: the Space on the second, rooms on both, the bot on the first",
    )
    demo.add_argument(
        "--appservice",
        action="store_true",
        help="the bot as an application service (registration, pushed events, no rate limits; stock limits)",
    )
    return parser


def _load(path: str | None) -> Config:
    return load_config(path or default_config_path())


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command is None:
        _parser().print_help()
        return 2
    if args.command == "demo":
        from .demo import run_demo

        if args.appservice and args.federated:
            print("spacesync demo: --appservice and --federated cannot be combined; pick one", file=sys.stderr)
            return 2
        return run_demo(args.workdir, scripted=args.scripted, federated=args.federated, appservice=args.appservice)
    if args.command == "appservice":
        return _registration(args.config, args.output, args.url)
    try:
        config = _load(args.config)
    except ConfigError as e:
        print(f"spacesync: {e}", file=sys.stderr)
        return 2
    if args.command == "check-config":
        spaces = len(config.spaces)
        print(f"{args.config or default_config_path()}: valid ({spaces} Space{'' if spaces == 1 else 's'})")
        if not spaces:
            print(
                "note: no Spaces configured: the bot manages nothing until one is added "
                "(spaces[] here, or !spacesync spaces add in the admin room)"
            )
        return 0
    setup_logging(config.logging.level, config.logging.format)
    if args.command == "plan":
        return asyncio.run(_plan(config, as_json=args.json))
    if args.command == "crypto":
        return asyncio.run(_crypto(config, args.action))
    return asyncio.run(_run(config))


def _registration(config_path: str | None, output: str | None, url: str | None) -> int:
    """Write the appservice registration (fresh tokens) where the config's appservice.registration says."""
    from pathlib import Path

    from .registration import make_registration, write_registration

    try:
        config = load_config(config_path or default_config_path(), read_registration=False)
    except ConfigError as e:
        print(f"spacesync: {e}", file=sys.stderr)
        return 2
    if config.appservice is None:
        print(
            'spacesync: appservice: not set; add `appservice: {listen: "127.0.0.1:29317", registration: '
            "registration.yaml}` to the config first (docs/deployment.md)",
            file=sys.stderr,
        )
        return 2
    path = Path(output or config.appservice.registration or "registration.yaml")
    if config.appservice.registration is not None and path != config.appservice.registration:
        print(f"note: the config reads appservice.registration from {config.appservice.registration}", file=sys.stderr)
    try:
        write_registration(path, make_registration(config.bot.user_id, config.appservice, url))
    except FileExistsError:
        print(
            f"spacesync: {path}: exists; the homeserver may hold its tokens already. Remove it first to make new "
            "tokens (then restart the homeserver), or pick another path with -o",
            file=sys.stderr,
        )
        return 1
    except OSError as e:
        print(f"spacesync: {path}: cannot write ({e.strerror})", file=sys.stderr)
        return 1
    if url is None and config.appservice.host in ("0.0.0.0", "::"):
        print(
            f"note: appservice.listen is {config.appservice.host}, which the homeserver cannot connect to: the url "
            "written is http://127.0.0.1:<port>; write it again with --url if the homeserver is elsewhere",
            file=sys.stderr,
        )
    print(
        f"Wrote {path} (readable by you only: it holds the tokens). Copy it where the homeserver reads it, list it "
        "in its app_service_config_files, and restart the homeserver."
    )
    return 0


async def _run(config: Config) -> int:
    from .engine.runtime import App, FatalError
    from .store import StoreError
    from .web import start_web

    app = App(config)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, app.stop)
    runner = None
    try:
        if config.web is not None:
            try:
                runner = await start_web(app, config.web.host, config.web.port)
            except OSError as e:
                print(
                    f"spacesync: web.listen: cannot listen on {config.web.host}:{config.web.port} ({e.strerror}); "
                    "pick a free port or set web.listen to null",
                    file=sys.stderr,
                )
                return 1
        await app.run()
    except (FatalError, StoreError) as e:
        print(f"spacesync: {e}", file=sys.stderr)
        return 1
    finally:
        if runner is not None:
            await runner.cleanup()
    log.info("stopped")
    return 0


async def _plan(config: Config, *, as_json: bool) -> int:
    from .engine.runtime import App
    from .matrix import ConnectError
    from .matrix.errors import REQUEST_ERRORS
    from .store import StoreError

    app = App(config)
    try:
        await app.start_store()
        saved = await app.store.get(f"access_token:{config.bot.user_id}")
        await app.matrix.connect(saved_token=saved)
        plan = await app.reconciler.plan(refresh=True)
        held = await app.store.journal.by_status(*_held())
    except (ConnectError, StoreError) as e:
        print(f"spacesync: {e}", file=sys.stderr)
        return 1
    except REQUEST_ERRORS as e:
        print(
            f"spacesync: homeserver.url: {config.homeserver.url} failed while reading the Spaces "
            f"({type(e).__name__}: {getattr(e, 'message', None) or e}); check that it is up and try again",
            file=sys.stderr,
        )
        return 1
    finally:
        await app.matrix.close()
        await app.store.stop()
    if as_json:
        data = plan.to_json()
        data["held"] = [{"batch": e.batch, **e.action.to_json()} for e in held]
        print(json.dumps(data, indent=2))
    else:
        print(format_plan(plan, held_count=len(held)))
    return 0


async def _crypto(config: Config, action: str) -> int:
    from .matrix.cross_signing import IdentityError, Vault, request_reset
    from .store import Store, StoreError

    if config.bot.pickle_key is None:
        print("spacesync: bot.pickle_key: not set, so the bot has no encryption and no identity", file=sys.stderr)
        return 2
    store = Store(config.database.url)
    try:
        await store.start()
        if action == "reset-identity":
            await request_reset(store.db, config.bot.user_id)
            print(
                f"The cross-signing identity of {config.bot.user_id} is replaced at the bot's next start: restart "
                "it, then run `spacesync crypto recovery-key` for the new recovery key. Homeservers ask for the "
                "bot's password to replace keys: set bot.password (or bot.password_file) for that start."
            )
            return 0
        vault = Vault(store.db, config.bot.user_id, config.bot.pickle_key)
        key = await vault.get("recovery_key")
        if key is None:
            print(
                "spacesync: no recovery key to show: it was shown once already, or the identity was restored "
                "with bot.recovery_key, or the bot has not created one yet (start it with bot.pickle_key set). "
                "A lost key cannot be shown again: `spacesync crypto reset-identity` makes a new identity.",
                file=sys.stderr,
            )
            return 1
        print(key.decode())
        await vault.delete("recovery_key")
        print(
            "Keep this recovery key with the pickle key (a password manager, a sealed secret): it is not shown "
            "again. bot.recovery_key (or bot.recovery_key_file) restores the bot's identity on a new database.",
            file=sys.stderr,
        )
        return 0
    except IdentityError as e:
        print(f"spacesync: {e}", file=sys.stderr)
        return 1
    except StoreError as e:
        print(f"spacesync: {e}", file=sys.stderr)
        return 1
    finally:
        with contextlib.suppress(Exception):
            await store.db.stop()


def _held():
    from .store import Status

    return (Status.HELD,)


def format_plan(plan: Plan, held_count: int = 0) -> str:
    """The plan as a readable table."""
    lines = [f"{len(plan.managed)} managed rooms, {len(plan.actions)} actions, {len(plan.findings)} warnings"]
    if plan.actions:
        rows = [(a.kind.value, a.room_id, a.user_id or a.state_key or "", a.reason) for a in plan.actions]
        widths = [max(len(r[i]) for r in rows + [("ACTION", "ROOM", "TARGET", "REASON")]) for i in range(3)]
        header = ("ACTION", "ROOM", "TARGET", "REASON")
        for row in [header, *rows]:
            lines.append("  ".join(c.ljust(widths[i]) if i < 3 else c for i, c in enumerate(row)))
    if held_count:
        lines.append(f"{held_count} actions held for confirmation (see the admin room)")
    if plan.findings:
        lines.append("warnings:")
        lines.extend(f"  - {f}" for f in plan.findings)
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
