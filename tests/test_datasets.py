"""Dataset adapters: real public logs in ../shared/data, tiny files in tmp_path, JSONL round trip."""

from __future__ import annotations

import os
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from recsys.datasets import FORMATS, Dataset, load_dataset, write_jsonl
from recsys.datasets.completejourney import package_data_dir
from recsys.events import EVENT_TYPES, CatalogItem, Event

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"  # ../shared/data beside the repository
REES46 = DATA / "rees46" / "2019-Oct_head17k.csv"
DIGINETICA = DATA / "diginetica"
YOOCHOOSE = DATA / "yoochoose"


def _need(path: Path) -> None:
    if not path.exists():
        pytest.skip(f"{path} is absent (public logs live in ../shared/data, not in the repository)")


def _data_lines(path: Path) -> int:
    """Lines after the header, counting a last line without a newline."""
    raw = path.read_bytes()
    return raw.count(b"\n") + (0 if raw.endswith(b"\n") else 1) - 1


@pytest.fixture(scope="module")
def rees46() -> Dataset:
    _need(REES46)
    return load_dataset("rees46", str(REES46))


@pytest.fixture(scope="module")
def diginetica() -> Dataset:
    _need(DIGINETICA)
    return load_dataset("diginetica", str(DIGINETICA))


@pytest.fixture(scope="module")
def yoochoose() -> Dataset:
    _need(YOOCHOOSE)
    return load_dataset("yoochoose", str(YOOCHOOSE))


@pytest.fixture(scope="module")
def completejourney() -> Dataset:
    return load_dataset("completejourney", None, limit=50_000)


REAL = ["rees46", "diginetica", "yoochoose", "completejourney"]


# --------------------------------------------------------------------------- every adapter


def test_unknown_format_is_refused_with_the_list_of_formats() -> None:
    with pytest.raises(ValueError, match="expected one of completejourney, csv, diginetica, jsonl, rees46, yoochoose"):
        load_dataset("parquet", "x.parquet")
    assert set(FORMATS) == {"jsonl", "rees46", "diginetica", "yoochoose", "completejourney", "csv"}


@pytest.mark.data
@pytest.mark.parametrize("name", REAL)
def test_events_are_sorted_by_time(name: str, request: pytest.FixtureRequest) -> None:
    ds: Dataset = request.getfixturevalue(name)
    ts = [e.ts for e in ds.events]
    assert ts == sorted(ts)


@pytest.mark.data
@pytest.mark.parametrize("name", REAL)
def test_ids_are_strings_and_event_ids_unique_and_prefixed(name: str, request: pytest.FixtureRequest) -> None:
    ds: Dataset = request.getfixturevalue(name)
    assert all(isinstance(e.user_id, str) and e.user_id for e in ds.events)
    assert all(isinstance(e.item_id, str) and e.item_id for e in ds.events)
    assert all(isinstance(e.ts, int) and e.type in EVENT_TYPES for e in ds.events)
    ids = [e.event_id for e in ds.events]
    assert len(set(ids)) == len(ids)
    assert all(i.startswith(f"{name}:") for i in ids)


@pytest.mark.data
@pytest.mark.parametrize("name", REAL)
def test_catalog_has_exactly_the_items_the_events_touch(name: str, request: pytest.FixtureRequest) -> None:
    ds: Dataset = request.getfixturevalue(name)
    catalog_ids = [c.item_id for c in ds.catalog]
    assert len(set(catalog_ids)) == len(catalog_ids)
    assert set(catalog_ids) == {e.item_id for e in ds.events}
    assert all(c.title for c in ds.catalog)


def test_event_ids_are_deterministic_across_loads() -> None:
    _need(REES46)
    a = load_dataset("rees46", str(REES46), limit=500)
    b = load_dataset("rees46", str(REES46), limit=500)
    assert [e.event_id for e in a.events] == [e.event_id for e in b.events]


# --------------------------------------------------------------------------- REES46


@pytest.mark.data
def test_rees46_loads_every_complete_line_with_readme_type_counts(rees46: Dataset) -> None:
    assert _data_lines(REES46) == 17_435
    assert len(rees46.events) == 17_434
    assert rees46.stats()["types"] == {"add_to_cart": 165, "browse": 17_055, "purchase": 214}
    assert rees46.stats()["users"] == 4_504 and rees46.stats()["items"] == 6_493


