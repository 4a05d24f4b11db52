"""A shop's files as they are usually kept: gzip, bzip2 or xz. Until 2026-12-06 (forty-fifth
session) every reader opened them as plain text: `recsys replay` refused a `.csv.gz` with a
kilobyte of decompressed-looking garbage as its "header", skipped every line of a `.jsonl.gz` as
malformed JSON and stopped with "no event to replay", and `recsys produce` sent each line of
the compressed bytes to the topic as a record, for the flow to dead-letter one by one."""

from __future__ import annotations

import bz2
import gzip
import lzma
import subprocess
import sys
from pathlib import Path

import pytest

from dataflows.kafka_io import KafkaClients, consume_all, ensure_topics
from recsys.datasets import load_dataset
from recsys.events import encode
from recsys.files import DamagedFileError, open_input
from recsys.items.catalog import read_catalog_file
from recsys.search.querylog import load_query_log
from recsys.synthetic import generate_catalog, generate_events
from recsys_cli.main import main

ROOT = Path(__file__).resolve().parents[1]
COMPRESS = {"gzip": (gzip.compress, ".gz"), "bzip2": (bz2.compress, ".bz2"), "xz": (lzma.compress, ".xz")}

REES46 = (
    "event_time,event_type,product_id,category_id,category_code,brand,price,user_id,user_session\n"
    "2019-10-01 00:00:05 UTC,cart,1,9,electronics.smartphone,samsung,100.00,7,s1\n"
    "2019-10-01 00:00:06 UTC,remove_from_cart,1,9,electronics.smartphone,samsung,100.00,7,s1\n"
    "2019-10-01 00:00:01 UTC,view,1,9,electronics.smartphone,samsung,90.50,7,s1\n"
    "2019-10-01 00:00:07 UTC,purchase,2,9,,,12.00,8,\n"
)
SHOP_CSV = (
    "when;who;what;kind;cost\n"
    "2024-01-01T00:00:02Z;u1;i1;view;\n"
    "2024-01-01T00:00:01Z;u2;i2;buy;9.5\n"
    "yesterday;u1;i3;view;1\n"
    "2024-01-01T00:00:05Z;u3;i4;view;2\n"
)
SHOP_MAP = {"ts": "when", "user_id": "who", "item_id": "what", "type": "kind", "price": "cost", "ts_unit": "iso",
            "type_map": {"view": "browse", "buy": "purchase"}, "delimiter": ";"}


def _compressed(path: Path, kind: str) -> Path:
    compress, suffix = COMPRESS[kind]
    out = path.with_name(path.name + suffix)
    out.write_bytes(compress(path.read_bytes()))
    return out


def _same(a, b) -> None:
    assert (a.name, a.events, a.catalog, a.skipped, a.examples) == (b.name, b.events, b.catalog, b.skipped, b.examples)


@pytest.mark.parametrize("kind", sorted(COMPRESS))
def test_every_log_format_reads_the_same_compressed_as_plain(kind, tmp_path):
    catalog = generate_catalog(30, seed=1)
    events, items = _jsonl(tmp_path, catalog)
    ds = load_dataset("jsonl", events, items)
    assert len(ds.events) == 300 and ds.name == "ev"
    _same(load_dataset("jsonl", str(_compressed(Path(events), kind)), str(_compressed(Path(items), kind))), ds)

    rees = tmp_path / "rees.csv"
    rees.write_text(REES46)
    plain = load_dataset("rees46", str(rees))
    assert plain.skipped == {"unsupported event_type 'remove_from_cart'": 1}  # line numbers in the examples too
    _same(load_dataset("rees46", str(_compressed(rees, kind))), plain)

    shop = tmp_path / "shop.csv"
    shop.write_text(SHOP_CSV)
    plain = load_dataset("csv", str(shop), mapping=SHOP_MAP)
    assert plain.name == "shop" and plain.skipped == {"bad ts": 1}
    _same(load_dataset("csv", str(_compressed(shop, kind)), mapping=SHOP_MAP), plain)

    log = tmp_path / "log.csv"
    log.write_text("uid,q,qt,item,et\nu1,red shoe,1000,i9,5000\nu2,tent,2000,,\n")
    mapping = {"user_id": "uid", "query": "q", "query_ts": "qt", "item_id": "item", "ts": "et"}
    (ds_plain, targets), (ds_packed, packed_targets) = (load_query_log(str(p), mapping) for p in (log, _compressed(log, kind)))
    _same(ds_packed, ds_plain)
    assert packed_targets == targets == {"querylog:2:s": "i9"}

    assert read_catalog_file(_compressed(Path(items), kind)) == read_catalog_file(items) == catalog  # --catalog-file


