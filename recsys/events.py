"""Typed records that cross the system's boundaries, and their JSON codec.

Four records, each mirrored by a JSON Schema in ``schemas/`` (the contract with producers
and consumers in any language; ``tests/test_schemas.py`` proves the two agree):

- :class:`Event`          ``schemas/event.v1.json``          input topic ``events``
- :class:`CatalogItem`    ``schemas/catalog_item.v1.json``   input topic ``catalog``
- :class:`Recommendation` ``schemas/recommendation.v1.json`` output topic ``recommendations``
- :class:`DeadLetter`     ``schemas/dead_letter.v2.json``    output topic ``dead-letters``

Decoding never raises anything but :class:`DecodeError`, whose message names the field and
what was wrong, so a bad message can be dead-lettered with a reason instead of stopping the
stream.

>>> ev = decode_event(b'{"event_id":"e1","type":"click","user_id":"u1","item_id":"i9","ts":1700000000000}')
>>> (ev.type, ev.user_id, ev.item_id, ev.ts)
('click', 'u1', 'i9', 1700000000000)
>>> decode_event(b'{"event_id":"e1","type":"hover","user_id":"u1","item_id":"i9","ts":0}')
Traceback (most recent call last):
...
recsys.events.DecodeError: field 'type': unknown event type 'hover' (expected one of browse, click, add_to_cart, purchase, search)
"""

from __future__ import annotations

import base64
import hashlib
import math
import re
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal, get_args

import orjson

EventType = Literal["browse", "click", "add_to_cart", "purchase", "search"]
EVENT_TYPES: tuple[str, ...] = get_args(EventType)

#: Schema versions written into every emitted record and checked on input.
SCHEMA_VERSION = 1
#: The dead letter's own version: v2 keeps a bounded prefix of the payload with its size and
#: hash (v1 carried the whole payload, which could outgrow the producer's request limit).
DEAD_LETTER_SCHEMA_VERSION = 2

#: Payload bytes a dead letter carries (base64: 4/3 of it, ~342 KB): the whole of anything up
#: to four times the default message limit, and well inside the producer's and the broker's
#: 1 MB default request size, so a refused message of any size can always be dead-lettered.
DEAD_LETTER_PAYLOAD_BYTES = 256 * 1024

#: Default cap on one message's size. Real events are a few hundred bytes; anything near a
#: megabyte is a producer bug, and parsing it would stall the stream for everyone.
DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024

_MAX_ID_LEN = 256  # ids longer than this are producer bugs, not identifiers
_MAX_TEXT_LEN = 10_000  # item text beyond this adds nothing to a MiniLM embedding (256 tokens)
#: Hostile values (issue 9), each dead-lettered with a reason rather than carried along:
#: a price above a trillion (any currency) or a quantity above a million is a unit or parsing
#: bug, and such numbers overflow any sum downstream (a 300-digit quantity is not even a 64-bit
#: integer, so re-encoding the event would fail);
MAX_PRICE = 1e12
MAX_QUANTITY = 1_000_000
#: ``context`` / ``attributes`` nested deeper than this: nobody needs it, and past 254 levels
#: orjson cannot even re-encode the record (the catalog would crash on storing it);
MAX_NESTING = 16
#: ids (event, user, item, session) with control characters (NUL, C0, DEL, C1) or bidirectional
#: formatting characters (ALM, LRM, RLM, LRE..RLO, LRI..PDI): invisible, they make two ids look
#: alike in logs and tools, or reorder what an operator reads (U+202E), and NUL ends C strings.
#: The invisible zero-width space, word joiner and byte order mark too, since 2026-12-07: ``i\u200b5``
#: was an item of its own that printed as ``i5``. (Not ZWNJ and ZWJ, U+200C and U+200D: Persian,
#: Urdu and Indic words and emoji sequences are spelled with them.)
_FORBIDDEN_IN_IDS = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200b\u200e\u200f\u202a-\u202e\u2060\u2066-\u2069\ufeff]")
#: control characters (C0, DEL, C1) in display text (a title, category, brand, query): each becomes
#: a space. They have no glyph, and shown to a shopper in a reason or printed by ``recsys tail`` an
#: escape sequence recolours or clears the terminal and a newline forges a line of its own.
_CONTROL_IN_TEXT = re.compile("[\x00-\x1f\x7f-\x9f]")
#: The bidirectional embeddings, overrides and isolates (U+202A-U+202E, U+2066-U+2069) in display
#: text are taken out, since 2026-12-07: a title with U+202E reversed the rest of every reason and
#: `tail` line that showed it, beyond the title. (The marks LRM, RLM and ALM, which mixed
#: right-to-left text needs, are kept; the text reads in its own direction without the others.)
_BIDI_IN_TEXT = re.compile("[\u202a-\u202e\u2066-\u2069]")
#: A required display text must hold a character outside these: spaces, controls, and the
#: invisible formatting characters (a title of two zero-width spaces read as blank in a reason).
BLANK_TEXT = re.compile("[\\s\x00-\x1f\x7f-\x9f\u061c\u200b-\u200f\u202a-\u202e\u2060-\u2069\ufeff]*")