@pytest.mark.data
def test_rees46_truncated_last_line_is_reported_not_fatal(rees46: Dataset) -> None:
    assert rees46.skipped == {"truncated row": 1}
    assert rees46.examples == ["truncated row at line 17436 of 2019-Oct_head17k.csv: 8 of 9 fields"]
    assert "rees46:17436" not in {e.event_id for e in rees46.events}


@pytest.mark.data
def test_rees46_first_row_becomes_a_browse_event(rees46: Dataset) -> None:
    first = next(e for e in rees46.events if e.event_id == "rees46:2")
    assert first == Event(
        "rees46:2", "browse", "541312140", "44600062", 1569888000000, "72d76fde-8bb3-4e00-8c23-a032dfed738c", price=35.79
    )


@pytest.mark.data
def test_rees46_catalog_titles_come_from_category_code_and_brand(rees46: Dataset) -> None:
    by_id = {c.item_id: c for c in rees46.catalog}
    water_heater = by_id["3900821"]
    assert water_heater.title == "appliances environment water_heater aqua"
    assert water_heater.category == "appliances.environment.water_heater"
    assert water_heater.brand == "aqua" and water_heater.price == 33.20
    assert by_id["44600062"].title == "shiseido" and by_id["44600062"].category is None
    nameless = [c for c in rees46.catalog if c.category is None and c.brand is None]
    assert nameless and all(c.title == f"item {c.item_id}" for c in nameless)


def test_rees46_remove_from_cart_is_skipped_with_its_reason(tmp_path: Path) -> None:
    path = tmp_path / "rees.csv"
    path.write_text(
        "event_time,event_type,product_id,category_id,category_code,brand,price,user_id,user_session\n"
        "2019-10-01 00:00:05 UTC,cart,1,9,electronics.smartphone,samsung,100.00,7,s1\n"
        "2019-10-01 00:00:06 UTC,remove_from_cart,1,9,electronics.smartphone,samsung,100.00,7,s1\n"
        "2019-10-01 00:00:01 UTC,view,1,9,electronics.smartphone,samsung,90.50,7,s1\n"
        "2019-10-01 00:00:07 UTC,purchase,2,9,,,12.00,8,\n"
    )
    ds = load_dataset("rees46", str(path))
    assert [(e.event_id, e.type) for e in ds.events] == [
        ("rees46:4", "browse"), ("rees46:2", "add_to_cart"), ("rees46:5", "purchase")
    ]
    assert ds.skipped == {"unsupported event_type 'remove_from_cart'": 1}
    assert ds.examples == ["unsupported event_type 'remove_from_cart' at line 3 of rees.csv"]
    assert ds.catalog[0] == CatalogItem(
        "1", "electronics smartphone samsung", category="electronics.smartphone", brand="samsung",
        price=100.0, attributes={"category_id": "9"},
    )  # the latest price (00:00:05), not the last line's (00:00:01)
    assert ds.catalog[1].title == "item 2" and ds.events[2].session_id is None


# --------------------------------------------------------------------------- DIGINETICA


@pytest.mark.data
def test_diginetica_loads_all_views_and_purchases(diginetica: Dataset) -> None:
    assert _data_lines(DIGINETICA / "sample_train-item-views.csv") == 12_391
    assert _data_lines(DIGINETICA / "train-purchases.csv") == 18_025
    assert diginetica.stats()["types"] == {"click": 12_391, "purchase": 18_025}
    assert not diginetica.skipped


@pytest.mark.data
def test_diginetica_time_is_midnight_utc_plus_timeframe_and_anonymous_users_are_sessions(diginetica: Dataset) -> None:
    first_view = next(e for e in diginetica.events if e.event_id == "diginetica:views:2")
    # 1;NA;81766;526309;2016-05-09
    assert (first_view.user_id, first_view.session_id, first_view.item_id) == ("s1", "1", "81766")
    assert first_view.ts == 1462752000000 + 526309
    purchase = next(e for e in diginetica.events if e.event_id == "diginetica:purchases:2")
    # 150;18278;17100868;2016-05-06;16421;25911
    assert (purchase.type, purchase.user_id, purchase.item_id, purchase.context) == ("purchase", "18278", "25911", {"order": "16421"})
    assert purchase.ts == 1462492800000 + 17100868


@pytest.mark.data
def test_diginetica_catalog_is_ids_with_category(diginetica: Dataset) -> None:
    by_id = {c.item_id: c for c in diginetica.catalog}
    assert by_id["81766"].title == "item 81766"
    assert sum(c.category is not None for c in diginetica.catalog) > 0.9 * len(diginetica.catalog)
    assert all(c.category.startswith("category ") for c in diginetica.catalog if c.category)


