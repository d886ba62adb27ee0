"""Personal data detectors: where a text holds an e-mail, a phone number, an IBAN, a payment
card, a national identifier or an IP address.

``find_pii(text)`` returns the non-overlapping `PIIMatch`es, in text order. Numbers are
checked, not just shaped, so that order numbers, dates and versions are left alone:

- IBAN: its country's length (ISO 13616 registry) and the ISO 7064 mod-97 check;
- payment card: 13-19 digits (single spaces or dashes between them) and the Luhn check;
- FR NIR (numéro de sécurité sociale): sex digit, year, month (01-12, or 20-42 / 50-99 for
  the registry's special cases), department (2A/2B for Corsica, counted as 19/18 in the key),
  commune, order, and the key ``97 - (number mod 97)``;
- US SSN: ``AAA-GG-SSSS`` with dashes or spaces (no checksum exists: area not 000, 666 or
  9xx, group not 00, serial not 0000; a bare 9-digit run is not taken);
- UK NINO: two prefix letters (HMRC's allowed letters, minus BG GB KN NK NT TN ZZ), six
  digits, suffix A-D;
- DE Steuer-ID: 11 digits, the first not 0, one digit of the first ten repeated two or three
  times (some others absent), and the ISO 7064 MOD 11,10 check digit;
- IPv4 / IPv6: must parse (``ipaddress``); not inside a longer dotted number or after
  ``version``;
- phone: whole runs of digits and separators: international (``+`` and 8-15 digits),
  French national (``0`` + 9 digits in pairs) or North American (``[+1] NXX NXX XXXX``).

The audit redaction (`souverain.redact`) and the moderation's PII score
(`souverain.moderation`) both read these detectors, so what the audit log hides is what a
guardrail blocks.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

EMAIL, PHONE, IBAN, CARD, IP = "email", "phone", "iban", "card", "ip"
FR_NIR, US_SSN, UK_NINO, DE_STEUER_ID = "fr_nir", "us_ssn", "uk_nino", "de_steuer_id"
KINDS = (EMAIL, PHONE, IBAN, CARD, FR_NIR, US_SSN, UK_NINO, DE_STEUER_ID, IP)
NATIONAL_IDS = frozenset({FR_NIR, US_SSN, UK_NINO, DE_STEUER_ID})


@dataclass(frozen=True)
class PIIMatch:
    """One identifier found: its kind (one of `KINDS`) and where it is in the text."""

    kind: str
    start: int
    end: int
    text: str


EMAIL_RE = re.compile(r"(?<![\w.+-])[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*"
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

_S = r"[ .]?"  # the optional separator of the printed forms of NIR, NINO and Steuer-ID
_NIR_RE = re.compile(r"(?<![\w+])([1-478])" + _S + r"(\d\d)" + _S + r"(\d\d)" + _S
                     + r"(\d\d|2[ABab])" + _S + r"(\d{3})" + _S + r"(\d{3})" + _S
                     + r"(\d\d)(?![\w])")
_SSN_RE = re.compile(r"(?<![\w-])(\d{3})([- ])(\d{2})\2(\d{4})(?![\w-])")
_NINO_RE = re.compile(r"(?<![\w])([A-CEGHJ-PR-TW-Z][A-CEGHJ-NPR-TW-Z])" + r" ?(\d\d) ?(\d\d) ?"
                      r"(\d\d) ?([A-D])(?![\w])")
_NINO_BAD_PREFIXES = frozenset({"BG", "GB", "KN", "NK", "NT", "TN", "ZZ"})
_STEUER_RE = re.compile(r"(?<![\w+])([1-9]\d)" + _S + r"(\d{3})" + _S + r"(\d{3})" + _S
                        + r"(\d{3})(?![\w])")


def luhn_ok(digits: str) -> bool:
    """The Luhn (mod 10) check of a card number's digits."""
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