#: Latest accepted event time, 9999-12-31T23:59:59.999Z: past it, times are producer bugs and
#: would not fit the 64-bit integers that JSON consumers (and orjson) use.
MAX_TS_MS = 253_402_300_799_999

#: RFC 3339 date-time (the JSON Schema ``date-time`` format), stricter than ISO 8601 as accepted
#: by ``datetime.fromisoformat``; ASCII digits only, upper-case ``Z``, no leap second, years
#: 1971-9998 (so that every offset keeps the time inside 0..MAX_TS_MS).
_AFTER_THE_YEAR = (r"-(0[1-9]|1[0-2])-(0[1-9]|[12][0-9]|3[01])[Tt]([01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9]"
                   r"(\.[0-9]+)?(Z|[+-]([01][0-9]|2[0-3]):[0-5][0-9])")
RFC3339_DATE_TIME = re.compile(r"(197[1-9]|19[89][0-9]|[2-8][0-9]{3}|9[0-8][0-9]{2}|99[0-8][0-9]|999[0-8])" + _AFTER_THE_YEAR)
#: The same with any four-digit year: a time that is well formed but out of the accepted range
#: gets a reason that says so.
_ANY_YEAR_DATE_TIME = re.compile(r"([0-9]{4})" + _AFTER_THE_YEAR)


class DecodeError(ValueError):
    """A message that cannot become a typed record; the text is the dead-letter reason."""


@dataclass(frozen=True, slots=True)
class Event:
    """One shopper action. ``ts`` is epoch milliseconds (RFC 3339 strings are converted)."""

    event_id: str
    type: EventType
    user_id: str
    item_id: str | None
    ts: int
    session_id: str | None = None
    query: str | None = None
    price: float | None = None
    quantity: int | None = None
    context: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "event_id": self.event_id,
            "type": self.type,
            "user_id": self.user_id,
            "ts": self.ts,
        }
        if self.item_id is not None:
            out["item_id"] = self.item_id
        for name in ("session_id", "query", "price", "quantity", "context"):
            value = getattr(self, name)
            if value is not None:
                out[name] = value
        return out


@dataclass(frozen=True, slots=True)
class CatalogItem:
    """An item upsert. ``text`` is what gets embedded (title, brand, category, description)."""

    item_id: str
    title: str
    description: str | None = None
    category: str | None = None
    brand: str | None = None
    price: float | None = None
    available: bool = True
    attributes: dict[str, Any] | None = None

    @property
    def text(self) -> str:
        parts = [self.title, self.brand, self.category, self.description]
        return " | ".join(p for p in parts if p)

    @property
    def repeat_purchase(self) -> bool:
        """Items such as groceries that people buy again; these stay recommendable. Only ``true``
        counts (until 2026-12-07 any truthy value did: ``"false"`` too, in a state stored then)."""
        return (self.attributes or {}).get("repeat_purchase") is True

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"item_id": self.item_id, "title": self.title, "available": self.available}
        for name in ("description", "category", "brand", "price", "attributes"):
            value = getattr(self, name)
            if value is not None:
                out[name] = value
        return out


@dataclass(frozen=True, slots=True)
class RecommendedItem:
    item_id: str
    score: float
    reason: str

    def to_dict(self) -> dict[str, Any]:
        """The item as it appears in a recommendation or a search result."""
        return {"item_id": self.item_id, "score": self.score, "reason": self.reason}

    @classmethod
    def from_dict(cls, obj: dict[str, Any]) -> "RecommendedItem":
        return cls(obj["item_id"], float(obj["score"]), obj["reason"])


