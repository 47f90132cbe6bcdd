"""The bot as its own process, as deployed: `python -m spacesync -c <config> run`."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import Any


async def spawn_bot(config_path: Path, cwd: Path, **options: Any) -> asyncio.subprocess.Process:
    """Start `spacesync run` with `config_path` in `cwd`; `options` (stdout, stderr, env...) as for
    asyncio.create_subprocess_exec."""
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "spacesync",
        "-c",
        str(config_path),
        "run",
        stdin=asyncio.subprocess.DEVNULL,
        cwd=str(cwd),
        **options,
    )