def nir_ok(nir: str) -> bool:
    """The key of a compact 15-character French NIR: ``97 - (first 13 digits mod 97)``,
    with Corsica's 2A / 2B counted as 19 / 18 (INSEE's rule)."""
    nir = nir.upper()
    if len(nir) != 15:
        return False
    body = nir[:13].replace("2A", "19", 1) if nir[5:7] == "2A" else \
        nir[:13].replace("2B", "18", 1) if nir[5:7] == "2B" else nir[:13]
    if not (body.isdigit() and nir[13:].isdigit()):
        return False
    month = int(nir[3:5])
    if not (1 <= month <= 12 or 20 <= month <= 42 or 50 <= month <= 99):
        return False
    return 97 - int(body) % 97 == int(nir[13:])


def ssn_ok(area: str, group: str, serial: str) -> bool:
    """The SSA's rules for an SSN's parts (there is no check digit)."""
    return area not in ("000", "666") and area[0] != "9" and group != "00" and serial != "0000"


def steuer_id_ok(digits: str) -> bool:
    """A German tax id: 11 digits, the first not 0; among the first ten, exactly one digit
    appears two or three times; the 11th is the ISO 7064 MOD 11,10 check digit."""
    if len(digits) != 11 or not digits.isdigit() or digits[0] == "0":
        return False
    counts = [digits[:10].count(d) for d in set(digits[:10])]
    if sorted(c for c in counts if c > 1) not in ([2], [3]):
        return False
    product = 10
    for ch in digits[:10]:
        total = (int(ch) + product) % 10 or 10
        product = (2 * total) % 11
    check = 11 - product
    return (0 if check == 10 else check) == int(digits[10])


def _ibans(text: str) -> list[PIIMatch]:
    found = []
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
            found.append(PIIMatch(IBAN, m.start(), i, text[m.start():i]))
    return found


def _ips(text: str) -> list[PIIMatch]:
    found = []
    for m in _IPV6_RE.finditer(text):
        candidate = m.group(0).split("%", 1)[0]
        if any(c.isalnum() for c in candidate):
            try:
                ipaddress.IPv6Address(candidate)
            except ValueError:
                continue
            found.append(PIIMatch(IP, m.start(), m.end(), m.group(0)))
    found += [PIIMatch(IP, m.start(), m.end(), m.group(0)) for m in _IPV4_RE.finditer(text)]
    return found


def _national_ids(text: str) -> list[PIIMatch]:
    found = []
    for m in _NIR_RE.finditer(text):
        if nir_ok("".join(m.groups())):
            found.append(PIIMatch(FR_NIR, m.start(), m.end(), m.group(0)))
    for m in _SSN_RE.finditer(text):
        if ssn_ok(m.group(1), m.group(3), m.group(4)):
            found.append(PIIMatch(US_SSN, m.start(), m.end(), m.group(0)))
    for m in _NINO_RE.finditer(text):
        if m.group(1) not in _NINO_BAD_PREFIXES:
            found.append(PIIMatch(UK_NINO, m.start(), m.end(), m.group(0)))
    for m in _STEUER_RE.finditer(text):
        if steuer_id_ok("".join(m.groups())):
            found.append(PIIMatch(DE_STEUER_ID, m.start(), m.end(), m.group(0)))
    return found


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


def _runs(text: str) -> list[PIIMatch]:
    found = []
    for m in _RUN_RE.finditer(text):
        kind = _classify_run(m.group(0))
        if kind is not None:
            found.append(PIIMatch(kind, m.start(), m.end(), m.group(0)))
    return found


def find_pii(text: str) -> list[PIIMatch]:
    """Every identifier in ``text``, in text order, none overlapping another. Where two
    detectors claim the same characters the more specific wins: e-mail, IBAN, national ids,
    IP, then card / phone (a checked identifier's digits are never re-read as a phone)."""
    if not text:
        return []
    taken: list[PIIMatch] = []
    for group in ([PIIMatch(EMAIL, m.start(), m.end(), m.group(0))
                   for m in EMAIL_RE.finditer(text)],
                  _ibans(text), _national_ids(text), _ips(text), _runs(text)):
        for found in group:
            if all(found.end <= t.start or found.start >= t.end for t in taken):
                taken.append(found)
    return sorted(taken, key=lambda t: t.start)


def pii_kinds(text: str) -> set[str]:
    """The kinds of identifier ``text`` holds (empty: none found)."""
    return {m.kind for m in find_pii(text)}