@pytest.mark.data
def test_diginetica_views_file_path_finds_its_siblings(diginetica: Dataset) -> None:
    via_file = load_dataset("diginetica", str(DIGINETICA / "sample_train-item-views.csv"))
    assert via_file.events == diginetica.events and via_file.catalog == diginetica.catalog


# --------------------------------------------------------------------------- YooChoose


@pytest.mark.data
def test_yoochoose_directory_is_train_full_plus_test(yoochoose: Dataset) -> None:
    train = YOOCHOOSE / "yoochoose-clicks-100k_train_full.txt"
    test = YOOCHOOSE / "yoochoose-clicks-100k_test.txt"
    assert len(yoochoose.events) == _data_lines(train) + _data_lines(test) == 83_846
    assert len(load_dataset("yoochoose", str(test)).events) == _data_lines(test)
    assert yoochoose.stats()["sessions"] == 21_210 and len(yoochoose.catalog) == 2_933


@pytest.mark.data
def test_yoochoose_user_is_the_session_and_time_is_ms(yoochoose: Dataset) -> None:
    # test file line 2: 1	214536502	1396860669.277
    e = next(e for e in yoochoose.events if e.event_id == "yoochoose:yoochoose-clicks-100k_test:2")
    assert (e.type, e.user_id, e.session_id, e.item_id, e.ts) == ("click", "1", "1", "214536502", 1396860669277)


# --------------------------------------------------------------------------- Complete Journey


def test_completejourney_limit_loads_that_many_purchases(completejourney: Dataset) -> None:
    assert len(completejourney.events) == 50_000
    assert completejourney.stats()["types"] == {"purchase": 50_000}


def test_completejourney_price_is_sales_value_per_unit(completejourney: Dataset) -> None:
    rows = pq.read_table(os.path.join(package_data_dir(), "transactions.parquet")).slice(0, 50_000).to_pylist()
    by_id = {e.event_id: e for e in completejourney.events}
    for line in (1, 2, 777, 50_000):
        row, event = rows[line - 1], by_id[f"completejourney:{line}"]
        assert event.user_id == str(row["household_id"]) and event.session_id == str(row["basket_id"])
        assert event.item_id == str(row["product_id"]) and event.quantity == row["quantity"]
        if row["quantity"]:
            assert event.price == pytest.approx(row["sales_value"] / row["quantity"], abs=1e-4)
        else:
            assert event.price is None


def test_completejourney_catalog_has_grocery_text_and_repeat_purchase(completejourney: Dataset) -> None:
    assert all(c.repeat_purchase for c in completejourney.catalog)
    described = [c for c in completejourney.catalog if c.category and "/" in c.category]
    assert len(described) > 0.9 * len(completejourney.catalog)
    assert any(c.description and c.description.startswith("size ") for c in completejourney.catalog)
    assert {c.brand for c in completejourney.catalog} <= {"National", "Private", None}
    item = described[0]
    dept, cat = item.category.split("/", 1)
    assert dept in item.title and cat in item.title


def test_completejourney_accepts_dash_and_directory_for_the_package_data() -> None:
    a = load_dataset("completejourney", "-", limit=100)
    b = load_dataset("completejourney", package_data_dir(), limit=100)
    assert a.events == b.events and len(a.events) == 100


# --------------------------------------------------------------------------- generic CSV


def _tiny_csv(tmp_path: Path) -> Path:
    path = tmp_path / "shop.csv"
    path.write_text(
        "when;who;what;kind;cost\n"
        "2024-01-01T00:00:02Z;u1;i1;view;\n"
        "2024-01-01T00:00:01Z;u2;i2;buy;9.5\n"
        "yesterday;u1;i3;view;1\n"
        "2024-01-01T00:00:03Z;u1;i1;view\n"
        "2024-01-01T00:00:04Z;u3;i4;hover;1\n"
        "2024-01-01T00:00:05;u3;i4;view;2\n"
    )
    return path


MAPPING = {
    "ts": "when", "user_id": "who", "item_id": "what", "type": "kind", "price": "cost",
    "ts_unit": "iso", "type_map": {"view": "browse", "buy": "purchase"}, "delimiter": ";",
}


