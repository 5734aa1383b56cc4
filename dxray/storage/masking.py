"""Secrets masked as ``***`` wherever dxray writes text: error lines, logs, error rows, manifests, reports.

A secret is recognised three ways:

- by name: the value of a mapping key, a ``key=value`` pair, a quoted ``'key': 'value'`` pair or a header
  whose name names a credential in any common spelling (``token``, ``hf_key``, ``apiKey``, ``X-Api-Key``,
  ``Authorization``, ``pwd``, ``private_key``, ``X-Amz-*``, ...: :func:`secret_name`);
- by place: a URI's userinfo (everything up to the last ``@`` before its query, so a secret key holding
  ``/`` is masked whole) and every query value of a URI except a few harmless ones (``region``,
  ``versionId``, ...): a presigned or tokened URL may call its credential anything (``sig``, ``st``, ``k``);
- by value: the values of the secret environment variables (:data:`SECRET_VARS`), and every secret value
  the config held (:func:`remember_secrets`, called when a config is built), so that a library echoing
  one out of its context (pyarrow's ``got a URI: 'KEY:SECRET@bucket/x'``) is masked too.
"""

from __future__ import annotations

import os
import re
from typing import Any
from urllib.parse import unquote

MASK = "***"
# Values of these environment variables are secrets wherever they turn up (a library may echo one).
SECRET_VARS = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "HF_TOKEN",
               "HUGGING_FACE_HUB_TOKEN", "AWS_ACCESS_KEY_ID")

# Words of a name (split at separators and camelCase) that make it a credential's name.
_WORDS = frozenset({"token", "secret", "secrets", "password", "passwords", "passwd", "pwd", "pass", "passphrase",
                    "credential", "credentials", "creds", "auth", "authorization", "authentication", "bearer",
                    "signature", "sig", "session", "cookie", "private", "key", "keys", "apikey", "otp", "pin"})
_SUFFIXES = ("token", "secret", "password", "passwd", "key", "keys", "auth", "cookie", "creds")  # hftoken, oauth
_PREFIXES = ("passw", "secret", "credential", "authoriz", "authent", "apikey", "privatekey")
_CAMEL = re.compile(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])")
# Query parameters that never carry a credential, kept readable in messages.
_HARMLESS_PARAMS = frozenset({"region", "versionid", "version", "revision", "ref", "branch", "format", "prefix",
                              "delimiter", "encodingtype", "listtype"})

_URI = re.compile(r"\b(?P<scheme>[a-z][a-z0-9+.-]*://)(?P<rest>[^\s'\"<>`]*)", re.I)
# name=value anywhere (?token=..., password=..., --api-key=...); the value ends at a separator or a quote.
# The key starts only where a run of name characters starts: otherwise a long run with no '=' is tried from every
# position, each backtracking through the rest of it (quadratic: 1.7 s for one 10,000-character string).
_PAIR = re.compile(r"(?<![\w.\-])(?P<key>[\w.\-]+)(?P<eq>\s*=\s*)(?P<value>[^\s&;,'\"<>)\]}]+?)(?=[.:]*(?:[\s&;,'\"<>)\]}]|$))")
# 'name': 'value' / "name": "value" (a dict's repr, JSON), the value a quoted string.
_QUOTED = re.compile(r"(?P<q>['\"])(?P<key>[^'\"\s]{1,100})(?P=q)(?P<sep>\s*[:=]\s*)(?P<q2>['\"])"
                     r"(?P<value>(?:\\.|(?!(?P=q2)).)*)(?P=q2)")
# A header line: 'Authorization: Bearer xyz', 'X-Api-Key: xyz', 'Cookie: a=b'.
_HEADER = re.compile(r"(?<![\w'\"-])(?P<key>(?:proxy-)?authorization|cookie|x-[\w-]+|[\w-]*api-?key|private-token)"
                     r"(?P<sep>\s*:\s*)(?P<value>(?:(?:bearer|basic|token|digest|negotiate|aws4-hmac-sha256)\s+)?"
                     r"[^\s,'\"}\]]+)", re.I)
_BEARER = re.compile(r"\b(?P<key>bearer)(?P<sep>\s+)(?P<value>[\w\-.~+/%]{8,}=*)", re.I)

_REMEMBERED: set[str] = set()
MIN_REMEMBERED = 6  # a config's shorter values ('user', 'admin') are masked in their place only, not everywhere
_PLACEHOLDERS = frozenset({"none", "null", "true", "false", "auto", "default", "***"})


def secret_name(name: object) -> bool:
    """True when ``name`` (a mapping key, a query parameter, a header) names a credential: ``token``,
    ``hf_token``, ``apiKey``, ``X-Api-Key``, ``auth``, ``pwd``, ``private_key``, ``X-Amz-Signature``...;
    not ``n_tokens``, ``tokenizer`` or ``keywords``."""
    words = [w.lower() for w in re.split(r"[^A-Za-z0-9]+", _CAMEL.sub("_", str(name))) if w]
    if words[:2] == ["x", "amz"]:
        return True
    return any(w in _WORDS or w.endswith(_SUFFIXES) or w.startswith(_PREFIXES) for w in words)


