"""From a message to a command: the prefix, pills, reply fallbacks, quoting, and typed arguments."""

from __future__ import annotations

import re
import shlex
from collections.abc import Mapping
from html.parser import HTMLParser
from typing import Any

import attrs

from ..model import UserID
from ..refs import RefError, RoomRef, parse_room_ref, parse_user_ref, refs_in_html

__all__ = [
    "MAX_COMMAND_CHARS",
    "PREFIXES",
    "ParseError",
    "ParsedCommand",
    "batch_arg",
    "command_text",
    "count_arg",
    "duration_arg",
    "has_prefix",
    "html_to_text",
    "is_edit",
    "parse_command",
    "room_arg",
    "tokenize",
    "user_arg",
]

PREFIXES = ("!spacesync", "!ss")
"""The command prefix and its short alias; matched case-insensitively as the first word."""
MAX_COMMAND_CHARS = 2000
MAX_TOKENS = 32

_QUOTES = str.maketrans({"\u201c": '"', "\u201d": '"', "\u201e": '"', "\u00ab": '"', "\u00bb": '"'})
_BATCH_RE = re.compile(r"[0-9A-Za-z_-]{1,64}")
_BLOCK_TAGS = frozenset({"p", "div", "li", "tr", "h1", "h2", "h3", "h4", "h5", "h6", "blockquote", "pre"})


class ParseError(ValueError):
    """The message is addressed to the bot but cannot be read; the message is one line for the issuer."""


@attrs.frozen
class ParsedCommand:
    prefix: str
    """The prefix as typed, lowercased (`!spacesync` or `!ss`)."""
    name: str
    """The command name, lowercased; empty when the message is the prefix alone."""
    args: tuple[str, ...] = ()


def is_edit(content: Mapping[str, Any]) -> bool:
    """An edit (m.replace) of an earlier message: commands are never taken from edits."""
    relates = content.get("m.relates_to")
    return isinstance(relates, Mapping) and relates.get("rel_type") == "m.replace"


class _TextExtractor(HTMLParser):
    """Text of an HTML body: pills become the ids they point at, rich-reply quotes are dropped."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self._skip = 0
        self._in_ref_link = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "mx-reply":
            self._skip += 1
            return
        if self._skip:
            return
        if tag == "br" or tag in _BLOCK_TAGS:
            self.parts.append("\n")
        elif tag == "a":
            ident = _pill_target(self.get_starttag_text() or "")
            if ident is not None:
                self.parts.append(f" {ident} ")
                self._in_ref_link += 1
            elif self._in_ref_link:
                self._in_ref_link += 1

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "br" and not self._skip:
            self.parts.append("\n")

    def handle_endtag(self, tag: str) -> None:
        if tag == "mx-reply":
            self._skip = max(0, self._skip - 1)
        elif self._skip:
            return
        elif tag == "a" and self._in_ref_link:
            self._in_ref_link -= 1
        elif tag in _BLOCK_TAGS:
            self.parts.append("\n")

    def handle_data(self, data: str) -> None:
        if not self._skip and not self._in_ref_link:
            self.parts.append(data)


def _pill_target(start_tag: str) -> str | None:
    """The user or room id (or alias) a link points at, when it is a Matrix link; else None."""
    hrefs = refs_in_html(start_tag)
    if len(hrefs) != 1:
        return None
    href = hrefs[0]
    if not href.lower().startswith(("https://matrix.to/", "http://matrix.to/", "matrix:")):
        return None
    try:
        return str(parse_user_ref(href))
    except RefError:
        pass
    try:
        return str(parse_room_ref(href))
    except RefError:
        return None


def html_to_text(html: str) -> str:
    """The text of a formatted body, with pills replaced by their ids and <mx-reply> removed."""
    extractor = _TextExtractor()
    extractor.feed(html)
    extractor.close()
    return "".join(extractor.parts)


def _strip_reply_fallback(body: str) -> str:
    """Drop the "> <@user> quoted text" lines clients put before a reply's own text."""
    lines = body.split("\n")
    if not lines or not lines[0].startswith("> "):
        return body
    i = 0
    while i < len(lines) and lines[i].startswith(">"):
        i += 1
    return "\n".join(lines[i:]).lstrip("\n")


def has_prefix(text: str) -> bool:
    first = text.lstrip().split(None, 1)
    return bool(first) and first[0].lower() in PREFIXES