def test_generic_csv_maps_columns_and_sorts(tmp_path: Path) -> None:
    ds = load_dataset("csv", str(_tiny_csv(tmp_path)), mapping=MAPPING)
    assert ds.name == "shop"
    assert [(e.event_id, e.type, e.user_id, e.item_id, e.ts, e.price) for e in ds.events] == [
        ("shop:3", "purchase", "u2", "i2", 1704067201000, 9.5),
        ("shop:2", "browse", "u1", "i1", 1704067202000, None),
        ("shop:7", "browse", "u3", "i4", 1704067205000, 2.0),
    ]


def test_generic_csv_counts_bad_rows_by_reason(tmp_path: Path) -> None:
    ds = load_dataset("csv", str(_tiny_csv(tmp_path)), mapping=MAPPING)
    assert ds.skipped == {"bad ts": 1, "truncated row": 1, "invalid field 'type'": 1}
    assert ds.examples[0] == "bad ts at line 4 of shop.csv: 'yesterday'"
    assert ds.examples[1] == "truncated row at line 5 of shop.csv: 4 of 5 fields"
    assert ds.examples[2].startswith("invalid field 'type' at line 6 of shop.csv: field 'type': unknown event type 'hover'")


def test_rows_that_are_not_utf8_are_skipped_by_name_not_merged(tmp_path: Path) -> None:
    """A Latin-1 export read as UTF-8 had its odd bytes replaced by U+FFFD, so the items thé, thè
    and thê all became one item, without a word (an operator's probe, 2026-12-06)."""
    path = tmp_path / "latin1.csv"
    path.write_bytes("user,item,ts\nu1,thé,1000\nu1,thè,2000\nu2,tea,3000\nu2,thê,4000\n".encode("latin-1"))
    ds = load_dataset("csv", str(path), mapping={"user_id": "user", "item_id": "item", "ts": "ts"})
    assert [e.item_id for e in ds.events] == ["tea"] and ds.skipped == {"not UTF-8 text": 3}
    assert ds.examples[0] == ("not UTF-8 text at line 2 of latin1.csv: byte b'\\xe9' (Latin-1 or cp1252? convert the "
                              "file: iconv -f cp1252 -t utf-8)")


def test_a_csv_read_with_the_wrong_time_unit_or_delimiter_says_which_to_give(tmp_path: Path) -> None:
    """Every row "bad ts", or a header that "lacks" the columns it has: the message now names the
    --map that reads them (an operator's probe, 2026-12-06)."""
    iso = tmp_path / "iso.csv"
    iso.write_text("user,item,ts\nu1,i1,2024-01-01T00:00:02Z\n")
    ds = load_dataset("csv", str(iso), mapping={"user_id": "user", "item_id": "item", "ts": "ts"})
    assert ds.examples == ["bad ts at line 2 of iso.csv: '2024-01-01T00:00:02Z' (a date and time: --map ts_unit=iso)"]
    # milliseconds read as seconds, microseconds as milliseconds: until 2026-12-07 "not a valid
    # epoch-millisecond time (1569888000000000)", a number 1,000 times what the file holds
    ms = tmp_path / "ms.csv"
    ms.write_text("user,item,ts\nu1,i1,1569888000000\n")
    ds = load_dataset("csv", str(ms), mapping={"user_id": "user", "item_id": "item", "ts": "ts", "ts_unit": "s"})
    assert ds.examples == ["bad ts at line 2 of ms.csv: '1569888000000' is past the year 9999 as epoch seconds "
                           "(epoch milliseconds, it seems: drop --map ts_unit=s)"]
    us = tmp_path / "us.csv"
    us.write_text("user,item,ts\nu1,i1,1569888000000000\n")
    ds = load_dataset("csv", str(us), mapping={"user_id": "user", "item_id": "item", "ts": "ts"})
    assert "(epoch microseconds, it seems: give milliseconds" in ds.examples[0], ds.examples
    semi = tmp_path / "semi.csv"
    semi.write_text("user;item;ts\nu1;i1;1000\n")
    with pytest.raises(ValueError, match=r"lacks column\(s\) \['user', 'item', 'ts'\] \(it looks separated by ';': with "
                                         r"--format csv, --map delimiter=;\)"):
        load_dataset("csv", str(semi), mapping={"user_id": "user", "item_id": "item", "ts": "ts"})


