"""The command parser: prefixes, quoting, pills, reply fallbacks, did-you-mean and usage errors."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from spacesync.commands import REGISTRY, CommandHandler
from spacesync.commands.format import MAX_LINES, Reply, line, listing
from spacesync.commands.parser import (
    ParseError,
    batch_arg,
    command_text,
    count_arg,
    html_to_text,
    is_edit,
    parse_command,
    tokenize,
    user_arg,
)
from spacesync.commands.registry import UsageError, expect, subcommand
from spacesync.refs import RefError


def html_message(body: str, html: str) -> dict:
    return {"msgtype": "m.text", "body": body, "format": "org.matrix.custom.html", "formatted_body": html}


# region prefixes


@pytest.mark.parametrize("text", ["!spacesync status", "!ss status", "!SpaceSync status", "  !SS   status  "])
def test_prefixes(text):
    parsed = parse_command(text)
    assert parsed is not None
    assert parsed.name == "status"
    assert parsed.args == ()


@pytest.mark.parametrize(
    "text",
    [
        "status",
        "!ssh status",
        "!spacesyncstatus",
        "hello !spacesync status",
        "",
        "   ",
        "!s status",
        "spacesync status",
    ],
)
def test_not_a_command(text):
    assert parse_command(text) is None


def test_prefix_alone_has_no_name():
    parsed = parse_command("!spacesync")
    assert parsed is not None and parsed.name == "" and parsed.args == ()


def test_command_name_is_lowercased_arguments_are_not():
    parsed = parse_command("!ss EXEMPT Add @Alice:HS.test")
    assert parsed is not None
    assert parsed.name == "exempt"
    assert parsed.args == ("Add", "@Alice:HS.test")


# endregion


# region quoting


def test_quoting_keeps_words_together():
    assert tokenize("!ss audit \"two words\" 'and three here'") == ["!ss", "audit", "two words", "and three here"]


def test_typographic_quotes_are_quotes():
    assert tokenize("!ss x \u201cone two\u201d") == ["!ss", "x", "one two"]


def test_room_ids_and_aliases_are_not_comments():
    assert tokenize("!ss tree #space:hs.test !room:hs.test") == ["!ss", "tree", "#space:hs.test", "!room:hs.test"]


def test_non_breaking_spaces_separate():
    assert tokenize("!ss\u00a0status") == ["!ss", "status"]


@pytest.mark.parametrize("text", ['!ss exempt add "@a:b', "!ss exempt add '@a:b"])
def test_unbalanced_quotes_are_a_clear_error(text):
    with pytest.raises(ParseError, match="quot"):
        parse_command(text)


def test_too_long():
    with pytest.raises(ParseError, match="too long"):
        parse_command("!ss status " + "x" * 5000)


def test_too_many_arguments():
    with pytest.raises(ParseError, match="too many arguments"):
        parse_command("!ss status " + " a" * 100)


# endregion


# region bodies: pills, replies, edits


def test_pill_in_html_gives_the_user_id():
    content = html_message(
        "!ss exempt add Alice Smith", '!ss exempt add <a href="https://matrix.to/#/@alice:hs.test">Alice Smith</a>'
    )
    text = command_text(content)
    assert text is not None
    parsed = parse_command(text)
    assert parsed is not None and parsed.args == ("add", "@alice:hs.test")


def test_percent_encoded_room_pill_and_matrix_uri():
    html = (
        '!ss tree <a href="https://matrix.to/#/%23space%3Ahs.test?via=hs.test">#space</a> '
        '<a href="matrix:u/bob:hs.test">Bob</a>'
    )
    parsed = parse_command(command_text(html_message("!ss tree #space Bob", html)) or "")
    assert parsed is not None and parsed.args == ("#space:hs.test", "@bob:hs.test")


def test_ordinary_links_keep_their_text():
    html = '!ss audit <a href="https://example.org/x">5</a>'
    parsed = parse_command(command_text(html_message("!ss audit 5", html)) or "")
    assert parsed is not None and parsed.args == ("5",)


def test_rich_reply_quote_is_ignored():
    html = (
        '<mx-reply><blockquote><a href="https://matrix.to/#/!r:hs/$e">In reply to</a> '
        "!ss pause</blockquote></mx-reply>!ss status"
    )
    body = "> <@bot:hs> !ss pause\n\n!ss status"
    for content in (html_message(body, html), {"msgtype": "m.text", "body": body}):
        parsed = parse_command(command_text(content) or "")
        assert parsed is not None and parsed.name == "status"


def test_html_without_prefix_falls_back_to_the_body():
    content = html_message("!ss status", "<b>something else</b>")
    assert command_text(content) == "!ss status"


def test_html_line_breaks_and_entities():
    assert html_to_text("<p>!ss&nbsp;audit</p><br/>5").split() == ["!ss", "audit", "5"]


def test_not_addressed_to_the_bot():
    assert command_text({"msgtype": "m.text", "body": "good morning"}) is None
    assert command_text({"msgtype": "m.text"}) is None
    assert command_text({"msgtype": "m.text", "body": 5}) is None


def test_edits_are_recognised():
    assert is_edit({"m.relates_to": {"rel_type": "m.replace", "event_id": "$x"}})
    assert not is_edit({"m.relates_to": {"m.in_reply_to": {"event_id": "$x"}}})
    assert not is_edit({})


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=300))
def test_parsing_never_fails_unexpectedly(text):
    for candidate in (text, "!ss " + text, "!spacesync " + text):
        try:
            parse_command(candidate)
        except ParseError:
            pass
        command_text({"body": candidate, "format": "org.matrix.custom.html", "formatted_body": candidate})


# endregion


# region arguments


def test_user_arguments_name_the_bad_id():
    assert user_arg("@alice:hs.test") == "@alice:hs.test"
    assert user_arg("https://matrix.to/#/@alice:hs.test") == "@alice:hs.test"
    with pytest.raises(RefError, match=r"'@alice'.*missing the :server part"):
        user_arg("@alice")
    with pytest.raises(RefError, match="'!room:hs' is not a user"):
        user_arg("!room:hs")


def test_count_and_batch_arguments():
    assert count_arg("5") == 5
    with pytest.raises(ValueError, match="not a number"):
        count_arg("five")
    with pytest.raises(ValueError, match="out of range"):
        count_arg("0")
    assert batch_arg("3FA9C1") == "3fa9c1"
    assert batch_arg("`3fa9c1`") == "3fa9c1"
    with pytest.raises(ValueError, match="is not a batch id"):
        batch_arg("3fa 9c1;drop")


# endregion


# region registry: did-you-mean, usage, help


def test_did_you_mean():
    assert REGISTRY.unknown("statsu") == "Unknown command 'statsu'. Did you mean 'status'?"
    assert REGISTRY.suggest("exmept") == "exempt"
    assert REGISTRY.suggest("confrim") == "confirm"
    assert REGISTRY.suggest("zzzzzz") is None
    assert "help" in REGISTRY.unknown("zzzzzz")


def test_every_command_has_usage_and_help():
    expected = {
        "help",
        "status",
        "tree",
        "plan",
        "sync",
        "audit",
        "whois",
        "spaces",
        "rooms",
        "exempt",
        "pause",
        "resume",
        "confirm",
        "cancel",
        "undo",
        "joinrules",
        "powerlevels",
    }
    assert expected <= set(REGISTRY.names())
    for cmd in REGISTRY:
        assert cmd.usage_line.startswith(f"!spacesync {cmd.name}")
        assert cmd.summary and cmd.help


def test_help_lists_everything_and_explains_one():
    everything = REGISTRY.help()
    for name in REGISTRY.names():
        assert f"- {name}" in everything.text
    one = REGISTRY.help("undo")
    assert one.text.startswith("Usage: !spacesync undo <batch>")
    assert "<code>" in one.html


def test_subcommands_and_argument_counts():
    assert subcommand(["ADD", "@a:b"], ("add", "remove")) == ("add", ["@a:b"])
    with pytest.raises(UsageError, match="Did you mean 'remove'"):
        subcommand(["remvoe"], ("add", "remove"))
    with pytest.raises(UsageError, match="Choose one of add, remove"):
        subcommand([], ("add", "remove"))
    expect(["a"], 1)
    with pytest.raises(UsageError, match="Missing argument"):
        expect([], 1)
    with pytest.raises(UsageError, match="Unexpected argument 'b c'"):
        expect(["a", "b", "c"], 1)


class _NoApp:
    """Commands that fail before touching the app: usage and syntax errors."""


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("!ss statsu", "Unknown command 'statsu'. Did you mean 'status'?"),
        ("!ss status now", "Unexpected argument 'now'. Usage: !spacesync status"),
        ("!ss exempt", "Choose one of add, remove, list. Usage: !spacesync exempt add|remove|list [@user]"),
        ("!ss exempt add", "Missing argument. Usage: !spacesync exempt add|remove|list [@user]"),
        ("!ss exempt add @bob", "'@bob' is not a user: missing the :server part"),
        ("!ss whois bob", "'bob' is not a user"),
        ("!ss confirm", "Missing argument. Usage: !spacesync confirm <batch>"),
        ("!ss confirm not;a;batch", "is not a batch id"),
        ("!ss audit 0", "out of range"),
        ("!ss tree @bob:hs", "'@bob:hs' is not a room: that is a user ID"),
        ('!ss exempt add "@bob', "cannot read the command"),
    ],
)
async def test_bad_input_replies(text, expected):
    handler = CommandHandler(_NoApp())  # type: ignore[arg-type]
    reply = await handler.run("!admin:hs", "$e", "@admin:hs", text)
    assert expected in reply.text


async def test_help_replies():
    handler = CommandHandler(_NoApp())  # type: ignore[arg-type]
    assert "spacesync commands" in (await handler.run("!a:hs", "$e", "@x:hs", "!ss")).text
    assert (await handler.run("!a:hs", "$e", "@x:hs", "!ss help confirm")).text.startswith("Usage: !spacesync confirm")
    assert "Did you mean 'confirm'" in (await handler.run("!a:hs", "$e", "@x:hs", "!ss help confrim")).text


async def test_a_crashing_handler_is_one_line():
    handler = CommandHandler(_NoApp())  # type: ignore[arg-type]
    reply = await handler.run("!a:hs", "$e", "@x:hs", "!ss status")
    assert reply.text.startswith("⚠ The command 'status' failed: AttributeError")
    assert "\n" not in reply.text


# endregion


# region formatting


def test_long_lists_are_summarized():
    reply = listing("Rooms", [line(f"room {i}") for i in range(40)])
    assert reply.text.count("\n- ") == MAX_LINES
    assert reply.text.endswith(f"… {40 - MAX_LINES} more")
    shown, folded = reply.html.split("<details>")
    assert shown.count("<li>") == MAX_LINES
    # the full detail stays behind the summary, folded
    assert folded.startswith(f"<summary>… {40 - MAX_LINES} more</summary>")
    assert folded.count("<li>") == 40 - MAX_LINES and "room 39" in folded


def test_nested_html_is_balanced():
    lines = [line("a", depth=0), line("b", depth=1), line("c", depth=2), line("d", depth=0), line("e", depth=1)]
    html = listing("t", lines, limit=None).html
    assert html.count("<ul>") == html.count("</ul>") == 4
    assert html.count("<li>") == html.count("</li>") == 5


def test_plain_reply_escapes_html():
    assert Reply.plain("<b>&\nx").html == "&lt;b&gt;&amp;<br>x"


# endregion


def test_whois_escapes_who_put_a_user_out():
    from spacesync.commands.status import put_out_by
    from spacesync.model import Membership

    text, html = put_out_by(Membership.BAN, '@<b>&"x:hs.test', "@bot:hs.test", False)
    assert text == 'ban by @<b>&"x:hs.test'
    assert html == "ban by @&lt;b&gt;&amp;&quot;x:hs.test"
    text, html = put_out_by(Membership.BAN, "@bot:hs.test", "@bot:hs.test", True)
    assert text.startswith("ban by spacesync (its own ban") and html == text


def test_durations_read_with_their_unit_and_refuse_the_rest() -> None:
    from spacesync.commands.parser import duration_arg

    assert duration_arg("90s") == 90 and duration_arg("30m") == 1800 and duration_arg("2h") == 7200
    assert duration_arg("1d") == 86400 and duration_arg("15") == 900 and duration_arg(" 2H ") == 7200
    for bad in ("", "2 weeks", "-1h", "0h", "31d", "h", "1.5h"):
        with pytest.raises(ValueError) as info:
            duration_arg(bad)
        assert "duration" in str(info.value) or "out of range" in str(info.value)


async def test_people_commands_read_the_user_a_count_or_a_duration_and_the_reason() -> None:
    import time

    from spacesync.commands.people import _parse
    from spacesync.commands.registry import CommandError, UsageError

    ctx = None  # only --space asks the app (to resolve the room)
    req = await _parse(ctx, ["https://matrix.to/#/@spam:x.org", "5", "spam", "wave"], counted=True)  # type: ignore[arg-type]
    assert (req.user, req.last, req.since_ms, req.reason) == ("@spam:x.org", 5, None, "spam wave")
    req = await _parse(ctx, ["@spam:x.org", "--since", "2h"], counted=True)  # type: ignore[arg-type]
    assert req.last is None and abs(req.since_ms - (time.time() - 7200) * 1000) < 5000
    # A number that is not right after the user is part of the reason; for ban it always is.
    req = await _parse(ctx, ["@spam:x.org", "raid", "2"], counted=True)  # type: ignore[arg-type]
    assert req.last is None and req.reason == "raid 2"
    assert (await _parse(ctx, ["@spam:x.org", "3", "raids"])).reason == "3 raids"  # type: ignore[arg-type]
    for args, counted, error in (
        (["@spam:x.org", "5", "--since", "2h"], True, UsageError),
        (["@spam:x.org", "--since", "2h"], False, UsageError),
        (["@spam:x.org", "--bogus"], True, UsageError),
        (["@spam:x.org", "--since"], True, UsageError),
        (["@spam:x.org", "--since", "soon"], True, CommandError),
        (["@spam:x.org", "0"], True, CommandError),
        (["spam"], False, CommandError),
        ([], False, UsageError),
    ):
        with pytest.raises(error):
            await _parse(ctx, args, counted=counted)  # type: ignore[arg-type]