def command_text(content: Mapping[str, Any]) -> str | None:
    """The command text a message carries, or None when it is not addressed to the bot.

    The HTML body is preferred when it has the prefix: there, pills carry the ids while the plain body
    only shows display names.
    """
    body = content.get("body")
    if not isinstance(body, str):
        return None
    formatted = content.get("formatted_body")
    if content.get("format") == "org.matrix.custom.html" and isinstance(formatted, str) and formatted.strip():
        try:
            text = html_to_text(formatted[: MAX_COMMAND_CHARS * 4]).strip()
        except Exception:  # HTMLParser is lenient, but never let a body stop the command layer
            text = ""
        if has_prefix(text):
            return text
    text = _strip_reply_fallback(body).strip()
    return text if has_prefix(text) else None


def tokenize(text: str) -> list[str]:
    """Split on whitespace with shell-like quoting ("two words", 'x'); ParseError on broken quoting."""
    lexer = shlex.shlex(text.translate(_QUOTES), posix=True)
    lexer.whitespace_split = True
    lexer.whitespace += "\u00a0\u2000\u2001\u2002\u2003\u2009\u202f\u3000"
    lexer.commenters = ""
    try:
        tokens = list(lexer)
    except ValueError as e:
        raise ParseError(f"cannot read the command: {e} (close the quote, or escape it with \\)") from None
    return tokens


def parse_command(text: str) -> ParsedCommand | None:
    """The prefix, command name and arguments; None when `text` is not a command for the bot."""
    if not has_prefix(text):
        return None
    if len(text) > MAX_COMMAND_CHARS:
        raise ParseError(f"the command is too long ({len(text)} characters; at most {MAX_COMMAND_CHARS})")
    tokens = tokenize(text.strip())
    if not tokens:
        return None
    prefix = tokens[0].lower()
    if prefix not in PREFIXES:
        return None
    if len(tokens) > MAX_TOKENS + 2:
        raise ParseError(f"too many arguments ({len(tokens) - 2}; at most {MAX_TOKENS})")
    if len(tokens) == 1:
        return ParsedCommand(prefix, "")
    return ParsedCommand(prefix, tokens[1].lower(), tuple(tokens[2:]))


# region typed arguments: each raises RefError/ValueError with a message naming the bad input


def user_arg(text: str) -> UserID:
    """A user id, matrix:u/ URI, matrix.to link or pill."""
    return parse_user_ref(text)


def room_arg(text: str) -> RoomRef:
    """A room id, alias, matrix: URI, matrix.to link or pill."""
    return parse_room_ref(text)


def count_arg(text: str, *, low: int = 1, high: int = 500) -> int:
    if not re.fullmatch(r"\d{1,6}", text.strip()):
        raise ValueError(f"{_show(text)} is not a number")
    value = int(text)
    if not low <= value <= high:
        raise ValueError(f"{value} is out of range: use {low} to {high}")
    return value


_DURATION_RE = re.compile(r"(\d{1,6})\s*(s|sec|m|min|h|d)?", re.IGNORECASE)
_DURATION_UNITS = {"s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600, "d": 86400}
MAX_DURATION_S = 30 * 86400


def duration_arg(text: str) -> float:
    """A duration such as 90s, 30m, 2h or 1d (a bare number is minutes), in seconds: at most 30 days."""
    match = _DURATION_RE.fullmatch(text.strip())
    if match is None:
        raise ValueError(f"{_show(text)} is not a duration: use e.g. 30m, 2h or 1d")
    seconds = int(match.group(1)) * _DURATION_UNITS[(match.group(2) or "m").lower()]
    if not 0 < seconds <= MAX_DURATION_S:
        raise ValueError(f"{_show(text)} is out of range: use more than 0 and at most 30d")
    return float(seconds)


def batch_arg(text: str) -> str:
    """A batch id as the notices show it (eight hex digits), or the start of one."""
    cleaned = text.strip().strip("`'\"")
    if not _BATCH_RE.fullmatch(cleaned):
        raise ValueError(f"{_show(text)} is not a batch id: use the id from the bot's notice, e.g. 3fa9c1d0")
    return cleaned.lower()


def _show(text: str, limit: int = 60) -> str:
    return repr(text if len(text) <= limit else text[: limit - 1] + "…")


# endregion
