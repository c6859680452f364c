"""Hypothesis strategies for fuzzing the public API, and an oracle of what validation must say.

Shared by the pure properties (``tests/unit/orchestrator/test_input_fuzz.py``) and the wire-level
ones against a real orchestrator (``tests/integration/cascade/test_fuzzed_input.py``). The oracle
restates ``scoring.proto``'s rules with sets and ranges, independently of the regexes in
``orchestrator/validation.py``, so a property failing means the two disagree.
"""

from __future__ import annotations

import re
import string
from datetime import timedelta
from typing import Final

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from cascade.iso_codes import COUNTRIES, CURRENCY_EXPONENTS
from cascade.v1 import scoring_pb2
from orchestrator.validation import (
    MAX_AMOUNT_MINOR,
    MAX_DEVICE_ID_CHARS,
    MAX_ID_CHARS,
    MAX_TIMESTAMP_MS,
    MIN_TIMESTAMP_MS,
)
from tests.conftest import BASE_TS_MS

# Reproducible in CI: a fixed derivation of the examples from each test, no example database.
# An example takes about 1 ms (pure) or 5 ms (one call); the deadline catches a hang or a
# pathological input, with room for a machine busy with other tests.
FUZZ: Final = settings(
    derandomize=True,
    database=None,
    deadline=timedelta(seconds=2),
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)

# A refusal reads "<field path>: <problem>" on one short line, the path as validation names it.
REFUSAL: Final = re.compile(
    r"(request|transaction(\.[a-z_]+)?|transactions(\[\d+\]\.[a-z_]+)?): [^\n]{1,160}"
)
# What scoring.proto's comment on Transaction allows in an id, written out by hand.
ID_CHARS: Final = frozenset(string.ascii_letters + string.digits + "-_.:/+=@")
INT64_MIN: Final = -(2**63)
INT64_MAX: Final = 2**63 - 1
INT32_MIN: Final = -(2**31)
INT32_MAX: Final = 2**31 - 1
CHANNELS: Final = frozenset(range(1, 7))

# Strings that have broken parsers and validators elsewhere: NUL, bidi overrides, a BOM, a
# trailing newline (what "^...$" lets through), non-ASCII digits, Redis glob and hash-tag
# characters, the history encoding's separator, the last code point, the length limits.
ODD_STRINGS: Final = (
    "",
    " ",
    "\x00",
    "tx\x00",
    "\u202etx-1",
    "tx\u200f",
    "\ufefftx",
    "tx\n",
    "5411\n",
    "\n5411",
    "\u0665\u0664\u0661\u0661",
    "\uff15\uff14\uff11\uff11",
    "EUR\n",
    "DE\n",
    "tx 1",
    "card{1}",
    "card*",
    "a\x1fb",
    "\U0010ffff",
    "\ud7ff\ue000",
    "é",
    "x" * MAX_ID_CHARS,
    "x" * (MAX_ID_CHARS + 1),
    "d" * MAX_DEVICE_ID_CHARS,
    "d" * (MAX_DEVICE_ID_CHARS + 1),
    "x" * 20_000,
)
INT64_EDGES: Final = (
    INT64_MIN,
    INT64_MIN + 1,
    -1,
    0,
    1,
    MAX_AMOUNT_MINOR,
    MAX_AMOUNT_MINOR + 1,
    MIN_TIMESTAMP_MS - 1,
    MIN_TIMESTAMP_MS,
    MAX_TIMESTAMP_MS,
    MAX_TIMESTAMP_MS + 1,
    INT64_MAX - 1,
    INT64_MAX,
)

odd_text: Final = st.one_of(
    st.sampled_from(ODD_STRINGS),
    st.text(max_size=80),  # any code point but surrogates (protobuf strings are UTF-8)
    st.text(alphabet=st.characters(codec="ascii"), max_size=70),
)
ids: Final = st.text(alphabet="".join(sorted(ID_CHARS)), min_size=1, max_size=MAX_ID_CHARS)
int64s: Final = st.one_of(st.sampled_from(INT64_EDGES), st.integers(INT64_MIN, INT64_MAX))
enum_values: Final = st.one_of(
    st.integers(-1, 8), st.sampled_from((INT32_MIN, INT32_MAX)), st.integers(INT32_MIN, INT32_MAX)
)


_VALID: Final[dict[str, st.SearchStrategy[object]]] = {
    "transaction_id": ids,
    "card_id": ids,
    "merchant_id": ids,
    "merchant_category": st.from_regex(r"[0-9]{4}", fullmatch=True),
    "amount_minor": st.integers(1, MAX_AMOUNT_MINOR),
    "currency": st.sampled_from(sorted(CURRENCY_EXPONENTS)),
    "country": st.sampled_from(sorted(COUNTRIES)),
    "channel": st.sampled_from(sorted(CHANNELS)),
    "timestamp_ms": st.integers(BASE_TS_MS - 10**10, BASE_TS_MS + 10**10),
}
_VALID_OPTIONAL: Final[dict[str, st.SearchStrategy[object]]] = {
    "device_id": st.text(alphabet="".join(sorted(ID_CHARS)), max_size=MAX_DEVICE_ID_CHARS),
    "ip_country": st.sampled_from(["", *sorted(COUNTRIES)]),
}
_FUZZED: Final[dict[str, st.SearchStrategy[object]]] = {
    **{name: odd_text for name in (*_VALID, *_VALID_OPTIONAL)},
    "amount_minor": int64s,
    "timestamp_ms": int64s,
    "channel": enum_values,
}
FIELDS: Final = tuple(_FUZZED)


