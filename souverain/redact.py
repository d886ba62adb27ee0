"""Personal data and secrets out of text: e-mails, phone numbers, IBANs, payment cards,
national identifiers (FR NIR, US SSN, UK NINO, DE Steuer-ID), IP addresses, and credentials.

``redact(text)`` replaces each with a tag: ``[EMAIL]``, ``[PHONE]``, ``[IBAN]``, ``[CARD]``,
``[NATIONAL_ID]``, ``[IP]``, ``[SECRET]``. The personal data are `souverain.pii`'s detectors
(shared with the moderation's PII score): numbers are checked, not just shaped (an IBAN's
mod-97, a card's Luhn, a NIR's key, a Steuer-ID's check digit; an IP must parse), so order
numbers, dates and version strings are left alone.

Secrets (`redact_secrets`, run first) are recognised by their issuers' fixed shapes, so that
ordinary words and numbers never match: souverain keys (``sk-sov-`` + 43 URL-safe characters),
OpenAI/Mistral-style ``sk-...`` keys, ``Bearer`` tokens, AWS access key ids (``AKIA``/``ASIA``
+ 16), GitHub (``ghp_``/``gho_``/``ghu_``/``ghs_``/``ghr_``, ``github_pat_``), Slack (``xox?-``),
Google (``AIza`` + 35) and Stripe (``sk_live_``) keys, JWTs (three base64url parts, the first
two JSON objects), PEM private-key blocks, and the value of an assignment whose name says it
is a credential (``api_key=...``, ``"password": "..."``, ``MISTRAL_API_KEY=...``): Mistral's
own keys are 32 bare characters, recognisable only by such a name.

Phones are whole runs of digits and separators (``+33 6 12 34 56 78``, ``06.12.34.56.78``,
``(415) 555-2671``): international (``+`` and 8-15 digits), French national (``0`` + 9
digits in pairs) or North American (``[+1] NXX NXX XXXX``); a run is never cut into a phone.
"""

from __future__ import annotations

import re
from typing import Any

from souverain import pii
from souverain.pii import iban_ok, luhn_ok

__all__ = ["redact", "redact_json", "redact_secrets", "iban_ok", "luhn_ok", "is_secret_value",
           "looks_random", "SECRET", "SECRET_NAME"]

EMAIL = "[EMAIL]"
PHONE = "[PHONE]"
IBAN = "[IBAN]"
CARD = "[CARD]"
IP = "[IP]"
NATIONAL_ID = "[NATIONAL_ID]"
SECRET = "[SECRET]"

# -- secrets ---------------------------------------------------------------------------------
_B64URL = r"[A-Za-z0-9_-]"
_PEM = r"-----BEGIN (?:[A-Z0-9]+ )*PRIVATE KEY(?: BLOCK)?-----"
_SECRET_SHAPES = [
    _PEM + r".*?-----END (?:[A-Z0-9]+ )*PRIVATE KEY(?: BLOCK)?-----",
    _PEM + r".*",  # a block cut before its END line: the rest of the text goes too
    r"(?<![\w-])sk-sov-[A-Za-z0-9_-]{20,}",  # souverain (server/auth.py generate_key)
    r"(?<![\w-])sk-(?:proj|svcacct|admin|ant-api\d\d)-[A-Za-z0-9_-]{20,}",
    r"(?<![\w-])sk-(?=[A-Za-z]*\d)(?=\d*[A-Za-z])[A-Za-z0-9]{20,}(?![\w-])",
    r"(?<![\w-])(?:sk|rk)_(?:live|test)_[A-Za-z0-9]{16,}",
    r"(?<![A-Za-z0-9])(?:AKIA|ASIA)[A-Z0-9]{16}(?![A-Za-z0-9])",
    r"(?<![A-Za-z0-9_])gh[pousr]_[A-Za-z0-9]{36,}",
    r"(?<![A-Za-z0-9_])github_pat_[A-Za-z0-9_]{22,}",
    r"(?<![A-Za-z0-9-])xox[abposr]-(?=[A-Za-z-]*\d)[A-Za-z0-9-]{10,}",
    r"(?<![A-Za-z0-9_-])AIza[0-9A-Za-z_-]{35}(?![A-Za-z0-9_-])",
    # JWT: base64url('{"') = 'eyJ' starts the header and the claims; then the signature
    r"(?<![A-Za-z0-9_-])eyJ" + _B64URL + r"{8,}\.eyJ" + _B64URL + r"{8,}\.(?:" + _B64URL
    + r"+)?(?![A-Za-z0-9_-])",
]
_SECRET_RE = re.compile("|".join(f"(?:{p})" for p in _SECRET_SHAPES), re.DOTALL)
# the credentials of an Authorization header pasted in a message
_AUTH_SCHEME_RE = re.compile(r"(?i)(?<![A-Za-z0-9])(bearer|basic)(\s+)([A-Za-z0-9._~+/=-]{8,})")
# names that say their value is a credential (query parameters, JSON keys, assignments)
SECRET_NAME = re.compile(
    r"(?i)(?:^|[^a-z])(?:api[_-]?key|apikey|access[_-]?key(?:[_-]?id)?|secret(?:[_-]?key)?"
    r"|client[_-]?secret|(?:access|auth|refresh|id|bearer|session|api)?[_-]?token"
    r"|passw(?:or)?d|passphrase|authorization|credentials?)$")