@dataclass(frozen=True, slots=True)
class Recommendation:
    """Ranked items for one user, emitted after one (or a coalesced run of) their events.

    ``event_ts`` is the triggering event's time; ``emitted_at`` the wall clock at emission,
    both epoch milliseconds, so ``emitted_at - append time`` is the serving latency.
    """

    user_id: str
    items: tuple[RecommendedItem, ...]
    trigger_event_id: str
    model_version: str
    event_ts: int
    emitted_at: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema_version": SCHEMA_VERSION,
            "user_id": self.user_id,
            "items": [i.to_dict() for i in self.items],
            "trigger_event_id": self.trigger_event_id,
            "model_version": self.model_version,
            "event_ts": self.event_ts,
            "emitted_at": self.emitted_at,
        }


@dataclass(frozen=True, slots=True)
class SourcePosition:
    """Where a message came from: the coordinates a dead letter points back to."""

    topic: str
    partition: int
    offset: int


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """A message the system refused, with why, and where it came from.

    The payload is kept exactly up to :data:`DEAD_LETTER_PAYLOAD_BYTES`; beyond that the dead
    letter carries that prefix, says ``payload_truncated``, and keeps the full size and SHA-256,
    so the original can still be found and verified at its source coordinates.

    >>> d = DeadLetter(b"x" * 300_000, "too big", SourcePosition("events", 0, 7)).to_dict()
    >>> d["payload_size"], d["payload_truncated"], len(base64.b64decode(d["payload_b64"]))
    (300000, True, 262144)
    """

    payload: bytes
    reason: str
    source: SourcePosition
    failed_at: int = 0

    def to_dict(self) -> dict[str, Any]:
        kept = self.payload[:DEAD_LETTER_PAYLOAD_BYTES]
        return {
            "schema_version": DEAD_LETTER_SCHEMA_VERSION,
            "payload_b64": base64.b64encode(kept).decode("ascii"),
            "payload_truncated": len(kept) < len(self.payload),
            "payload_size": len(self.payload),
            "payload_sha256": hashlib.sha256(self.payload).hexdigest(),
            "payload_preview": self.payload[:200].decode("utf-8", errors="replace"),
            "reason": self.reason,
            "source": {
                "topic": self.source.topic,
                "partition": self.source.partition,
                "offset": self.source.offset,
            },
            "failed_at": self.failed_at,
        }


#: A source that moved a partition's position by itself (``--on-offset-reset earliest|latest``
#: after the log lost the flow's offset) first sends a *control* envelope: empty value, offset
#: = the new position - 1, and in ``extra`` the old position (``OFFSETS_RESET_FROM``) and the
#: new one (``OFFSETS_RESET_TO``). The engine records the move (and, when the offsets went
#: backwards because the topic was re-created, forgets the partition's old idempotence marks,
#: once) and never treats it as a message.
OFFSETS_RESET_FROM = "offsets_reset_from"
OFFSETS_RESET_TO = "offsets_reset_to"