def test_a_fixed_format_file_with_another_delimiter_is_told_to_read_as_csv(tmp_path: Path) -> None:
    """A YooChoose file written with commas was told ``with --format csv, --map delimiter=,``: a
    flag of another format, whose value is its default (an operator's probe, 2026-12-07). The
    fixed formats say which delimiter they read and how to read this file instead."""
    comma = tmp_path / "clicks.txt"
    comma.write_text("SessionId,Time,ItemId\n1,1400000000,a\n")
    with pytest.raises(ValueError) as raised:
        load_dataset("yoochoose", str(comma))
    said = str(raised.value)
    assert "delimiter=," not in said, said
    assert said.endswith("(it looks separated by ',': --format yoochoose reads tab-separated files; convert this "
                         "one, or read it with --format csv and --map FIELD=COLUMN for its columns)"), said
    semi = tmp_path / "events.csv"
    semi.write_text("event_time;event_type;product_id;user_id;user_session\n")
    with pytest.raises(ValueError, match=r"\(it looks separated by ';': --format rees46 reads comma-separated files; "
                                         r"convert this one, or read it with --format csv and --map delimiter=; and "
                                         r"--map FIELD=COLUMN for its columns\)$"):
        load_dataset("rees46", str(semi))


def test_a_query_log_time_out_of_range_is_a_skipped_row(tmp_path: Path) -> None:
    from recsys.search.querylog import load_query_log

    log = tmp_path / "log.csv"
    log.write_text("uid,q,qt,item,et\nu1,tent,inf,i9,5000\nu2,tent,1700000000000,i9,1700000001000\nu3,tent,1e20,i9,\n")
    mapping = {"user_id": "uid", "query": "q", "query_ts": "qt", "item_id": "item", "ts": "et"}
    ds, targets = load_query_log(str(log), mapping)
    assert ds.skipped == {"bad query time": 2} and list(targets) == ["querylog:3:s"]


def test_a_query_log_row_the_flow_would_refuse_or_that_cannot_be_scored_is_skipped_by_name(tmp_path: Path) -> None:
    """Until 2026-12-07 (forty-seventh session) a query over 1,000 characters was cut to its first
    1,000 (the flow refuses such a search), an engagement logged before its search was moved to
    1 ms after it and scored, both without a word, and a tab-separated log read with the default
    delimiter was told to use ``--format csv``, which a query log does not take."""
    from recsys.search.querylog import load_query_log

    log = tmp_path / "log.csv"
    log.write_text("uid,q,qt,item,et\n"
                   f"u1,{'tent ' * 250},1000,i9,5000\n"  # 1,250 characters
                   "u2,tent,9000,i9,4000\n"  # engaged 5 s before the search
                   "u3,tent,9000,i9,9000\n"  # the same millisecond: 1 ms after it, scored
                   "u4,tent,9000,i9,9500\n")
    mapping = {"user_id": "uid", "query": "q", "query_ts": "qt", "item_id": "item", "ts": "et"}
    ds, targets = load_query_log(str(log), mapping)
    assert ds.skipped == {"invalid field 'query'": 1, "engagement before its search": 1}, ds.skipped
    assert sorted(targets) == ["querylog:4:s", "querylog:5:s"]
    assert [e.user_id for e in ds.events if e.type == "search"] == ["u2", "u3", "u4"]  # u2's search is replayed
    assert {e.user_id: e.ts for e in ds.events if e.type == "click"} == {"u3": 9001, "u4": 9500}
    assert any("engagement before its search at line 3 of log.csv" in x and "not scored" in x for x in ds.examples)
    tsv = tmp_path / "log.tsv"
    tsv.write_text("uid\tq\tqt\nu1\ttent\t1000\n")
    with pytest.raises(ValueError, match=r"\(it looks separated by '\\t': --map delimiter=tab\)$"):
        load_query_log(str(tsv), mapping)


def test_a_query_log_maps_its_own_engagement_types(tmp_path: Path) -> None:
    """A query log's raw engagement types (``view``, ``buy``) were all skipped as unknown: the
    query log took no ``type_map``, where ``--format csv`` does (an operator's probe, 2026-12-07)."""
    from recsys.search.querylog import load_query_log

    log = tmp_path / "log.csv"
    log.write_text("uid,q,qt,item,et,kind\nu1,tent,1000,i9,5000,view\nu2,tent,2000,i8,6000,buy\n"
                   "u3,tent,3000,i7,7000,wishlist\n")
    mapping = {"user_id": "uid", "query": "q", "query_ts": "qt", "item_id": "item", "ts": "et", "type": "kind",
               "type_map": "view:click,buy:purchase"}
    ds, targets = load_query_log(str(log), mapping)
    assert {e.user_id: e.type for e in ds.events if e.type != "search"} == {"u1": "click", "u2": "purchase"}
    assert sorted(targets.values()) == ["i8", "i9"]
    assert ds.skipped == {"unknown engagement type": 1}, ds.skipped  # wishlist: not in the map, still named
    with pytest.raises(ValueError, match=r"type_map.*'basket' is not one of"):
        load_query_log(str(log), {**mapping, "type_map": "buy:basket"})