_PASSWORD_NAME = re.compile(r"(?i)(?:passw(?:or)?d|passphrase)$")
# an assignment in text: NAME = VALUE, NAME: VALUE, "NAME": "VALUE"
_ASSIGNMENT_RE = re.compile(r"""([A-Za-z0-9_.-]+)(["']?\s*(?:=|:|=>)\s*["']?)([^\s"',;&}]{4,})""")


def looks_random(value: str) -> bool:
    """A value shaped like a generated credential rather than a word: a digit, or upper
    case after the first letter, or 20 characters and more."""
    return (any(c.isdigit() for c in value) or len(value) >= 20
            or (any(c.isupper() for c in value[1:]) and any(c.islower() for c in value)))


def is_secret_value(name: str, value: str) -> bool:
    """Whether ``value`` assigned to ``name`` is a credential to hide: the name says so and
    the value is not a placeholder word (a password is hidden whatever it looks like)."""
    if not SECRET_NAME.search(name) or value == SECRET or not value:
        return False
    return bool(_PASSWORD_NAME.search(name)) or looks_random(value)


def redact_secrets(text: str) -> str:
    """``text`` with credentials replaced by ``[SECRET]`` (the shapes in the module's
    docstring); everything else is left as written."""
    if not text:
        return text
    text = _SECRET_RE.sub(SECRET, text)
    text = _AUTH_SCHEME_RE.sub(
        lambda m: m[1] + m[2] + SECRET if looks_random(m[3]) and m[3] != SECRET else m[0], text)
    return _ASSIGNMENT_RE.sub(
        lambda m: m[1] + m[2] + SECRET if is_secret_value(m[1], m[3]) else m[0], text)

_TAGS = {pii.EMAIL: EMAIL, pii.PHONE: PHONE, pii.IBAN: IBAN, pii.CARD: CARD, pii.IP: IP,
         **dict.fromkeys(pii.NATIONAL_IDS, NATIONAL_ID)}


def redact(text: str) -> str:
    """``text`` with secrets, e-mails, phones, IBANs, card numbers, national identifiers and IP
    addresses replaced by tags (secrets first: a key's digits must not become a phone half-way
    through it). The identifiers are `souverain.pii`'s detectors, the moderation's too."""
    if not text:
        return text
    text = redact_secrets(text)
    out, last = [], 0
    for m in pii.find_pii(text):
        out.append(text[last:m.start])
        out.append(_TAGS[m.kind])
        last = m.end
    out.append(text[last:])
    return "".join(out)


def redact_json(value: Any) -> Any:
    """Every string inside a JSON value redacted (keys too); structure kept. The string value
    of a key that names a credential (``"api_key"``, ``"password"``) is a secret too."""
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, list):
        return [redact_json(v) for v in value]
    if isinstance(value, dict):
        return {redact(str(k)): SECRET if isinstance(v, str) and is_secret_value(str(k), v)
                else redact_json(v) for k, v in value.items()}
    return value