def test_a_diginetica_folder_of_compressed_files_is_found_and_read_as_the_plain_one(tmp_path):
    """DIGINETICA is given as a folder whose files are found by name: their compressed forms
    (`train-item-views.csv.gz`, ...) were not looked for."""
    files = {
        "train-item-views.csv": "session_id;user_id;item_id;timeframe;eventdate\n1;NA;81766;526309;2016-05-09\n"
                                "1;NA;31331;1031018;2016-05-09\n2;7;81766;1000;2016-05-10\n",
        "train-purchases.csv": "sessionId;userId;timeframe;eventdate;ordernumber;itemId\n2;7;2000;2016-05-10;16421;31331\n",
        "product-categories.csv": "itemId;categoryId\n81766;1096\n31331;12\n",
    }
    plain, packed = tmp_path / "plain", tmp_path / "packed"
    plain.mkdir(), packed.mkdir()
    for name, text in files.items():
        (plain / name).write_text(text)
        (packed / (name + ".gz")).write_bytes(gzip.compress(text.encode()))
    expected = load_dataset("diginetica", str(plain))
    assert [e.type for e in expected.events].count("purchase") == 1 and expected.catalog[0].category == "category 1096"
    _same(load_dataset("diginetica", str(packed)), expected)


def test_a_pipe_loses_nothing_and_a_byte_order_mark_costs_no_line(tmp_path):
    """The first bytes are looked at without being read: until the compressed readers were
    given a second look (2026-12-06), the file was opened twice, and a pipe (`--events
    /dev/stdin`, `<(zcat ...)`) lost its first buffer's worth of lines. A UTF-8 byte order mark
    (Excel's "CSV UTF-8", Notepad) cost a JSONL file its first event and hid a quoted first
    column of a CSV header."""
    events, _ = _jsonl(tmp_path, generate_catalog(30, seed=1))
    code = ("import sys; from recsys.datasets import load_dataset; "
            "ds = load_dataset('jsonl', '/dev/stdin'); print(len(ds.events), sum(ds.skipped.values()))")
    for feed in (Path(events).read_bytes(), gzip.compress(Path(events).read_bytes())):
        done = subprocess.run([sys.executable, "-c", code], input=feed, cwd=ROOT, capture_output=True, timeout=120)
        assert done.stdout.split() == [b"300", b"0"], done.stderr[-2000:]

    marked = tmp_path / "marked.jsonl"
    marked.write_bytes(b"\xef\xbb\xbf" + Path(events).read_bytes())
    assert load_dataset("jsonl", str(marked)).events == load_dataset("jsonl", events).events
    shop = tmp_path / "excel.csv"
    shop.write_bytes(b"\xef\xbb\xbf" + b'"user","item","ts"\r\n"u1","i1","1700000000000"\r\n')
    ds = load_dataset("csv", str(shop), mapping={"user_id": "user", "item_id": "item", "ts": "ts"})
    assert [(e.user_id, e.item_id, e.ts) for e in ds.events] == [("u1", "i1", 1700000000000)]