@st.composite
def transaction_fields(draw: st.DrawFn) -> dict[str, object]:
    """Keyword arguments for ``scoring_pb2.Transaction``: a valid transaction (its optional
    fields sometimes absent) with up to three fields, any of them, replaced by fuzzed values."""
    fields = draw(st.fixed_dictionaries(_VALID, optional=_VALID_OPTIONAL))
    for _ in range(draw(st.integers(0, 3))):
        name = draw(st.sampled_from(FIELDS))
        fields[name] = draw(_FUZZED[name])
    return fields


def wire_transaction(fields: dict[str, object]) -> scoring_pb2.Transaction:
    """The wire message for ``fields`` (as drawn from :func:`transaction_fields`)."""
    return scoring_pb2.Transaction(**fields)  # type: ignore[arg-type]


def _id_ok(value: object, limit: int, *, required: bool) -> bool:
    assert isinstance(value, str)
    if not value:
        return not required
    return len(value) <= limit and all(c in ID_CHARS for c in value)


def first_invalid_field(fields: dict[str, object]) -> str | None:
    """The field validation must name for ``fields`` (declaration order), or None if valid."""
    checks: list[tuple[str, bool]] = [
        ("transaction_id", _id_ok(fields["transaction_id"], MAX_ID_CHARS, required=True)),
        ("card_id", _id_ok(fields["card_id"], MAX_ID_CHARS, required=True)),
        ("merchant_id", _id_ok(fields["merchant_id"], MAX_ID_CHARS, required=True)),
        (
            "merchant_category",
            isinstance(mcc := fields["merchant_category"], str)
            and len(mcc) == 4
            and all(c in "0123456789" for c in mcc),
        ),
        ("amount_minor", 1 <= int(fields["amount_minor"]) <= MAX_AMOUNT_MINOR),  # type: ignore[call-overload]
        ("currency", fields["currency"] in CURRENCY_EXPONENTS),
        ("country", fields["country"] in COUNTRIES),
        ("channel", fields["channel"] in CHANNELS),
        (
            "timestamp_ms",
            MIN_TIMESTAMP_MS <= int(fields["timestamp_ms"]) <= MAX_TIMESTAMP_MS,  # type: ignore[call-overload]
        ),
        (
            "device_id",
            _id_ok(fields.get("device_id", ""), MAX_DEVICE_ID_CHARS, required=False),
        ),
        ("ip_country", fields.get("ip_country", "") in {"", *COUNTRIES}),
    ]
    return next((name for name, ok in checks if not ok), None)


def _varint(n: int) -> bytes:
    n &= (1 << 64) - 1
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


@st.composite
def raw_fields(draw: st.DrawFn, depth: int = 0) -> bytes:
    """Protobuf wire records built by hand: any field number (0, known, unknown, past the
    29-bit limit), any wire type (also the wrong one for a known field, groups, the reserved 6
    and 7), lengths that run past the end, invalid UTF-8, and nesting."""
    out = bytearray()
    for _ in range(draw(st.integers(0, 4))):
        number = draw(st.one_of(st.integers(0, 12), st.sampled_from((2**29 - 1, 2**29, 2**32))))
        wire_type = draw(st.integers(0, 7))
        out += _varint(number << 3 | wire_type)
        if wire_type == 0:
            out += _varint(draw(st.integers(-(2**63), 2**64 - 1)))
        elif wire_type == 1:
            out += draw(st.binary(min_size=8, max_size=8))
        elif wire_type == 5:
            out += draw(st.binary(min_size=4, max_size=4))
        elif wire_type == 2:
            if depth < 3 and draw(st.booleans()):
                payload = draw(raw_fields(depth=depth + 1))
            else:
                payload = draw(st.one_of(st.binary(max_size=40), odd_text.map(str.encode)))
            declared = draw(st.one_of(st.just(len(payload)), st.integers(0, 2**32)))
            out += _varint(declared) + payload
        else:  # 3, 4 (group start and end), 6, 7 (reserved): whatever follows
            out += draw(st.binary(max_size=8))
    return bytes(out)


def mutated(valid: bytes) -> st.SearchStrategy[bytes]:
    """``valid`` truncated, with bytes flipped, inserted or deleted, or with junk appended."""

    @st.composite
    def mutate(draw: st.DrawFn) -> bytes:
        body = bytearray(valid)
        kind = draw(st.sampled_from(("truncate", "flip", "insert", "delete", "append")))
        if kind == "truncate":
            return bytes(body[: draw(st.integers(0, max(0, len(body) - 1)))])
        if kind == "append":
            return bytes(body) + draw(st.one_of(st.binary(min_size=1, max_size=16), raw_fields()))
        for _ in range(draw(st.integers(1, 4))):
            at = draw(st.integers(0, max(0, len(body) - 1)))
            if kind == "flip" and body:
                body[at] ^= draw(st.integers(1, 255))
            elif kind == "insert":
                body[at:at] = draw(st.binary(min_size=1, max_size=4))
            elif body:
                del body[at]
        return bytes(body)

    return mutate()


# W3C traceparent values a caller might send in gRPC metadata: well-formed (any version, ids,
# flags, also all-zero ids), a valid one mutated, or any printable ASCII (what gRPC lets through).
_HEX: Final = "0123456789abcdef"
traceparents: Final = st.one_of(
    st.builds(
        "{}-{}-{}-{}".format,
        st.text(_HEX, min_size=2, max_size=2),
        st.one_of(st.just("0" * 32), st.text(_HEX, min_size=32, max_size=32)),
        st.one_of(st.just("0" * 16), st.text(_HEX, min_size=16, max_size=16)),
        st.text(_HEX, min_size=2, max_size=2),
    ),
    st.text(_HEX + "-", max_size=60),
    st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=80),
)
