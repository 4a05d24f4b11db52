"""The JSON Schemas in ``schemas/``: find them, load them, validate objects against them.

The schemas are the contract with producers and consumers in other languages. The hot path
never uses them (it decodes with the hand-written :func:`recsys.events.decode_event`);
they serve tests, tooling and users checking their own producers. ``jsonschema`` is
imported only inside :func:`validate`, since it is a test/tooling dependency.

Names are the file stems without the version (``"event"``, ``"catalog_item"``,
``"recommendation"``, ``"dead_letter"``), meaning the current version (``v1``; ``v2`` for
the dead letter); a versioned stem (``"dead_letter.v1"``) works too.

>>> load_schema("event")["$id"]
'urn:streamrec:schema:event.v1'
>>> validate("event", {"event_id": "e1", "type": "click", "user_id": "u1", "item_id": "i9", "ts": 0})
[]
>>> validate("event", {"event_id": "e1", "type": "hover", "user_id": "u1", "item_id": "i9", "ts": 0})
["type: 'hover' is not one of ['browse', 'click', 'add_to_cart', 'purchase', 'search']"]
"""

from __future__ import annotations

import functools
import json
from datetime import date
from pathlib import Path
from typing import Any

from recsys.events import DEAD_LETTER_SCHEMA_VERSION, RFC3339_DATE_TIME, SCHEMA_VERSION

#: The repository's ``schemas/`` directory (next to the ``recsys`` package; an editable
#: install keeps that layout).
SCHEMA_DIR = Path(__file__).resolve().parent.parent / "schemas"

#: Every schema, by name.
SCHEMA_NAMES: tuple[str, ...] = ("event", "catalog_item", "recommendation", "dead_letter", "control", "search_result")  # search_result: issue 13
#: The current version of each schema whose version is not :data:`SCHEMA_VERSION`.
CURRENT_VERSIONS: dict[str, int] = {"dead_letter": DEAD_LETTER_SCHEMA_VERSION}

# RFC 3339 date-time syntax as the schemas' ``pattern`` spells it (``[0-9]``, not ``\d``,
# which in Python also matches non-ASCII digits). Used for the ``date-time`` format check.
_DATE_TIME = RFC3339_DATE_TIME


def schema_path(name: str) -> Path:
    """Path of the schema file ``name`` (``"event"`` -> ``SCHEMA_DIR/event.v1.json``)."""
    stem = name.removesuffix(".json")
    if ".v" not in stem:
        stem = f"{stem}.v{CURRENT_VERSIONS.get(stem, SCHEMA_VERSION)}"
    return SCHEMA_DIR / f"{stem}.json"


def load_schema(name: str) -> dict[str, Any]:
    """The parsed schema ``name``: a fresh dict on every call, safe to modify."""
    path = schema_path(name)
    if not path.is_file():
        raise FileNotFoundError(f"no schema {name!r}: {path} does not exist (known: {', '.join(SCHEMA_NAMES)})")
    return json.loads(path.read_text(encoding="utf-8"))


def is_rfc3339_date_time(instance: object) -> bool:
    """The ``date-time`` format: RFC 3339 syntax (as in the schemas) and a real calendar day.

    Non-strings pass (formats only constrain strings). Leap seconds (``:60``) are refused,
    as :func:`recsys.events.parse_ts` refuses them.

    >>> is_rfc3339_date_time("2024-02-29T12:00:00Z"), is_rfc3339_date_time("2023-02-29T12:00:00Z")
    (True, False)
    """
    if not isinstance(instance, str):
        return True
    match = _DATE_TIME.fullmatch(instance)
    if match is None:
        return False
    try:
        date(int(match[1]), int(match[2]), int(match[3]))
    except ValueError:
        return False
    return True


@functools.lru_cache(maxsize=None)
def _validator(name: str) -> Any:
    import jsonschema  # noqa: PLC0415 - test/tooling dependency, kept off the import path

    # jsonschema checks "date-time" only when the optional rfc3339-validator is installed;
    # ours always runs, so results do not depend on what else happens to be installed.
    checker = jsonschema.FormatChecker()
    checker.checks("date-time")(is_rfc3339_date_time)
    return jsonschema.Draft202012Validator(load_schema(name), format_checker=checker)


def validate(name: str, obj: Any) -> list[str]:
    """Every way ``obj`` breaks schema ``name``, as ``"path: message"`` lines; ``[]`` if valid.

    Formats are asserted (``date-time`` via :func:`is_rfc3339_date_time`).
    """
    errors = sorted(_validator(name).iter_errors(obj), key=lambda e: (list(map(str, e.absolute_path)), e.message))
    return [f"{'/'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}" for e in errors]
