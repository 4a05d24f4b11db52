"""The JSON Schemas in schemas/ and the Python records/decoder in recsys/events.py agree.

Inputs (event, catalog item): for any JSON object, ``decode_*`` accepts exactly when the
schema validates (formats asserted). Outputs (recommendation, dead letter): whatever the
Python types hold, the encoded bytes validate. Known differences the schema cannot close are
pinned below as strict xfails; each turns into a failure (to delete the mark) once the
decoder is tightened.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import re
from typing import Any

import orjson
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from jsonschema import Draft202012Validator

from recsys import schemas
from recsys.control import decode_control
from recsys.events import (  # issue 13
    BLANK_TEXT,
    DEAD_LETTER_PAYLOAD_BYTES,
    DEAD_LETTER_SCHEMA_VERSION,
    EVENT_TYPES,
    MAX_TS_MS,
    SCHEMA_VERSION,
    CatalogItem,
    DeadLetter,
    DecodeError,
    Event,
    Recommendation,
    RecommendedItem,
    SearchResult,
    SourcePosition,
    decode_catalog_item,
    decode_event,
    encode,
    recommendation_from_dict,
    search_result_from_dict,
)
from recsys.schemas import SCHEMA_DIR, SCHEMA_NAMES, load_schema, validate

INPUTS = ("event", "catalog_item", "control")
OUTPUTS = ("recommendation", "dead_letter", "search_result")
DECODERS = {"event": decode_event, "catalog_item": decode_catalog_item, "control": decode_control}

# --------------------------------------------------------------------------- helpers


def decoder_verdict(name: str, obj: Any) -> tuple[bool, str]:
    """(accepted, reason) from the hand-written decoder, fed the JSON bytes."""
    try:
        DECODERS[name](orjson.dumps(obj))
    except DecodeError as exc:
        return False, str(exc)
    return True, ""


def assert_agree(name: str, obj: Any) -> None:
    obj = orjson.loads(orjson.dumps(obj))  # what a consumer really sees
    accepted, reason = decoder_verdict(name, obj)
    errors = validate(name, obj)
    assert accepted == (not errors), f"decoder {'accepted' if accepted else 'refused: ' + reason}; schema errors {errors}; object {obj!r}"


# --------------------------------------------------------------------------- strategies

ABSENT = object()
JSON_SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=8)
)
JSON_VALUES = st.recursive(
    JSON_SCALARS, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3), max_leaves=6
)
JSON_OBJECTS = st.dictionaries(st.text(max_size=4), JSON_VALUES, max_size=3)


def text_up_to(limit: int, min_size: int = 0, *, over: bool = False) -> st.SearchStrategy[str]:
    """Short texts plus texts at ``limit`` (where codecs disagree), one longer when ``over``."""
    near = st.integers(max(min_size, limit - 2), limit + over).map(lambda n: "x" * n)
    return st.text(min_size=min_size, max_size=10) | near


#: What ids may not hold: control characters and bidirectional formatting (recsys.events).
ID_FORBIDDEN = [chr(c) for c in [*range(0x20), *range(0x7F, 0xA0), 0x61C, 0x200E, 0x200F, *range(0x202A, 0x202F), *range(0x2066, 0x206A)]]
ID_TEXT = st.text(st.characters(blacklist_characters=ID_FORBIDDEN, blacklist_categories=("Cs",)), min_size=1, max_size=10)
IDS = ID_TEXT | st.integers(254, 256).map(lambda n: "i" * n)
#: Ids with one forbidden character somewhere (NUL, right-to-left override, ...).
HOSTILE_IDS = st.builds(lambda a, c, b: a + c + b, st.text(max_size=3), st.sampled_from(ID_FORBIDDEN), st.text(max_size=3))
NON_NEGATIVE = st.integers(0, 2**63 - 1) | st.floats(min_value=0, allow_nan=False, allow_infinity=False)
PRICES = st.integers(0, 10**12) | st.floats(min_value=0, max_value=1e12)  # MAX_PRICE


@st.composite
def rfc3339(draw: st.DrawFn, *, real_days_only: bool = False) -> str:  # noqa: C901
    """RFC 3339 date-time strings; unless ``real_days_only``, some name impossible days or second 60."""
    year = draw(st.integers(1971, 9998) if real_days_only else st.integers(1, 9999))
    month = draw(st.integers(1, 12))
    day = draw(st.integers(1, 28 if real_days_only else 31))
    second = draw(st.integers(0, 59 if real_days_only else 60))
    frac = draw(st.just("") | st.text("0123456789", min_size=1, max_size=10).map(lambda d: "." + d))
    offset = draw(
        st.just("Z")
        | st.builds(lambda s, h, m: f"{s}{h:02d}:{m:02d}", st.sampled_from("+-"), st.integers(0, 23), st.integers(0, 59))
    )
    sep = draw(st.sampled_from("Tt"))
    hour, minute = draw(st.integers(0, 23)), draw(st.integers(0, 59))
    return f"{year:04d}-{month:02d}-{day:02d}{sep}{hour:02d}:{minute:02d}:{second:02d}{frac}{offset}"


BAD_TS_STRINGS = st.sampled_from(
    [
        "",
        "yesterday",
        "2019-10-01",  # a date, no time
        "2019-10-01T00:00:01",  # no offset
        "2019-10-01T00:00:01z",  # lower-case z: neither accepts it
        "2019-13-01T00:00:01Z",
        "2019-02-30T00:00:01Z",
        "2019-10-01T24:00:00Z",
        "2019-10-01T00:00:01+24:00",
        "0000-10-01T00:00:01Z",
        "2019-10-01 00:00:01Z",  # ISO 8601 forms that are not RFC 3339: a space, no colon in the offset
        "2019-10-01T00:00:01+0000",
        "2019-10-01T00:00:01Z\n",  # a trailing newline: Python's `$` would let it through
        "\u0661\u0669-10-01T00:00:01Z",  # Arabic-Indic digits: `\d` would let them through
    ]
)
VALID_TS = st.integers(0, MAX_TS_MS) | st.floats(min_value=0, max_value=MAX_TS_MS) | rfc3339(real_days_only=True)
ANY_TS = (
    VALID_TS
    | rfc3339()
    | BAD_TS_STRINGS
    | st.integers(-(2**63), -1)
    | st.floats(max_value=-1e-9, allow_infinity=False)
    | st.booleans()
    | st.none()
)


def _put_optional(draw: st.DrawFn, obj: dict[str, Any], name: str, values: st.SearchStrategy[Any]) -> None:
    value = draw(st.just(ABSENT) | st.none() | values)
    if value is not ABSENT:
        obj[name] = value


@st.composite
def valid_events(draw: st.DrawFn) -> dict[str, Any]:
    etype = draw(st.sampled_from(EVENT_TYPES))
    obj: dict[str, Any] = {"event_id": draw(IDS), "type": etype, "user_id": draw(IDS), "ts": draw(VALID_TS)}
    if etype == "search":
        obj["query"] = visible(draw(text_up_to(1000, min_size=1)))
        _put_optional(draw, obj, "item_id", IDS | st.just(""))
    else:
        obj["item_id"] = draw(IDS)
        _put_optional(draw, obj, "query", text_up_to(1000))
    _put_optional(draw, obj, "session_id", ID_TEXT | st.integers(254, 256).map(lambda n: "s" * n))
    _put_optional(draw, obj, "price", PRICES)
    _put_optional(draw, obj, "quantity", st.integers(0, 10**6))
    _put_optional(draw, obj, "context", JSON_OBJECTS)
    _put_optional(draw, obj, "x_producer_field", JSON_VALUES)  # unknown fields are ignored
    return obj


def visible(text: str) -> str:
    """``text`` as a required display text (a title, a search's query) must be: holding a character
    that is not white space, a control or an invisible formatting character (recsys.events'
    BLANK_TEXT; until 2026-12-08 the strategies checked white space and controls only, and drew a
    search of query ' ' or a title of a zero-width space now and then, which the decoder refuses)."""
    return "x" + text if BLANK_TEXT.fullmatch(text) else text


@st.composite
def valid_catalog_items(draw: st.DrawFn) -> dict[str, Any]:
    title = draw(text_up_to(10_000, min_size=1))
    obj: dict[str, Any] = {"item_id": draw(IDS), "title": visible(title)}
    _put_optional(draw, obj, "description", text_up_to(10_000))
    _put_optional(draw, obj, "category", text_up_to(1000))
    _put_optional(draw, obj, "brand", text_up_to(1000))
    _put_optional(draw, obj, "price", PRICES)
    if draw(st.booleans()):
        obj["available"] = draw(st.booleans())
    _put_optional(draw, obj, "attributes", JSON_OBJECTS)
    _put_optional(draw, obj, "x_producer_field", JSON_VALUES)
    return obj


EVENT_FIELD_VALUES: dict[str, st.SearchStrategy[Any]] = {
    "event_id": IDS | st.just("") | HOSTILE_IDS,
    "type": st.sampled_from(EVENT_TYPES) | st.text(max_size=12),
    "user_id": IDS | st.just("") | HOSTILE_IDS,
    "item_id": IDS | st.just("") | HOSTILE_IDS,
    "ts": ANY_TS,
    "session_id": text_up_to(256, over=True) | HOSTILE_IDS,
    "query": text_up_to(1000, over=True),
    "price": NON_NEGATIVE | st.floats(max_value=-1e-9, allow_infinity=False) | st.integers(-(2**63), -1),
    "quantity": st.integers(-5, 2**63 - 1) | st.integers(10**6 - 1, 10**6 + 1) | st.floats(allow_nan=False, allow_infinity=False),
    "context": JSON_OBJECTS,
}
CATALOG_FIELD_VALUES: dict[str, st.SearchStrategy[Any]] = {
    "item_id": IDS | st.just("") | HOSTILE_IDS,
    "title": text_up_to(10_000, over=True) | st.just(""),
    "description": text_up_to(10_000, over=True),
    "category": text_up_to(1000, over=True),
    "brand": text_up_to(1000, over=True),
    "price": NON_NEGATIVE | st.integers(-(2**63), -1) | st.floats(max_value=-1e-9, allow_infinity=False),
    "available": st.booleans(),
    "attributes": JSON_OBJECTS,
}


@st.composite
def mutated(draw: st.DrawFn, base: st.SearchStrategy[dict[str, Any]], field_values: dict[str, st.SearchStrategy[Any]]) -> dict[str, Any]:
    """A valid object with one to three things broken: a field dropped, nulled or replaced."""
    obj = dict(draw(base))
    for _ in range(draw(st.integers(1, 3))):
        name = draw(st.sampled_from(sorted(field_values)))
        how = draw(st.sampled_from(["drop", "null", "plausible", "any_json"]))
        if how == "drop":
            obj.pop(name, None)
        elif how == "null":
            obj[name] = None
        elif how == "plausible":
            obj[name] = draw(field_values[name])
        else:
            obj[name] = draw(JSON_VALUES)
    return obj


def any_objects(field_values: dict[str, st.SearchStrategy[Any]]) -> st.SearchStrategy[dict[str, Any]]:
    """Objects with any subset of the fields, each plausible or any JSON at all."""
    return st.fixed_dictionaries({}, optional={name: values | JSON_VALUES for name, values in field_values.items()})


EVENT_OBJECTS = valid_events() | mutated(valid_events(), EVENT_FIELD_VALUES) | any_objects(EVENT_FIELD_VALUES)
CATALOG_OBJECTS = (
    valid_catalog_items() | mutated(valid_catalog_items(), CATALOG_FIELD_VALUES) | any_objects(CATALOG_FIELD_VALUES)
)

# --------------------------------------------------------------------------- the schema files


@pytest.mark.parametrize("name", SCHEMA_NAMES)
def test_schema_is_a_valid_draft_2020_12_schema(name: str) -> None:
    schema = load_schema(name)
    Draft202012Validator.check_schema(schema)
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"


@pytest.mark.parametrize("name", SCHEMA_NAMES)
def test_schema_id_names_the_file_and_its_version(name: str) -> None:
    schema = load_schema(name)
    version = schemas.CURRENT_VERSIONS.get(name, SCHEMA_VERSION)
    assert schema["$id"].endswith(f"{name}.v{version}")
    assert schema["title"] and schema["description"]
    if "schema_version" in schema["properties"]:
        assert schema["properties"]["schema_version"] == {"const": version}


#: Versions replaced by a newer one, kept so that records already written stay checkable.
SUPERSEDED = ("dead_letter.v1.json",)


def test_schema_dir_is_the_repository_schemas_folder_and_holds_every_schema() -> None:
    assert SCHEMA_DIR == schemas.Path(__file__).resolve().parent.parent / "schemas"
    current = [schemas.schema_path(n).name for n in SCHEMA_NAMES]
    assert schemas.schema_path("dead_letter").name == f"dead_letter.v{DEAD_LETTER_SCHEMA_VERSION}.json"
    assert sorted(p.name for p in SCHEMA_DIR.glob("*.json")) == sorted([*current, *SUPERSEDED])


def test_load_schema_accepts_a_versioned_name_and_returns_a_fresh_copy() -> None:
    first = load_schema("event")
    first["title"] = "changed"
    assert load_schema("event.v1")["title"] != "changed"


def test_load_schema_names_the_known_schemas_when_one_is_missing() -> None:
    with pytest.raises(FileNotFoundError, match="catalog_item"):
        load_schema("evnt")


@pytest.mark.parametrize("name", SCHEMA_NAMES)
def test_every_example_in_a_schema_validates(name: str) -> None:
    examples = load_schema(name)["examples"]
    assert examples
    for example in examples:
        assert validate(name, example) == []


@pytest.mark.parametrize("name", INPUTS)
def test_every_input_example_decodes(name: str) -> None:
    for example in load_schema(name)["examples"]:
        assert decoder_verdict(name, example) == (True, "")


# --------------------------------------------------------------------------- fields match


def test_event_schema_lists_exactly_the_event_fields() -> None:
    assert set(load_schema("event")["properties"]) == {f.name for f in dataclasses.fields(Event)}


def test_event_schema_requires_the_fields_the_dataclass_requires() -> None:
    schema = load_schema("event")
    no_default = {f.name for f in dataclasses.fields(Event) if f.default is dataclasses.MISSING}
    # item_id has no default but is None for searches; search events need a query instead
    assert set(schema["required"]) | set(schema["else"]["required"]) == no_default
    assert schema["if"]["properties"]["type"] == {"const": "search"}
    assert schema["then"]["required"] == ["query"]


def test_event_schema_enumerates_exactly_the_event_types_in_order() -> None:
    assert load_schema("event")["properties"]["type"]["enum"] == list(EVENT_TYPES)


def test_catalog_schema_lists_the_fields_and_requires_those_without_defaults() -> None:
    schema = load_schema("catalog_item")
    fields = dataclasses.fields(CatalogItem)
    assert set(schema["properties"]) == {f.name for f in fields}
    assert set(schema["required"]) == {f.name for f in fields if f.default is dataclasses.MISSING}
    assert schema["properties"]["available"]["default"] is CatalogItem("i", "t").available


def test_recommendation_schema_lists_exactly_what_to_dict_emits() -> None:
    schema = load_schema("recommendation")
    emitted = Recommendation("u", (RecommendedItem("i", 1.0, "r"),), "e", "m", 0, 0).to_dict()
    assert set(schema["properties"]) == set(schema["required"]) == set(emitted)
    assert set(emitted) == {f.name for f in dataclasses.fields(Recommendation)} | {"schema_version"}
    item_schema = schema["properties"]["items"]["items"]
    item_fields = {f.name for f in dataclasses.fields(RecommendedItem)}
    assert set(item_schema["properties"]) == set(item_schema["required"]) == item_fields == set(emitted["items"][0])
    assert schema["properties"]["schema_version"] == {"const": SCHEMA_VERSION}


def test_dead_letter_schema_lists_exactly_what_to_dict_emits() -> None:
    schema = load_schema("dead_letter")
    emitted = DeadLetter(b"x", "r", SourcePosition("t", 0, 0)).to_dict()
    assert set(schema["properties"]) == set(schema["required"]) == set(emitted)
    source = schema["properties"]["source"]
    source_fields = {f.name for f in dataclasses.fields(SourcePosition)}
    assert set(source["properties"]) == set(source["required"]) == source_fields == set(emitted["source"])
    assert schema["properties"]["schema_version"] == {"const": DEAD_LETTER_SCHEMA_VERSION}


@pytest.mark.parametrize(("name", "open_to_unknown_fields"), [(n, True) for n in INPUTS] + [(n, False) for n in OUTPUTS])
def test_inputs_allow_unknown_fields_and_outputs_do_not(name: str, open_to_unknown_fields: bool) -> None:
    example = dict(load_schema(name)["examples"][0], x_unknown=1)
    assert (validate(name, example) == []) is open_to_unknown_fields


# --------------------------------------------------------------------------- decoder == schema


@settings(max_examples=400, deadline=None)
@given(EVENT_OBJECTS)
def test_decoder_accepts_an_event_exactly_when_the_schema_validates_it(obj: dict[str, Any]) -> None:
    # an integral float quantity (2.0) was a known difference until the decoder read it as the
    # integer JSON Schema counts it as: it is generated too now
    assert_agree("event", obj)


@settings(max_examples=300, deadline=None)
@given(CATALOG_OBJECTS)
def test_decoder_accepts_a_catalog_item_exactly_when_the_schema_validates_it(obj: dict[str, Any]) -> None:
    assert_agree("catalog_item", obj)


@settings(max_examples=100, deadline=None)
@given(valid_events())
def test_generated_valid_events_pass_both_decoder_and_schema(obj: dict[str, Any]) -> None:
    assert decoder_verdict("event", obj)[0]
    assert validate("event", obj) == []


@settings(max_examples=100, deadline=None)
@given(valid_catalog_items())
def test_generated_valid_catalog_items_pass_both_decoder_and_schema(obj: dict[str, Any]) -> None:
    assert decoder_verdict("catalog_item", obj)[0]
    assert validate("catalog_item", obj) == []


CONTROL_OBJECTS = st.fixed_dictionaries(
    {}, optional={"type": st.sampled_from(["forget_user", "forget"]) | JSON_VALUES, "user_id": IDS | st.just("") | JSON_VALUES}
)


@settings(max_examples=200, deadline=None)
@given(CONTROL_OBJECTS)
def test_decoder_accepts_a_control_message_exactly_when_the_schema_validates_it(obj: dict[str, Any]) -> None:
    assert_agree("control", obj)


CLICK = {"event_id": "e1", "type": "click", "user_id": "u1", "item_id": "i9", "ts": 1700000000000}
SEARCH = {"event_id": "e2", "type": "search", "user_id": "u1", "query": "shoes", "ts": 0}
REFUSED_EVENTS = {
    "missing event_id": {k: v for k, v in CLICK.items() if k != "event_id"},
    "missing ts": {k: v for k, v in CLICK.items() if k != "ts"},
    "null user_id": {**CLICK, "user_id": None},
    "click without item_id": {k: v for k, v in CLICK.items() if k != "item_id"},
    "empty item_id on a click": {**CLICK, "item_id": ""},
    "search without query": {k: v for k, v in SEARCH.items() if k != "query"},
    "search with empty query": {**SEARCH, "query": ""},
    "unknown type": {**CLICK, "type": "hover"},
    "type of wrong case": {**CLICK, "type": "Click"},
    "user_id a number": {**CLICK, "user_id": 7},
    "event_id of 257 characters": {**CLICK, "event_id": "e" * 257},
    "query of 1001 characters": {**SEARCH, "query": "q" * 1001},
    "negative price": {**CLICK, "price": -0.01},
    "price a string": {**CLICK, "price": "9.99"},
    "price a boolean": {**CLICK, "price": True},
    "negative quantity": {**CLICK, "quantity": -1},
    "fractional quantity": {**CLICK, "quantity": 1.5},
    "boolean quantity": {**CLICK, "quantity": True},
    "context a list": {**CLICK, "context": [1]},
    "negative ts": {**CLICK, "ts": -1},
    "boolean ts": {**CLICK, "ts": True},
    "ts without offset": {**CLICK, "ts": "2019-10-01T00:00:01"},
    "ts on 30 February": {**CLICK, "ts": "2019-02-30T00:00:01Z"},
    "ts at a leap second": {**CLICK, "ts": "2016-12-31T23:59:60Z"},
}


@pytest.mark.parametrize("obj", REFUSED_EVENTS.values(), ids=REFUSED_EVENTS.keys())
def test_broken_event_is_refused_by_both_decoder_and_schema(obj: dict[str, Any]) -> None:
    assert decoder_verdict("event", obj)[0] is False
    assert validate("event", obj) != []


ITEM = {"item_id": "i9", "title": "Shoe"}
REFUSED_ITEMS = {
    "missing title": {"item_id": "i9"},
    "empty title": {**ITEM, "title": ""},
    "blank title": {**ITEM, "title": "   "},
    "title of control characters": {**ITEM, "title": "\x00\x1b\x85"},
    "title of 10001 characters": {**ITEM, "title": "t" * 10_001},
    "brand of 1001 characters": {**ITEM, "brand": "b" * 1001},
    "null available": {**ITEM, "available": None},
    "available a string": {**ITEM, "available": "yes"},
    "negative price": {**ITEM, "price": -1},
    "attributes a string": {**ITEM, "attributes": "x"},
}


@pytest.mark.parametrize("obj", REFUSED_ITEMS.values(), ids=REFUSED_ITEMS.keys())
def test_broken_catalog_item_is_refused_by_both_decoder_and_schema(obj: dict[str, Any]) -> None:
    assert decoder_verdict("catalog_item", obj)[0] is False
    assert validate("catalog_item", obj) != []


@pytest.mark.parametrize(
    ("name", "base", "field"),
    [
        ("event", CLICK, "event_id"),
        ("event", CLICK, "user_id"),
        ("event", CLICK, "item_id"),
        ("event", CLICK, "session_id"),
        ("event", SEARCH, "query"),
        ("catalog_item", ITEM, "item_id"),
        ("catalog_item", ITEM, "title"),
        ("catalog_item", ITEM, "description"),
        ("catalog_item", ITEM, "category"),
        ("catalog_item", ITEM, "brand"),
    ],
)
def test_string_length_limit_is_the_same_in_decoder_and_schema(name: str, base: dict[str, Any], field: str) -> None:
    limit = load_schema(name)["properties"][field]["maxLength"]
    assert decoder_verdict(name, {**base, field: "é" * limit})[0] is True  # counted in characters, not bytes
    assert validate(name, {**base, field: "é" * limit}) == []
    assert decoder_verdict(name, {**base, field: "é" * (limit + 1)})[0] is False
    assert validate(name, {**base, field: "é" * (limit + 1)}) != []


def test_a_number_too_large_for_a_double_is_refused_before_either_check() -> None:
    # JSON allows 1e400; orjson refuses to parse it, and the schema's maximum refuses the
    # infinity other parsers (JavaScript's JSON.parse) turn it into.
    with pytest.raises(DecodeError, match="malformed"):
        decode_event(b'{"event_id":"e","type":"click","user_id":"u","item_id":"i","ts":1e400}')
    assert validate("event", {**CLICK, "ts": float("inf")}) != []


def test_a_message_that_is_not_utf8_is_named_so() -> None:
    """orjson calls any byte that is not UTF-8 "surrogates not allowed"; the reason names the
    byte instead (a producer that wrote Latin-1 or UTF-16)."""
    for raw, byte in ((b"\xff\xfe\x00garbage", "0xff at offset 0"),
                      ('{"event_id":"e","type":"click","user_id":"u","item_id":"caf\u00e9","ts":1}'.encode("latin-1"),
                       "0xe9 at offset 59"),
                      ('{"event_id":"e"}'.encode("utf-16"), "0xff at offset 0")):
        with pytest.raises(DecodeError, match=f"payload: not UTF-8 text \\(byte {byte}\\); JSON messages are UTF-8"):
            decode_event(raw)
    with pytest.raises(DecodeError, match="malformed or truncated JSON"):  # UTF-8, not JSON
        decode_event("{\"event_id\": \"é".encode())


def test_control_characters_in_display_text_are_read_as_spaces() -> None:
    """A title, category, brand or query is shown to shoppers (reasons, search results) and
    printed to operators: its control characters are spaces (until 2026-12-07 an escape sequence
    in a title recoloured the terminal of whoever read the recommendations); a title left with no
    visible character is refused like an empty one."""
    item = decode_catalog_item(orjson.dumps({**ITEM, "title": "Lamp\n\x1b[31mRED\x07", "category": "a\tb",
                                              "brand": "x\x85y", "description": "para one\n\npara two"}))
    assert (item.title, item.category, item.brand) == ("Lamp  [31mRED ", "a b", "x y")
    assert item.description == "para one\n\npara two"  # not shown in reasons: kept as written
    search = decode_event(orjson.dumps({**SEARCH, "query": "bagels\n\x1b[2J"}))
    assert search.query == "bagels  [2J"
    with pytest.raises(DecodeError, match=r"field 'title': blank \(only spaces, control or invisible characters\)"):
        decode_catalog_item(orjson.dumps({**ITEM, "title": " \x00\x01 "}))


def test_a_search_whose_query_is_blank_is_refused_by_decoder_and_schema_alike() -> None:
    """A search for nothing: until 2026-12-07 a query of spaces (or only control characters, read
    as spaces) was accepted by the flow, answered "no match" and counted as a search, where
    `recsys search` refused the same query (an operator's probe); and an empty query was said to
    be "missing". Refused now like a blank title, with the reason naming what is wrong."""
    for query, reason in (("   ", "blank"), ("\x00\t\u200b", "blank"), ("", "empty string")):
        obj = {**SEARCH, "query": query}
        with pytest.raises(DecodeError, match=rf"^field 'query': {reason}"):
            decode_event(orjson.dumps(obj))
        assert validate("event", obj) != [], query
    with pytest.raises(DecodeError, match=r"^field 'query': missing \(required for search events\)$"):
        decode_event(orjson.dumps({k: v for k, v in SEARCH.items() if k != "query"}))
    for fine in (" tent ", "\u200btent"):  # a visible character is enough, as for titles
        assert decode_event(orjson.dumps({**SEARCH, "query": fine})).query and validate("event", {**SEARCH, "query": fine}) == []
    # on an event that is not a search the query is not read: a blank one changes nothing
    assert decode_event(orjson.dumps({**CLICK, "query": "   "})).type == "click" and validate("event", {**CLICK, "query": "   "}) == []


def test_an_rfc_3339_time_before_the_accepted_range_says_so() -> None:
    """Until 2026-12-07 a well-formed time before 1971 (the schema's pattern starts there) was
    refused as "not an RFC 3339 time", which it is: the reason now says it is out of range, as an
    epoch-millisecond time out of range says."""
    for ts in ("1970-01-01T00:00:00Z", "0000-01-01T00:00:00Z", "1969-12-31T23:59:59.999+00:00"):
        with pytest.raises(DecodeError, match=rf"^field 'ts': {re.escape(repr(ts))} is before 1971-01-01, the earliest "):
            decode_event(orjson.dumps({**CLICK, "ts": ts}))
        assert validate("event", {**CLICK, "ts": ts}) != []
    with pytest.raises(DecodeError, match=r"^field 'ts': not an RFC 3339 time \('2019-10-01 00:00:01Z'\)$"):
        decode_event(orjson.dumps({**CLICK, "ts": "2019-10-01 00:00:01Z"}))


def test_bidirectional_overrides_in_shown_text_become_spaces_and_invisible_titles_are_blank() -> None:
    """A catalog probe: a title with U+202E (right-to-left override) reached every reason and
    `recsys tail` line as it was, reversing what followed it on the terminal; a title of two zero-width
    spaces passed as not blank; an item id with a zero-width space was an item of its own that
    printed like another. The marks that mixed right-to-left text needs (RLM) are kept."""
    item = decode_catalog_item(orjson.dumps({**ITEM, "title": "\u202eevil gnihtemos \u2066x\u2069",
                                              "brand": "\u05e9\u05dc\u05d5\u05dd\u200f 2"}))
    assert item.title == "evil gnihtemos x" and item.brand == "\u05e9\u05dc\u05d5\u05dd\u200f 2"
    for invisible in ("\u200b\u200b", " \ufeff ", "\u2060", "\u202e"):
        raw = {**ITEM, "title": invisible}
        with pytest.raises(DecodeError, match=r"field 'title': blank"):
            decode_catalog_item(orjson.dumps(raw))
        assert validate("catalog_item", raw) != []
    for item_id in ("i\u200b5", "\ufeffi5", "i\u20605"):
        raw = {**ITEM, "item_id": item_id}
        with pytest.raises(DecodeError, match=r"field 'item_id': contains the control, bidirectional or invisible character U\+"):
            decode_catalog_item(orjson.dumps(raw))
        assert validate("catalog_item", raw) != []
    for spelled in ("\u0645\u06cc\u200c\u062e\u0648\u0627\u0647\u0645", "\U0001f468\u200d\U0001f469"):  # ZWNJ in Persian, ZWJ in an emoji
        raw = {**ITEM, "item_id": spelled}
        assert decode_catalog_item(orjson.dumps(raw)).item_id == spelled and validate("catalog_item", raw) == []


def _agree_on_every_code_point(schema: str, record: dict, field: str, decode) -> list[str]:
    """Code points U+0000-U+2FFF and U+FE00-U+FFFF (a surrogate aside), each alone and inside a word
    as the field's value: where the decoder and the schema disagree."""
    out = []
    for cp in [*range(0x3000), *range(0xFE00, 0x10000)]:
        if 0xD800 <= cp <= 0xDFFF:
            continue
        for value in (chr(cp), f"a{chr(cp)}b"):
            raw = {**record, field: value}
            try:
                decode(orjson.dumps(raw))
                ok = True
            except DecodeError:
                ok = False
            if ok != (validate(schema, raw) == []):
                out.append(f"U+{cp:04X} in {value!r}: decoder {'accepts' if ok else 'refuses'}")
    return out


def test_the_decoder_and_the_schemas_agree_on_every_character_of_an_id_and_a_title() -> None:
    """The ranges of characters refused in ids and not counted as visible in titles are written
    twice, in recsys/events.py and in the schemas' patterns: checked against each other for every
    code point of the first planes (a code review of 2026-12-07 compared them by hand)."""
    assert _agree_on_every_code_point("catalog_item", ITEM, "item_id", decode_catalog_item) == []
    assert _agree_on_every_code_point("catalog_item", ITEM, "title", decode_catalog_item) == []
    assert _agree_on_every_code_point("event", {"event_id": "e", "type": "click", "user_id": "u", "item_id": "i",
                                                "ts": 1}, "user_id", decode_event) == []


@settings(max_examples=200, deadline=None)
@given(rfc3339())
def test_date_time_format_check_agrees_with_the_decoder_and_implies_the_pattern(text: str) -> None:
    pattern = load_schema("event")["properties"]["ts"]["oneOf"][1]["pattern"]
    ok = schemas.is_rfc3339_date_time(text)
    assert ok == decoder_verdict("event", {**CLICK, "ts": text})[0]
    assert not ok or re.search(pattern, text) is not None


# --------------------------------------------------------------------------- re-encoding


@settings(max_examples=100, deadline=None)
@given(valid_events())
def test_an_accepted_event_re_encodes_to_a_valid_event(obj: dict[str, Any]) -> None:
    event = decode_event(orjson.dumps(obj))
    assume(0 <= event.ts < 2**63)  # before 1970 or past 64 bits: see the xfails below
    assert validate("event", orjson.loads(encode(event))) == []


@settings(max_examples=100, deadline=None)
@given(valid_catalog_items())
def test_an_accepted_catalog_item_re_encodes_to_a_valid_catalog_item(obj: dict[str, Any]) -> None:
    assert validate("catalog_item", orjson.loads(encode(decode_catalog_item(orjson.dumps(obj))))) == []


RECOMMENDATIONS = st.builds(
    Recommendation,
    user_id=st.text(),
    items=st.lists(
        st.builds(RecommendedItem, st.text(), st.floats(allow_nan=False, allow_infinity=False), st.text()), max_size=5
    ).map(tuple),
    trigger_event_id=st.text(),
    model_version=st.text(),
    event_ts=st.integers(-(2**63), 2**63 - 1),
    emitted_at=st.integers(0, 2**63 - 1),
)
DEAD_LETTERS = st.builds(
    DeadLetter,
    payload=st.binary(max_size=600),
    reason=st.text(),
    source=st.builds(SourcePosition, st.text(), st.integers(0, 2**31 - 1), st.integers(0, 2**63 - 1)),
    failed_at=st.integers(0, 2**63 - 1),
)


@settings(max_examples=200, deadline=None)
@given(RECOMMENDATIONS)
def test_every_recommendation_encodes_to_a_valid_recommendation(rec: Recommendation) -> None:
    assert validate("recommendation", orjson.loads(encode(rec))) == []


@settings(max_examples=100, deadline=None)
@given(RECOMMENDATIONS)
def test_a_recommendation_survives_encode_and_recommendation_from_dict(rec: Recommendation) -> None:
    assert recommendation_from_dict(orjson.loads(encode(rec))) == rec


@settings(max_examples=200, deadline=None)
@given(DEAD_LETTERS)
def test_every_dead_letter_encodes_to_a_valid_dead_letter(letter: DeadLetter) -> None:
    assert validate("dead_letter", orjson.loads(encode(letter))) == []


@settings(max_examples=100, deadline=None)
@given(DEAD_LETTERS)
def test_a_dead_letter_keeps_the_exact_payload_bytes(letter: DeadLetter) -> None:
    out = orjson.loads(encode(letter))
    assert base64.b64decode(out["payload_b64"], validate=True) == letter.payload
    assert out["payload_truncated"] is False and out["payload_size"] == len(letter.payload)
    assert out["payload_sha256"] == hashlib.sha256(letter.payload).hexdigest()


@pytest.mark.parametrize("size", [DEAD_LETTER_PAYLOAD_BYTES, DEAD_LETTER_PAYLOAD_BYTES + 1, 10 * 2**20])
def test_a_dead_letter_of_a_huge_message_keeps_a_bounded_prefix_its_size_and_hash(size: int) -> None:
    payload = bytes(range(256)) * (size // 256) + b"z" * (size % 256)
    encoded = encode(DeadLetter(payload, "payload: oversized", SourcePosition("events", 0, 1)))
    out = orjson.loads(encoded)
    assert validate("dead_letter", out) == []
    assert len(encoded) < 400_000  # fits a producer's default 1 MB request, whatever the message size
    assert base64.b64decode(out["payload_b64"]) == payload[:DEAD_LETTER_PAYLOAD_BYTES]
    assert out["payload_truncated"] is (size > DEAD_LETTER_PAYLOAD_BYTES)
    assert out["payload_size"] == size and out["payload_sha256"] == hashlib.sha256(payload).hexdigest()


def test_the_superseded_v1_dead_letter_schema_still_validates_its_own_example() -> None:
    assert validate("dead_letter.v1", load_schema("dead_letter.v1")["examples"][0]) == []


def test_validate_reports_each_broken_field_by_path() -> None:
    errors = validate("recommendation", {**Recommendation("u", (), "e", "m", 0, 0).to_dict(), "items": [{"item_id": 1}]})
    assert errors[0].startswith("items/0")
    assert any("score" in e for e in errors) and any("item_id" in e for e in errors)


# --------------------------------------------------------------------------- known differences
# Each asserts the agreement we want; each fails today; the decoder needs tightening
# (reported to the lead; recsys/events.py is not this module's to change).

LAX_TS_STRINGS = {
    "space separator": "2019-10-01 00:00:01Z",
    "any separator": "2019-10-01X00:00:01Z",
    "no seconds": "2019-10-01T00:00Z",
    "hour only": "2019-10-01T00Z",
    "basic format": "20191001T000001Z",
    "offset without minutes": "2019-10-01T00:00:01+00",
    "offset without colon": "2019-10-01T00:00:01+0000",
    "offset with seconds": "2019-10-01T00:00:01+00:00:00",
    "week date": "2019-W40-1T00:00:01Z",
    "comma fraction": "2019-10-01T00:00:01,5Z",
    "empty fraction": "2019-10-01T00:00:01.Z",
}


@pytest.mark.parametrize("text", LAX_TS_STRINGS.values(), ids=LAX_TS_STRINGS.keys())
def test_decoder_refuses_ts_strings_that_are_not_rfc3339(text: str) -> None:
    assert_agree("event", {**CLICK, "ts": text})


@pytest.mark.xfail(strict=True, reason="the decoder refuses context nested deeper than MAX_NESTING; JSON Schema cannot count depth")
def test_decoder_and_schema_agree_on_a_deeply_nested_context() -> None:
    deep: dict[str, Any] = {}
    for _ in range(20):
        deep = {"a": deep}
    assert_agree("event", {**CLICK, "context": deep})


def test_decoder_and_schema_agree_on_an_integral_float_quantity() -> None:
    assert_agree("event", {**CLICK, "quantity": 2.0})


def test_an_accepted_pre_1970_event_re_encodes_to_a_valid_event() -> None:
    try:
        event = decode_event(orjson.dumps({**CLICK, "ts": "1969-12-31T23:59:59Z"}))
    except DecodeError:
        return  # refusing it is a fix too
    assert validate("event", orjson.loads(encode(event))) == []


def test_an_accepted_event_with_a_huge_ts_re_encodes() -> None:
    # Recommendation.event_ts copies Event.ts, so this would also break encoding its recommendation.
    try:
        event = decode_event(orjson.dumps({**CLICK, "ts": 1e20}))
    except DecodeError:
        return  # refusing it is a fix too
    assert validate("event", orjson.loads(encode(event))) == []


# --------------------------------------------------------------------------- search results (issue 13)

SEARCH_RESULTS = st.builds(
    SearchResult,
    user_id=st.text(),
    query=st.text(),
    items=st.lists(
        st.builds(RecommendedItem, st.text(), st.floats(allow_nan=False, allow_infinity=False), st.text()), max_size=5
    ).map(tuple),
    no_match=st.booleans(),
    trigger_event_id=st.text(),
    model_version=st.text(),
    event_ts=st.integers(-(2**63), 2**63 - 1),
    emitted_at=st.integers(0, 2**63 - 1),
).map(lambda r: dataclasses.replace(r, no_match=not r.items))  # the engine's rule, which the schema holds it to



def test_search_result_schema_lists_exactly_what_to_dict_emits() -> None:
    schema = load_schema("search_result")
    emitted = SearchResult("u", "tent", (RecommendedItem("i", 1.0, "r"),), False, "e", "m", 0, 0).to_dict()
    assert set(schema["properties"]) == set(emitted)
    assert set(emitted) == {f.name for f in dataclasses.fields(SearchResult)} | {"schema_version"}
    assert set(schema["required"]) == set(emitted)


@settings(max_examples=200, deadline=None)
@given(SEARCH_RESULTS)
def test_every_search_result_encodes_to_a_valid_search_result(result: SearchResult) -> None:
    assert validate("search_result", orjson.loads(encode(result))) == []


@settings(max_examples=100, deadline=None)
@given(SEARCH_RESULTS)
def test_a_search_result_survives_encode_and_search_result_from_dict(result: SearchResult) -> None:
    assert search_result_from_dict(orjson.loads(encode(result))) == result


def test_a_search_result_with_no_item_says_no_match_and_one_with_items_does_not() -> None:
    """What the engine emits since 2026-12-07 (an empty answer with ``no_match: false`` before)."""
    empty = SearchResult("u", "tent", (), True, "e", "m", 0, 0).to_dict()
    one = SearchResult("u", "tent", (RecommendedItem("i", 1.0, "r"),), False, "e", "m", 0, 0).to_dict()
    assert validate("search_result", empty) == [] and validate("search_result", one) == []
    assert validate("search_result", {**empty, "no_match": False}) != []
    assert validate("search_result", {**one, "no_match": True}) != []


def test_a_search_result_missing_its_query_is_refused() -> None:
    obj = SearchResult("u", "tent", (), True, "e", "m", 0, 0).to_dict()
    del obj["query"]
    assert any("query" in e for e in validate("search_result", obj))


def test_a_recommendation_encodes_to_the_bytes_of_its_dict() -> None:
    """``encode`` lets orjson write a recommendation's items itself (the hot path, issue 12): the
    bytes must be those of ``to_dict()`` (field order, escapes, non-ASCII, float formatting), and
    they read back to the same recommendation."""
    import orjson

    from recsys.events import Recommendation, RecommendedItem, encode, recommendation_from_dict

    items = (RecommendedItem("i\u00e9 \"1\"", 0.1 + 0.2, "similar to \u00abTent\u00bb you viewed (similarity 0.93)"),
             RecommendedItem("i2", 1e-7, ""), RecommendedItem("\U0001f600", -3.0, "trending"))
    for rec in (Recommendation("u\n1", items, "e1", "head-3@x7", 1_700_000_000_000, 1_700_000_000_123),
                Recommendation("u2", (), "e2", "m", 0, 0)):
        assert encode(rec) == orjson.dumps(rec.to_dict())
        assert recommendation_from_dict(orjson.loads(encode(rec))) == rec


@pytest.mark.parametrize("again", ["false", "0", "no", 0, 1, [], {}])
def test_repeat_purchase_of_another_type_than_true_false_or_null_is_refused_by_both(again) -> None:
    """A catalog probe: ``"repeat_purchase": "false"`` was read with bool() as true, and the item
    came back to a shopper who had bought it, explained "you buy this often"."""
    raw = orjson.dumps({"item_id": "rp", "title": "Coffee beans", "attributes": {"repeat_purchase": again}})
    with pytest.raises(DecodeError, match=r"^field 'attributes.repeat_purchase': expected true or false, got "):
        decode_catalog_item(raw)
    assert validate("catalog_item", orjson.loads(raw)) != []
    for fine, marked in ((True, True), (False, False), (None, False)):
        raw = orjson.dumps({"item_id": "rp", "title": "Coffee beans", "attributes": {"repeat_purchase": fine}})
        assert decode_catalog_item(raw).repeat_purchase is marked and validate("catalog_item", orjson.loads(raw)) == []


def test_a_refusal_names_json_types_not_pythons() -> None:
    with pytest.raises(DecodeError, match=r"^field 'available': expected a boolean, got null$"):
        decode_catalog_item(b'{"item_id": "a", "title": "t", "available": null}')
    with pytest.raises(DecodeError, match=r"^payload: expected a JSON object, got an array$"):
        decode_catalog_item(b"[1, 2]")
    with pytest.raises(DecodeError, match=r"^field 'user_id': expected a string, got a number$"):
        decode_event(b'{"event_id": "e", "type": "click", "user_id": 7, "item_id": "i", "ts": 1}')
