"""Replies for the admin room: m.notice bodies in plain text and HTML, long output summarized."""

from __future__ import annotations

import html as _html
import time
from collections.abc import Iterable, Sequence

import attrs

__all__ = [
    "MAX_LINES",
    "Line",
    "Reply",
    "ago",
    "code",
    "compose",
    "esc",
    "line",
    "listing",
    "one_line",
    "plural",
    "timestamp",
]

MAX_LINES = 15
"""Lists longer than this show their first lines and "… N more": never one message per room."""
MAX_CHARS = 20000
"""A hard ceiling on one reply's plain body, whatever the content (far below Matrix's 64 KiB event limit)."""


def esc(value: object) -> str:
    return _html.escape(str(value), quote=True)


def code(value: object) -> str:
    return f"<code>{esc(value)}</code>"


def one_line(text: object, limit: int = 300) -> str:
    """A single line, shortened: for errors and echoed user input."""
    flat = " ".join(str(text).split())
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


@attrs.frozen
class Line:
    """One line of a listing, in plain text and HTML, at a nesting depth (for trees)."""

    text: str
    html: str
    depth: int = 0


def line(text: str, html: str | None = None, depth: int = 0) -> Line:
    return Line(text, esc(text) if html is None else html, depth)


@attrs.frozen
class Reply:
    """A notice body: plain text and the matching HTML."""

    text: str
    html: str

    @classmethod
    def plain(cls, text: str) -> Reply:
        return cls(text, esc(text).replace("\n", "<br>"))

    @classmethod
    def rich(cls, text: str) -> Reply:
        """Text where `backticked` spans are code: quoted in the plain body, <code> in the HTML."""
        parts = text.split("`")
        plain = "".join(p if i % 2 == 0 else f"'{p}'" for i, p in enumerate(parts))
        html = "".join(esc(p) if i % 2 == 0 else code(p) for i, p in enumerate(parts))
        return cls(plain, html.replace("\n", "<br>"))

    @classmethod
    def of(cls, value: Reply | str | None) -> Reply:
        if isinstance(value, Reply):
            return value
        return cls.plain(value or "Done.")

    def clipped(self) -> Reply:
        """Never more than MAX_CHARS; the HTML falls back to the escaped text when clipped."""
        if len(self.text) <= MAX_CHARS and len(self.html) <= 2 * MAX_CHARS:
            return self
        text = self.text[: MAX_CHARS - 40].rstrip() + "\n… (output clipped)"
        return Reply.plain(text)


def _nested_html(lines: Sequence[Line]) -> str:
    """Lines with depths as nested <ul> lists."""
    if not lines:
        return ""
    out = ["<ul>"]
    depth = 0
    for i, item in enumerate(lines):
        target = max(0, min(item.depth, depth + 1))
        if i and target > depth:
            out.append("<ul>")
            depth = target
        elif i:
            out.append("</li>")
            while depth > target:
                out.append("</ul></li>")
                depth -= 1
        out.append(f"<li>{item.html}")
    out.append("</li>")
    while depth > 0:
        out.append("</ul></li>")
        depth -= 1
    out.append("</ul>")
    return "".join(out)


def listing(
    title: Line | str, lines: Sequence[Line], *, limit: int | None = MAX_LINES, empty: str = "", hint: str = ""
) -> Reply:
    """A title and a bulleted list; past `limit` lines, the rest is summarized as "… N more"."""
    head = line(title) if isinstance(title, str) else title
    shown = list(lines if limit is None else lines[:limit])
    more = len(lines) - len(shown)
    text = [head.text]
    html = [f"<p>{head.html}</p>"]
    if not lines and empty:
        text.append(empty)
        html.append(f"<p>{esc(empty)}</p>")
    text.extend(f"{'  ' * item.depth}- {item.text}" for item in shown)
    html.append(_nested_html(shown))
    if more:
        tail = f"… {more} more" + (f" ({hint})" if hint else "")
        text.append(tail)
        rest = _nested_html(list(lines[len(shown) :]))
        if len(rest) <= MAX_CHARS:  # the full detail, folded: clients that know <details> show it on demand
            html.append(f"<details><summary>{esc(tail)}</summary>{rest}</details>")
        else:
            html.append(f"<p>{esc(tail)}</p>")
    return Reply("\n".join(text), "".join(html))


def compose(parts: Iterable[Reply | str | None]) -> Reply:
    """Sections one after the other (a blank line apart in plain text)."""
    replies = [Reply.of(p) if not isinstance(p, Reply) else p for p in parts if p]
    return Reply(
        "\n\n".join(r.text for r in replies),
        "".join(r.html if r.html.startswith(("<p>", "<ul>", "<pre>")) else f"<p>{r.html}</p>" for r in replies),
    )


def ago(ts: float | None, now: float | None = None) -> str:
    """'12 s ago', '3 min ago', '2 h ago' or 'never'."""
    if ts is None:
        return "never"
    seconds = max(0.0, (time.time() if now is None else now) - ts)
    if seconds < 90:
        return f"{seconds:.0f} s ago"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min ago"
    if seconds < 48 * 3600:
        return f"{seconds / 3600:.1f} h ago"
    return f"{seconds / 86400:.1f} days ago"


def plural(n: int, word: str, many: str | None = None) -> str:
    """'1 warning', '2 warnings'."""
    return f"{n} {word if n == 1 else (many or word + 's')}"


def timestamp(ms: int) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(ms / 1000)) + " UTC"


def duration(seconds: float) -> str:
    """'45 s', '2 min 30 s' (to 10 s under ten minutes), '13 min', '2 h 5 min'."""
    if seconds < 60:
        return f"{max(1, round(seconds))} s"
    if seconds < 600:
        minutes, rest = divmod(round(seconds / 10) * 10, 60)
        return f"{minutes} min {rest} s" if rest else f"{minutes} min"
    minutes = round(seconds / 60)
    return f"{minutes} min" if minutes < 60 else f"{minutes // 60} h {minutes % 60} min"


def held_reply(batch: object, what_t: str, what_h: str, limit: int) -> Reply:
    """The answer to a command whose batch is over the Space's limit and held: what it is and how to go on."""
    return Reply(
        f"⚠ Held batch {batch}: {what_t}, over the limit of {limit}. Review with !spacesync batch {batch}, then "
        f"!spacesync confirm {batch} or !spacesync cancel {batch}.",
        f"<p>⚠ Held batch {code(str(batch))}: {what_h}, over the limit of {limit}. Review with "
        f"{code(f'!spacesync batch {batch}')}, then {code(f'!spacesync confirm {batch}')} or "
        f"{code(f'!spacesync cancel {batch}')}.</p>",
    )