def _harmless(param: str) -> bool:
    return re.sub(r"[-_]", "", param.lower()) in _HARMLESS_PARAMS


def _split_uri(rest: str) -> tuple[str, str, str]:
    """(authority and path, '?query' or '', '#fragment' or '') of what follows ``scheme://``."""
    head, hash_, fragment = rest.partition("#")
    head, q, query = head.partition("?")
    return head, q + query, hash_ + fragment


def _uri_secrets(rest: str) -> tuple[str, list[str]]:
    """``rest`` (what follows ``scheme://``) with its userinfo and query values masked, and the values masked."""
    head, query, fragment = _split_uri(rest)
    found = []
    if "@" in head:  # up to the LAST '@': a secret key may hold '/', '+', '=', '%' and even '@'
        userinfo, _, host = head.rpartition("@")
        found += [userinfo, *userinfo.split(":", 1)]
        head = f"{MASK}@{host}"
    if query:
        def mask(m: re.Match) -> str:
            value, tail = re.fullmatch(r"(.*?)([.,:;)\]]*)", m["value"]).groups()
            if _harmless(m["key"]) or not value:
                return m[0]
            found.append(value)
            return f"{m['sep']}{m['key']}={MASK}{tail}"

        query = re.sub(r"(?P<sep>[?&;])(?P<key>[^=&;#?]*)=(?P<value>[^&;#]*)", mask, query)
    return head + query + fragment, found


def _by_name(m: re.Match) -> str:
    """The match with its ``value`` group masked when its ``key`` group names a credential."""
    if not secret_name(m["key"]) or m["value"].startswith(MASK):
        return m[0]
    start, end = m.start("value") - m.start(), m.end("value") - m.start()
    return m[0][:start] + MASK + m[0][end:]


def _masked_uris(text: str) -> str:
    return _URI.sub(lambda m: m["scheme"] + _uri_secrets(m["rest"])[0], text)


def redact_text(text: str) -> str:
    """``text`` with every secret masked: URI userinfo and query values, values named as credentials
    (``token=``, ``'password': '...'``, ``Authorization: Bearer ...``), the secret environment variables'
    values and the secret values the config held. Every message, log line, error row and manifest goes
    through here (the CLI's error line, the log handler, the sink's commit and manifest)."""
    text = _masked_uris(text)
    for pattern in (_QUOTED, _HEADER, _BEARER, _PAIR):
        text = pattern.sub(_by_name, text)
    values = {os.environ.get(var) for var in SECRET_VARS} | _REMEMBERED
    for value in sorted((v for v in values if _maskable(v)), key=len, reverse=True):
        if value in text:
            text = text.replace(value, MASK)
    return text


def redact(obj: Any) -> Any:
    """A copy of ``obj`` (mappings, lists, strings) with the values of credential-named keys masked and
    every string passed through :func:`redact_text`."""
    if isinstance(obj, dict):
        return {k: (MASK if v is not None and secret_name(k) else redact(v)) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [redact(v) for v in obj]
    if isinstance(obj, str):
        return redact_text(obj)
    return obj


def _maskable(value: str | None) -> bool:
    # Tiny values and placeholders would mask ordinary words ('none', 'auto') in every message.
    return bool(value) and len(value) >= 4 and value.lower() not in _PLACEHOLDERS and value.strip("*") != ""


def _leaves(obj: Any):
    if isinstance(obj, dict):
        for v in obj.values():
            yield from _leaves(v)
    elif isinstance(obj, list | tuple | set):
        for v in obj:
            yield from _leaves(v)
    elif obj is not None and not isinstance(obj, bool):
        yield str(obj)


def secret_values(obj: Any) -> set[str]:
    """The secret values in a config (or any mapping, list or string): every leaf under a credential-named
    key, and the userinfo and non-harmless query values of every URI in a string; with their percent-decoded
    forms and, for ``Bearer xyz``, the token alone."""
    found: set[str] = set()
    stack, seen = [obj], set()
    while stack:
        value = stack.pop()
        if id(value) in seen:  # a YAML alias reaches the same object again: scan it once
            continue
        seen.add(id(value))
        if isinstance(value, dict):
            for k, v in value.items():
                if secret_name(k):
                    found.update(_leaves(v))
                else:
                    stack.append(v)
        elif isinstance(value, list | tuple | set):
            stack.extend(value)
        elif isinstance(value, str):
            for m in _URI.finditer(value):
                found.update(_uri_secrets(m["rest"])[1])
            value = _masked_uris(value)  # a secret key inside a URI ('...KEY=@bucket') is no 'name=value'
            for pattern in (_QUOTED, _HEADER, _BEARER, _PAIR):
                found.update(m["value"] for m in pattern.finditer(value) if secret_name(m["key"]))
    for v in list(found):
        found |= {unquote(v), *v.split()[1:]}
    return {v for v in found if _maskable(v) and len(v) >= MIN_REMEMBERED}


def remember_secrets(obj: Any) -> None:
    """Mask the secret values in ``obj`` (:func:`secret_values`) wherever they appear in later text, in
    this process (called when a config is built, like :data:`SECRET_VARS` for the environment)."""
    _REMEMBERED.update(secret_values(obj))