def test_a_compressed_jsonl_catalog_beside_a_csv_log_is_read_as_jsonl(tmp_path):
    shop = tmp_path / "shop.csv"
    shop.write_text(SHOP_CSV)
    items = tmp_path / "items.jsonl"
    items.write_text('{"item_id": "i1", "title": "Red lamp"}\n{"item_id": "i2", "title": "Blue mug"}\n')
    ds = load_dataset("csv", str(shop), str(_compressed(items, "gzip")), mapping=SHOP_MAP)
    assert {c.item_id: c.title for c in ds.catalog} == {"i1": "Red lamp", "i2": "Blue mug"}


def _jsonl(tmp_path: Path, catalog) -> tuple[str, str]:
    events, items = tmp_path / "ev.jsonl", tmp_path / "cat.jsonl"
    events.write_bytes(b"\n".join(encode(e) for e in generate_events(300, catalog, n_users=20, seed=2)) + b"\n")
    items.write_bytes(b"\n".join(encode(c) for c in catalog) + b"\n")
    return str(events), str(items)


def _cut_short(tmp_path: Path, lines: int = 2000) -> tuple[Path, list[bytes]]:
    catalog = generate_catalog(30, seed=1)
    records = [encode(e) for e in generate_events(lines, catalog, n_users=50, seed=3)]
    path = tmp_path / "events.jsonl.gz"
    packed = gzip.compress(b"\n".join(records) + b"\n")
    path.write_bytes(packed[: len(packed) // 2])  # an interrupted download or copy
    return path, records


def test_a_compressed_file_cut_short_is_refused_by_name_not_read_as_a_shorter_log(tmp_path):
    path, _ = _cut_short(tmp_path)
    with pytest.raises(DamagedFileError, match=r"events\.jsonl\.gz: the gzip file is damaged or cut short after [\d,]+ line"):
        load_dataset("jsonl", str(path))
    done = subprocess.run([sys.executable, "-m", "recsys_cli", "replay", "--format", "jsonl", "--events", str(path),
                           "--models", "popularity", "--out", str(tmp_path / "out")],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    assert f"recsys replay: cannot read --events {path} as --format jsonl: {path}: the gzip file is damaged or cut short" \
        in done.stderr.splitlines()[-1], done.stderr
    assert not (tmp_path / "out" / "metrics.json").exists()


def test_a_zstd_file_is_refused_with_how_to_read_it(tmp_path):
    path = tmp_path / "events.jsonl.zst"
    path.write_bytes(b"\x28\xb5\x2f\xfd" + b"\x00" * 20)
    with pytest.raises(ValueError, match=r"zstd-compressed file, which this reader cannot open; decompress it first \(zstd -d "):
        with open_input(path):
            pass


def test_produce_sends_a_compressed_file_as_its_lines_and_names_where_a_damaged_one_stops(local_broker, topic_name, tmp_path, capsys):
    clients = KafkaClients.for_bootstrap(local_broker.bootstrap)
    catalog = generate_catalog(20, seed=1)
    records = [encode(e) for e in generate_events(200, catalog, n_users=15, seed=2)]
    plain = tmp_path / "events.jsonl"
    plain.write_bytes(b"\n".join(records) + b"\n")
    for kind in sorted(COMPRESS):
        topic = topic_name(kind)
        ensure_topics(local_broker.bootstrap, {topic: 1})
        assert main(["produce", str(_compressed(plain, kind)), "--topic", topic, "--bootstrap-servers", local_broker.bootstrap]) == 0
        assert [r.value for r in consume_all(clients, topic)] == records

    damaged, lines = _cut_short(tmp_path)
    topic = topic_name("cut")
    ensure_topics(local_broker.bootstrap, {topic: 1})
    with pytest.raises(SystemExit) as stopped:
        main(["produce", str(damaged), "--topic", topic, "--bootstrap-servers", local_broker.bootstrap])
    sent = [r.value for r in consume_all(clients, topic)]
    assert stopped.value.code == 1 and 0 < len(sent) < len(lines) and sent == lines[: len(sent)]
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"recsys produce: {damaged}: the gzip file is damaged or cut short after {len(sent):,} line(s)"), err
    assert err.endswith(f"the {len(sent)} record(s) before it were sent to {topic!r}, nothing after it"), err
