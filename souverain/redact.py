"""Personal data out of text: e-mails, phone numbers, IBANs, payment cards, IP addresses.

``redact(text)`` replaces each with a tag: ``[EMAIL]``, ``[PHONE]``, ``[IBAN]``, ``[CARD]``,
``[IP]``. Numbers are checked, not just shaped: an IBAN must pass its mod-97 check at its
country's length, a card number (13-19 digits) the Luhn check, an IP must parse; so order
numbers, dates and version strings are left alone.

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
    """``text`` with e-mails, phones, IBANs, card numbers and IP addresses replaced by tags."""
    if not text:
        return text
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
    """Every string inside a JSON value redacted (keys too); structure kept."""
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, list):
        return [redact_json(v) for v in value]
    if isinstance(value, dict):
        return {redact(str(k)): redact_json(v) for k, v in value.items()}
    return value
