"""Keeping credentials out of everything fgplugin shows: messages, reports, reprs and log lines.

One rule for URLs, whatever their shape (well-formed or not, with or without a scheme, inside a
longer text): the user info, i.e. everything between ``//`` (or the start) and the LAST ``@``, is
secret. Parsing cannot be trusted for this: a password with an unencoded ``/``, ``?``, ``#``, ``[``
or ``@`` moves ``urlsplit``'s idea of where the host starts, so the rule is positional instead.

- ``redact_url(url)``: a URL fit to show (no user info, no query string or fragment); never raises.
- ``scrub(text, secrets)``: ``text`` with the given secret strings (and their percent-encoded and
  decoded forms) replaced by ``***``, the user info of every URL-like word removed, and the values
  of ``password=``/``token=``/``api_key=``-style parameters masked. The last line of defence for
  whole messages (``cli/common.py`` passes every error through it).
- ``url_secrets(url)``: the secret strings a URL carries (password, user info, secret parameters),
  so a caller can scrub them from text that may hold them in a mangled form.
- ``ScrubFilter``: a logging filter that scrubs log records.
"""

from __future__ import annotations

import logging
import re
from typing import Iterable
from urllib.parse import quote, unquote

MASK = "***"
MIN_LITERAL = 4  # shorter secrets are only removed structurally: replacing "ab" everywhere mangles text
_SECRET_WORDS = r"(?:password|passwd|pwd|secret|token|api[_-]?key|apikey|credential|signature|auth)"
# key=value where the key names a secret (query strings, "password=..." in free text)
_PARAM = re.compile(rf"(?i)((?:^|(?<=[?&;\s,({{\[\"'])))([\w.-]*{_SECRET_WORDS}[\w.-]*=)([^&;#\s'\"<>,)}}\]]*)")
# "password": "value" / password: 'value' (JSON, TOML, repr of dicts)
_QUOTED = re.compile(rf"(?i)([\"']?[\w.-]*{_SECRET_WORDS}[\w.-]*[\"']?\s*[:=]\s*)([\"'])([^\"']*)([\"'])")
# Authorization: Basic dXNlcjpwYXNz / Bearer ... / ApiKey ...
_AUTH_HEADER = re.compile(r"(?i)(authorization[\"']?\s*[:=]\s*[\"']?(?:basic|bearer|apikey)?\s*)([^\s\"',}]+)")
# leading quotes/brackets and a store kind, kept when the user info of a word without "//" is dropped
_LEAD = re.compile(r"[\"'(<\[{]*(?:(?:opensearch|embedded):)?")
_WORD_WITH_AT = re.compile(r"\S*@\S*")
# "http://admin:secret" (the host forgotten): what stands in the port's place is no number, maybe a password
_PORT_CHAR = r"[^\s/?#@'\"<>()\[\]{},;:]"
_BAD_PORT = re.compile(rf"(//[^\s/?#@\[\]:'\"<>]*):({_PORT_CHAR}*(?!\d){_PORT_CHAR}{_PORT_CHAR}*)")


def _userinfo_span(s: str) -> tuple[int, int] | None:
    """(start, end) of the user info in ``s`` (end: the last '@', included), or None."""
    at = s.rfind("@")
    if at < 0:
        return None
    slashes = s.find("//")
    if 0 <= slashes < at:
        return slashes + 2, at + 1
    start = _LEAD.match(s).end()
    user, colon, _ = s[start:at].partition(":")
    # "user:pass@host" without a scheme; "name@2x.png" or "/data/a@b" (no colon, or a path) are not
    if colon and not re.search(r"[/\\\s]", user):
        return start, at + 1
    return None


def _strip_userinfo(s: str) -> str:
    span = _userinfo_span(s)
    return s if span is None else s[:span[0]] + s[span[1]:]


def _mask_params(s: str) -> str:
    s = _BAD_PORT.sub(lambda m: f"{m.group(1)}:{MASK}", s)
    s = _PARAM.sub(lambda m: m.group(1) + m.group(2) + (MASK if m.group(3) else ""), s)
    s = _QUOTED.sub(lambda m: m.group(1) + m.group(2) + MASK + m.group(4), s)
    return _AUTH_HEADER.sub(lambda m: m.group(1) + MASK, s)


def redact_url(url: object) -> str:
    """``url`` fit to show a user: no user info, and for a ``scheme://`` URL no query or fragment (they may
    carry tokens; nobody needs them in a message). Works on malformed URLs too; never raises."""
    s = _strip_userinfo(str(url).strip())
    sep = s.find("://")
    if sep >= 0:
        cut = re.search(r"[?#]", s[sep + 3:])
        if cut:
            s = s[:sep + 3 + cut.start()]
    return _mask_params(s)


def url_secrets(url: object) -> list[str]:
    """The secrets ``url`` carries: the password and the whole user info (raw and percent-decoded),
    and the values of secret-named parameters. Empty for a URL without any."""
    s = str(url).strip()
    out: list[str] = []
    span = _userinfo_span(s)
    if span is not None:
        info = s[span[0]:span[1] - 1]
        _, colon, password = info.partition(":")
        out += [info, password] if colon else []  # a user name alone is no secret
    out += [m.group(3) for m in _PARAM.finditer(s) if m.group(3)]
    return _variants(out)


def _variants(secrets: Iterable[str]) -> list[str]:
    out: list[str] = []
    for s in secrets:
        if not s:
            continue
        for v in (s, unquote(s), quote(s, safe=""), quote(s, safe=":@"), unquote(s).strip()):
            if v and v not in out:
                out.append(v)
    return out


def scrub(text: object, secrets: Iterable[str] = ()) -> str:
    """``text`` with every secret (and its percent-encoded and decoded forms) replaced by ``***``, the
    user info of every URL-like word removed and secret-named parameters masked."""
    out = str(text)
    for s in sorted(_variants(secrets), key=len, reverse=True):
        if len(s) >= MIN_LITERAL:
            out = out.replace(s, MASK)
    out = _WORD_WITH_AT.sub(lambda m: _strip_userinfo(m.group(0)), out)
    return _mask_params(out)


class ScrubFilter(logging.Filter):
    """Scrubs each record's formatted message (attach it to a logger or a handler)."""

    def __init__(self, secrets: Iterable[str] = ()):
        super().__init__()
        self.secrets = list(secrets)

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            msg = record.getMessage()
        except Exception:  # noqa: BLE001 - a bad format string is the logging module's to report
            return True
        clean = scrub(msg, self.secrets)
        if clean != msg:
            record.msg, record.args = clean, None
        return True