def test_generic_csv_default_type_and_seconds(tmp_path: Path) -> None:
    path = tmp_path / "clicks.tsv"
    path.write_text("sid\titem\tt\n7\ta\t1700000000.5\n8\tb\t1700000001\n")
    ds = load_dataset(
        "csv", str(path), mapping={"user_id": "sid", "session_id": "sid", "item_id": "item", "ts": "t", "ts_unit": "s", "delimiter": "\t"}
    )
    assert [(e.type, e.user_id, e.session_id, e.ts) for e in ds.events] == [
        ("click", "7", "7", 1700000000500), ("click", "8", "8", 1700000001000)
    ]
    assert [c.title for c in ds.catalog] == ["item a", "item b"]


def test_generic_csv_reads_a_catalog_csv(tmp_path: Path) -> None:
    events = tmp_path / "e.csv"
    events.write_text("u,i,t\nu1,i1,5\n")
    catalog = tmp_path / "c.csv"
    catalog.write_text("item_id,title,brand,price\ni1,Blue mug,Acme,3.5\ni2,,Acme,1\n")
    ds = load_dataset("csv", str(events), str(catalog), mapping={"user_id": "u", "item_id": "i", "ts": "t"})
    assert ds.catalog == [CatalogItem("i1", "Blue mug", brand="Acme", price=3.5)]
    assert ds.skipped == {"invalid field 'title'": 1}


@pytest.mark.parametrize(
    ("mapping", "message"),
    [
        (None, "needs a mapping"),
        ({"user_id": "u", "item_id": "i"}, "missing column name"),
        ({"user_id": "u", "item_id": "i", "ts": "t", "colour": "c"}, "unknown key"),
        ({"user_id": "u", "item_id": "i", "ts": "t", "ts_unit": "h"}, "ts_unit"),
        ({"user_id": "u", "item_id": "i", "ts": "nope"}, "lacks column"),
    ],
)
def test_generic_csv_bad_mapping_is_a_value_error(tmp_path: Path, mapping: dict | None, message: str) -> None:
    path = tmp_path / "e.csv"
    path.write_text("u,i,t\nu1,i1,5\n")
    with pytest.raises(ValueError, match=message):
        load_dataset("csv", str(path), mapping=mapping)


# --------------------------------------------------------------------------- JSONL and limits


@pytest.mark.data
@pytest.mark.parametrize("name", REAL)
def test_jsonl_round_trip_is_identical(name: str, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    ds: Dataset = request.getfixturevalue(name)
    if name == "completejourney":
        ds = Dataset(ds.name, ds.events[:5_000], ds.catalog)
    ev, cat = tmp_path / "events.jsonl", tmp_path / "catalog.jsonl"
    assert write_jsonl(ds, str(ev), str(cat)) == (len(ds.events), len(ds.catalog))
    back = load_dataset("jsonl", str(ev), str(cat))
    assert back.events == ds.events
    assert back.catalog == ds.catalog
    assert not back.skipped


def test_jsonl_bad_lines_are_counted_not_raised(tmp_path: Path) -> None:
    path = tmp_path / "ev.jsonl"
    path.write_text(
        '{"event_id":"a","type":"click","user_id":"u","item_id":"i","ts":2}\n'
        '{"event_id":"b","type":"click","user_id":"u","item_id":"i","ts":\n'
        "\n"
        '{"event_id":"c","type":"hover","user_id":"u","item_id":"i","ts":1}\n'
        '{"event_id":"d","type":"click","user_id":"u","item_id":"i","ts":1}\n'
    )
    ds = load_dataset("jsonl", str(path))
    assert [e.event_id for e in ds.events] == ["d", "a"]
    assert ds.skipped == {"invalid payload": 1, "invalid field 'type'": 1}
    assert ds.examples[0].startswith("invalid payload at line 2 of ev.jsonl: payload: malformed or truncated JSON")


@pytest.mark.data
def test_limit_caps_events_and_catalog_follows(tmp_path: Path) -> None:
    _need(DIGINETICA)
    ds = load_dataset("diginetica", str(DIGINETICA), limit=1_000)
    assert len(ds.events) == 1_000
    assert {c.item_id for c in ds.catalog} == {e.item_id for e in ds.events}