@dataclass(frozen=True, slots=True)
class Envelope:
    """One raw message as read from a topic, before decoding."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None  # None: a tombstone (a record with a null value; on the compacted catalog, a deletion)
    timestamp_ms: int = 0  # broker append time (LogAppendTime or CreateTime)
    extra: dict[str, Any] = field(default_factory=dict)  # control envelopes: OFFSETS_RESET_FROM/_TO

    @property
    def position(self) -> SourcePosition:
        return SourcePosition(self.topic, self.partition, self.offset)


# --------------------------------------------------------------------------- decoding


def _loads(raw: bytes | None, max_bytes: int) -> dict[str, Any]:
    if raw is None:
        raise DecodeError("payload: empty message (a tombstone: its value is null)")
    if not isinstance(raw, (bytes, bytearray, memoryview)):
        raise DecodeError(f"payload: expected bytes, got {type(raw).__name__}")
    if len(raw) > max_bytes:
        raise DecodeError(f"payload: oversized message of {len(raw)} bytes (limit {max_bytes})")
    if len(raw) == 0:
        raise DecodeError("payload: empty message")
    try:
        obj = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        try:  # orjson names a byte that is not UTF-8 as "surrogates not allowed", whatever the byte
            bytes(raw).decode("utf-8")
        except UnicodeDecodeError as bad:
            raise DecodeError(f"payload: not UTF-8 text (byte 0x{bad.object[bad.start]:02x} at offset {bad.start}); "
                              f"JSON messages are UTF-8") from None
        raise DecodeError(f"payload: malformed or truncated JSON ({exc})") from None
    if not isinstance(obj, dict):
        raise DecodeError(f"payload: expected a JSON object, got {json_type(obj)}")
    return obj


def _str(obj: dict[str, Any], name: str, *, required: bool, max_len: int = _MAX_ID_LEN) -> str | None:
    value = obj.get(name)
    if value is None:
        if required:
            raise DecodeError(f"field '{name}': missing")
        return None
    if not isinstance(value, str):
        raise DecodeError(f"field '{name}': expected a string, got {json_type(value)}")
    if required and not value:
        raise DecodeError(f"field '{name}': empty string")
    if len(value) > max_len:
        raise DecodeError(f"field '{name}': longer than {max_len} characters")
    return value


def _display_text(obj: dict[str, Any], name: str, *, required: bool, max_len: int) -> str | None:
    """Text shown to shoppers and operators: a string as :func:`_str` checks it, each control
    character replaced by a space (until 2026-12-07 they reached the reasons as they were); a
    required one must keep a visible character.

    >>> _display_text({"title": "Lamp\\n\\x1b[31mRED"}, "title", required=True, max_len=99)
    'Lamp  [31mRED'
    """
    value = _str(obj, name, required=required, max_len=max_len)
    if value is not None and _CONTROL_IN_TEXT.search(value) is not None:
        value = _CONTROL_IN_TEXT.sub(" ", value)
    if value is not None and _BIDI_IN_TEXT.search(value) is not None:
        value = _BIDI_IN_TEXT.sub("", value)
    if required and value is not None and BLANK_TEXT.fullmatch(value) is not None:
        raise DecodeError(f"field '{name}': blank (only spaces, control or invisible characters)")
    return value


def _id(obj: dict[str, Any], name: str, *, required: bool) -> str | None:
    """An identifier: a string as :func:`_str` checks it, without invisible characters."""
    value = _str(obj, name, required=required)
    if value is not None:
        bad = _FORBIDDEN_IN_IDS.search(value)
        if bad is not None:
            raise DecodeError(f"field '{name}': contains the control, bidirectional or invisible character "
                              f"U+{ord(bad.group()):04X}")
    return value


_JSON_TYPES = ((bool, "a boolean"), (int, "a number"), (float, "a number"), (str, "a string"), (list, "an array"),
               (dict, "an object"))


def json_type(value: Any) -> str:
    """What a parsed JSON value is, in JSON's words (until 2026-12-07 refusals named Python's:
    ``got NoneType``, ``got list``).

    >>> json_type(None), json_type([1]), json_type("x"), json_type(True), json_type(2.5)
    ('null', 'an array', 'a string', 'a boolean', 'a number')
    """
    if value is None:
        return "null"
    return next((name for kind, name in _JSON_TYPES if isinstance(value, kind)), type(value).__name__)


def _nested(obj: dict[str, Any], name: str) -> dict[str, Any] | None:
    """An optional JSON object nested at most :data:`MAX_NESTING` levels deep."""
    value = obj.get(name)
    if value is None:
        return None
    if not isinstance(value, dict):
        raise DecodeError(f"field '{name}': expected an object, got {json_type(value)}")
    level, depth = [value], 1
    while level:
        level = [v for x in level for v in (x.values() if isinstance(x, dict) else x) if isinstance(v, (dict, list))]
        if level:
            depth += 1
            if depth > MAX_NESTING:
                raise DecodeError(f"field '{name}': nested deeper than {MAX_NESTING} levels")
    return value


def _number(obj: dict[str, Any], name: str) -> float | None:
    value = obj.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise DecodeError(f"field '{name}': expected a finite number, got {value!r}")
    if value < 0:
        raise DecodeError(f"field '{name}': negative ({value})")
    if value > MAX_PRICE:
        raise DecodeError(f"field '{name}': {value:g} is above the limit of {MAX_PRICE:g}")
    return float(value)


def parse_ts(value: Any) -> int:
    """Epoch milliseconds from an int/float of epoch ms or an RFC 3339 string.

    >>> parse_ts("2019-10-01T00:00:01Z"), parse_ts(1569888001000)
    (1569888001000, 1569888001000)
    """
    if isinstance(value, bool):
        raise DecodeError("field 'ts': expected epoch milliseconds or an RFC 3339 string, got bool")
    if isinstance(value, (int, float)):
        if not math.isfinite(value) or value < 0 or value > MAX_TS_MS:
            raise DecodeError(f"field 'ts': not a valid epoch-millisecond time ({value!r})")
        return int(value)
    if isinstance(value, str):
        if RFC3339_DATE_TIME.fullmatch(value) is None:
            if (shaped := _ANY_YEAR_DATE_TIME.fullmatch(value)) is not None:  # well formed, out of range:
                # said so (until 2026-12-07 "not an RFC 3339 time", which it is)
                year = int(shaped.group(1))
                raise DecodeError(f"field 'ts': {value[:40]!r} is " + (
                    "before 1971-01-01, the earliest a time string may give (epoch milliseconds reach 1970)"
                    if year < 1971 else "after 9998-12-31, the latest a time string may give"))
            raise DecodeError(f"field 'ts': not an RFC 3339 time ({value[:40]!r})")
        try:
            dt = datetime.fromisoformat(value.replace("Z", "+00:00").replace("t", "T"))
        except ValueError:
            raise DecodeError(f"field 'ts': not a valid calendar time ({value[:40]!r})") from None
        ts = int(dt.timestamp() * 1000)
        if ts < 0:
            raise DecodeError(f"field 'ts': before 1970-01-01 ({value[:40]!r})")
        return ts
    if value is None:
        raise DecodeError("field 'ts': missing")
    raise DecodeError(f"field 'ts': expected epoch milliseconds or an RFC 3339 string, got {json_type(value)}")


def event_from_dict(obj: dict[str, Any]) -> Event:
    """Validate a parsed JSON object as an :class:`Event` (the rules of ``event.v1.json``)."""
    etype = obj.get("type")
    if etype is None:
        raise DecodeError("field 'type': missing")
    if etype not in EVENT_TYPES:
        raise DecodeError(
            f"field 'type': unknown event type {etype!r} (expected one of {', '.join(EVENT_TYPES)})"
        )
    event_id = _id(obj, "event_id", required=True)
    user_id = _id(obj, "user_id", required=True)
    item_id = _id(obj, "item_id", required=etype != "search")
    if etype == "search" and obj.get("query") is None:
        raise DecodeError("field 'query': missing (required for search events)")
    # a search's query needs a visible character, as a title does (until 2026-12-07 one of spaces
    # was answered "no match" and an empty one said to be missing); another event's is not read
    query = _display_text(obj, "query", required=etype == "search", max_len=1_000)
    ts = parse_ts(obj.get("ts"))
    session_id = _id(obj, "session_id", required=False)
    price = _number(obj, "price")
    quantity = obj.get("quantity")
    if isinstance(quantity, float) and quantity.is_integer():
        quantity = int(quantity)  # JSON has one number type: 2.0 is the integer 2
    if quantity is not None and (isinstance(quantity, bool) or not isinstance(quantity, int) or quantity < 0):
        raise DecodeError(f"field 'quantity': expected a non-negative integer, got {quantity!r}")
    if quantity is not None and quantity > MAX_QUANTITY:
        raise DecodeError(f"field 'quantity': {quantity:.3g} is above the limit of {MAX_QUANTITY}")
    context = _nested(obj, "context")
    return Event(event_id, etype, user_id, item_id, ts, session_id, query, price, quantity, context)  # type: ignore[arg-type]


def stored_catalog_item(obj: dict[str, Any]) -> CatalogItem:
    """A catalog record this program stored (it was accepted then): read with today's rules when
    it passes them, else as it was stored, so that a rule added since (2026-12-07: the type of
    ``attributes.repeat_purchase``, invisible ids and titles) never stops a state from opening.

    >>> stored_catalog_item({"item_id": "a", "title": "Tea", "attributes": {"repeat_purchase": "false"}}).repeat_purchase
    False
    """
    try:
        return catalog_item_from_dict(obj)
    except DecodeError:
        attributes = obj.get("attributes")
        return CatalogItem(str(obj["item_id"]), str(obj.get("title") or obj["item_id"]), obj.get("description"),
                           obj.get("category"), obj.get("brand"), obj.get("price"), obj.get("available", True) is not False,
                           attributes if isinstance(attributes, dict) else None)


def catalog_item_from_dict(obj: dict[str, Any]) -> CatalogItem:
    """Validate a parsed JSON object as a :class:`CatalogItem` (``catalog_item.v1.json``)."""
    item_id = _id(obj, "item_id", required=True)
    title = _display_text(obj, "title", required=True, max_len=_MAX_TEXT_LEN)
    description = _str(obj, "description", required=False, max_len=_MAX_TEXT_LEN)
    category = _display_text(obj, "category", required=False, max_len=1_000)
    brand = _display_text(obj, "brand", required=False, max_len=1_000)
    price = _number(obj, "price")
    available = obj.get("available", True)
    if not isinstance(available, bool):
        raise DecodeError(f"field 'available': expected a boolean, got {json_type(available)}")
    attributes = _nested(obj, "attributes")
    if attributes is not None and not isinstance(again := attributes.get("repeat_purchase"), (bool, type(None))):
        # until 2026-12-07 read with bool(): "false", "0" and "no" marked the item bought again
        raise DecodeError(f"field 'attributes.repeat_purchase': expected true or false, got {json_type(again)} "
                          f"({str(again)[:20]!r})")
    return CatalogItem(item_id, title, description, category, brand, price, available, attributes)  # type: ignore[arg-type]


def decode_event(raw: bytes, max_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> Event:
    return event_from_dict(_loads(raw, max_bytes))


def decode_catalog_item(raw: bytes, max_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> CatalogItem:
    return catalog_item_from_dict(_loads(raw, max_bytes))


def encode(record: Event | CatalogItem | Recommendation | DeadLetter) -> bytes:
    """Compact JSON bytes for any of the four records."""
    if type(record) is Recommendation:  # the hot path: one per user per batch
        # orjson writes the items (dataclasses) itself, field by field in definition order: the
        # same bytes as their to_dict(), without ten dicts per recommendation (issue 12)
        return orjson.dumps({"schema_version": SCHEMA_VERSION, "user_id": record.user_id, "items": record.items,
                             "trigger_event_id": record.trigger_event_id, "model_version": record.model_version,
                             "event_ts": record.event_ts, "emitted_at": record.emitted_at})
    return orjson.dumps(record.to_dict())


def recommendation_from_dict(obj: dict[str, Any]) -> Recommendation:
    """Inverse of :meth:`Recommendation.to_dict` (for consumers, tests and the tail command)."""
    items = tuple(RecommendedItem.from_dict(i) for i in obj["items"])
    return Recommendation(
        obj["user_id"], items, obj["trigger_event_id"], obj["model_version"], int(obj["event_ts"]), int(obj["emitted_at"])
    )


# --------------------------------------------------------------------------- search (issue 13)


@dataclass(frozen=True, slots=True)
class SearchResult:
    """Ranked items for one ``search`` event (``schemas/search_result.v1.json``, topic
    ``search-results``). ``no_match``: nothing to show, ``items`` empty (nothing in the catalog
    matched the query, or every match is withdrawn); when false, ``items`` holds at least one.
    Times as in :class:`Recommendation`: the search's event time and the wall clock at emission,
    epoch milliseconds."""

    user_id: str
    query: str
    items: tuple[RecommendedItem, ...]
    no_match: bool
    trigger_event_id: str
    model_version: str
    event_ts: int
    emitted_at: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema_version": SCHEMA_VERSION,
            "user_id": self.user_id,
            "query": self.query,
            "items": [i.to_dict() for i in self.items],
            "no_match": self.no_match,
            "trigger_event_id": self.trigger_event_id,
            "model_version": self.model_version,
            "event_ts": self.event_ts,
            "emitted_at": self.emitted_at,
        }


def search_result_from_dict(obj: dict[str, Any]) -> SearchResult:
    """Inverse of :meth:`SearchResult.to_dict` (for consumers and tests)."""
    items = tuple(RecommendedItem.from_dict(i) for i in obj["items"])
    return SearchResult(
        obj["user_id"], obj["query"], items, bool(obj["no_match"]), obj["trigger_event_id"], obj["model_version"],
        int(obj["event_ts"]), int(obj["emitted_at"]),
    )
