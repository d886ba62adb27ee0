"""Personal data and secrets out of text: e-mails, phone numbers, IBANs, payment cards, IP
addresses, and credentials.

``redact(text)`` replaces each with a tag: ``[EMAIL]``, ``[PHONE]``, ``[IBAN]``, ``[CARD]``,
``[IP]``, ``[SECRET]``. Numbers are checked, not just shaped: an IBAN must pass its mod-97 check
at its country's length, a card number (13-19 digits) the Luhn check, an IP must parse; so order
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

import ipaddress
import re
from typing import Any

EMAIL = "[EMAIL]"
PHONE = "[PHONE]"
IBAN = "[IBAN]"
CARD = "[CARD]"
IP = "[IP]"
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

_EMAIL_RE = re.compile(r"(?<![\w.+-])[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*"
                       r"\.[A-Za-z]{2,}\b")

# ISO 13616 lengths (SWIFT IBAN registry), by country
IBAN_LENGTHS = {
    "AD": 24, "AE": 23, "AL": 28, "AT": 20, "AZ": 28, "BA": 20, "BE": 16, "BG": 22, "BH": 22,
    "BR": 29, "BY": 28, "CH": 21, "CR": 22, "CY": 28, "CZ": 24, "DE": 22, "DK": 18, "DO": 28,
    "EE": 20, "EG": 29, "ES": 24, "FI": 18, "FO": 18, "FR": 27, "GB": 22, "GE": 22, "GI": 23,
    "GL": 18, "GR": 27, "GT": 28, "HR": 21, "HU": 28, "IE": 22, "IL": 23, "IQ": 23, "IS": 26,
    "IT": 27, "JO": 30, "KW": 30, "KZ": 20, "LB": 28, "LC": 32, "LI": 21, "LT": 20, "LU": 20,
    "LV": 21, "MC": 27, "MD": 24, "ME": 22, "MK": 19, "MR": 27, "MT": 31, "MU": 30, "NL": 18,
    "NO": 15, "PK": 24, "PL": 28, "PS": 29, "PT": 25, "QA": 29, "RO": 24, "RS": 22, "SA": 24,
    "SC": 31, "SE": 24, "SI": 19, "SK": 24, "SM": 27, "ST": 25, "SV": 28, "TL": 23, "TN": 24,
    "TR": 26, "UA": 29, "VA": 22, "VG": 24, "XK": 20,
}
_IBAN_START = re.compile(r"(?<![A-Za-z0-9])([A-Za-z]{2})(\d{2})")

_IPV4 = r"(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)(?:\.(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)){3}"
# not inside a longer dotted number (1.2.3.4.5), nor a version string (v1.2.3.4)
_IPV4_RE = re.compile(r"(?<![\w.])(?<!version )" + _IPV4 + r"(?![\w]|\.\d)")
_IPV6_RE = re.compile(r"(?<![\w:.])(?:[0-9A-Fa-f]{0,4}:){2,7}(?:" + _IPV4
                      + r"|[0-9A-Fa-f]{0,4})(?:%[\w.]+)?(?![\w:])")

# a run of digits and phone separators, never starting or ending in the middle of a word
_RUN_RE = re.compile(r"(?<![\w+])(?:\+|\(\+?)?\d[\d ().\-/]*\d(?![\w])")
_FR_PHONE = re.compile(r"0[1-9](?:[ .\-]?\d\d){4}")
_US_PHONE = re.compile(r"(?:\+?1[ .\-]?)?(?:\([2-9]\d\d\)|[2-9]\d\d)[ .\-]?[2-9]\d\d[ .\-]?\d{4}")
_INTL_PHONE = re.compile(r"\+\d{1,3}(?:[ .\-]?(?:\(\d{1,4}\)|\d{1,5}))+")
_CARD_SHAPE = re.compile(r"\d(?:[ \-]?\d){12,18}")


def luhn_ok(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = ord(ch) - 48
        if i % 2 == 1:
            d *= 2
            if d > 9:
                d -= 9
        total += d
    return total % 10 == 0


def iban_ok(iban: str) -> bool:
    """Country length and the ISO 7064 mod-97 check of a compact (no spaces) IBAN."""
    iban = iban.upper()
    if IBAN_LENGTHS.get(iban[:2]) != len(iban) or not iban.isalnum():
        return False
    moved = iban[4:] + iban[:4]
    return int("".join(str(int(c, 36)) for c in moved)) % 97 == 1


def _ibans(text: str) -> list[tuple[int, int]]:
    spans = []
    for m in _IBAN_START.finditer(text):
        length = IBAN_LENGTHS.get(m.group(1).upper())
        if length is None:
            continue
        # take the country's number of characters, allowing single spaces between them
        chars: list[str] = []
        i = m.start()
        while i < len(text) and len(chars) < length:
            c = text[i]
            if c.isascii() and c.isalnum():
                chars.append(c)
            elif not (c == " " and chars and i + 1 < len(text) and text[i + 1].isalnum()):
                break
            i += 1
        if len(chars) == length and not (i < len(text) and text[i].isalnum()) \
                and iban_ok("".join(chars)):
            spans.append((m.start(), i))
    return spans


def _classify_run(run: str) -> str | None:
    digits = re.sub(r"\D", "", run)
    if _CARD_SHAPE.fullmatch(run) and 13 <= len(digits) <= 19:
        return CARD if luhn_ok(digits) else None
    if run.startswith("+") and 8 <= len(digits) <= 15 and _INTL_PHONE.fullmatch(
            run.replace("(0)", "")):
        return PHONE
    if _FR_PHONE.fullmatch(run) or _US_PHONE.fullmatch(run):
        return PHONE
    return None


def _replace_spans(text: str, spans: list[tuple[int, int, str]]) -> str:
    out, last = [], 0
    for start, end, tag in sorted(spans):
        if start < last:
            continue
        out.append(text[last:start])
        out.append(tag)
        last = end
    out.append(text[last:])
    return "".join(out)


def redact(text: str) -> str:
    """``text`` with secrets, e-mails, phones, IBANs, card numbers and IP addresses replaced
    by tags (secrets first: a key's digits must not become a phone half-way through it)."""
    if not text:
        return text
    text = redact_secrets(text)
    text = _EMAIL_RE.sub(EMAIL, text)
    text = _replace_spans(text, [(a, b, IBAN) for a, b in _ibans(text)])
    spans = []
    for m in _IPV6_RE.finditer(text):
        candidate = m.group(0).split("%", 1)[0]
        if any(c.isalnum() for c in candidate):
            try:
                ipaddress.IPv6Address(candidate)
            except ValueError:
                continue
            spans.append((m.start(), m.end(), IP))
    text = _replace_spans(text, spans)
    text = _IPV4_RE.sub(IP, text)
    spans = []
    for m in _RUN_RE.finditer(text):
        run = m.group(0)
        tag = _classify_run(run)
        if tag is not None:
            spans.append((m.start(), m.end(), tag))
    return _replace_spans(text, spans)


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
