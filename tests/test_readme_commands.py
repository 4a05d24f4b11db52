"""Every command the README shows is run, as written.

The commands are read from the README itself: each line of a fenced code block that starts
with a program (``bash``, ``recsys``, ``python``, ``.venv/bin/python``; an indented ``[...]``
line continues the command above it), and the first cell of a table row when it is one such
code span. Each one must have
a plan below (a README command without one fails :func:`test_every_readme_command_has_a_plan`),
and is run by ``bash -c`` with the README's text unchanged: against the real local broker with
``RECSYS_*`` settings naming this test's topics, and where running in full would take long
(the demo, backtests, benchmarks) with a few arguments *appended* (a smaller input, an output
directory under ``tmp_path``, ``--help``). A synopsis (``FILE``, ``[--catalog]``, ``...``) is
run in its shortest and its fullest form, its placeholders filled in; one too open for that
(``recsys replay ...``) is checked against the command's ``--help``.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from dataflows.kafka_io import KafkaClients, ensure_topics
from recsys.events import encode
from recsys.synthetic import generate_catalog, generate_events

pytestmark = pytest.mark.processes

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PROGRAMS = ("bash", "recsys", "python", ".venv/bin/python", "mkdir")
BIN = str(Path(sys.executable).parent)  # the .venv's bin: `recsys` and `python` as a user's shell finds them


def readme_commands(text: str) -> list[str]:
    """The command lines of a README, comments stripped, in order, each once.

    >>> readme_commands("```\\nrecsys run   # go\\nnot a command\\n```\\n| `recsys tail [-f]` | x |\\n")
    ['recsys run', 'recsys tail [-f]']
    """
    found: list[str] = []
    in_block = continues = False
    for line in text.splitlines():
        if line.startswith("```"):
            in_block, continues = not in_block, False
            continue
        if in_block:
            words = line.split()
            if words and words[0] in PROGRAMS:
                found.append(re.sub(r"\s+#\s.*$", "", line).strip())
                continues = True
            elif continues and line[:1].isspace() and line.strip().startswith("["):
                found[-1] += " " + line.strip()
            else:
                continues = False
        elif line.startswith("|"):  # a table whose first column is a command: that cell is one code span
            cell = re.fullmatch(r"`([^`]+)`", line.split("|")[1].strip())
            if cell and cell.group(1).split()[0] in PROGRAMS:
                found.append(cell.group(1))
    return list(dict.fromkeys(found))


@dataclass(frozen=True)
class Plan:
    """How one README command is run: ``append`` goes after its text (placeholders such as
    ``{tmp}`` filled in); ``how`` is ``run`` (to completion), ``signal`` (until its first
    line, then SIGTERM), ``help`` (a synopsis: its flags checked against ``--help``) or
    ``synopsis`` (shortest and fullest forms run)."""

    append: str = ""
    how: str = "run"
    cwd: str = "root"  # or "tmp"
    needs: str = ""  # "stream": the local broker with topics and data; "data": ../shared/data
    slow: bool = False
    serial: bool = False  # run alone (scripts/test.sh's second pass): it times itself or uses var/demo
    expect: str = ""  # a line the output must contain
    before: tuple[str, ...] = ()  # README lines run first, in the same folder (the lines above it)


_SMALL_REPLAY = " --limit 300 --out {tmp}/out"
PLANS: dict[str, Plan] = {
    "bash scripts/demo.sh": Plan(" --events 300 --rate 500", slow=True, serial=True, expect="==== summary ===="),
    "bash scripts/test.sh": Plan(" -q -p no:cacheprovider tests/test_settings.py", expect="passed"),
    "recsys broker --port 9092": Plan(how="signal"),
    "recsys produce FILE [--catalog] [--rate N]": Plan(how="synopsis", needs="stream"),
    "recsys tail [-f] [--topic T] [--max N]": Plan(how="synopsis", needs="stream"),
    "recsys demo": Plan(" --help", expect="usage: recsys demo"),
    "recsys search QUERY --user U": Plan(how="help"),
    "recsys forget USER_ID... [--offline]": Plan(how="help"),
    "recsys trainer": Plan(how="help"),
    "recsys replay ...": Plan(how="help"),
    "recsys run": Plan(needs="stream", slow=True, expect="stopped: "),
    "recsys run --create-topics": Plan(needs="stream", slow=True, expect="stopped: "),
    "recsys produce var/demo/catalog.jsonl --catalog": Plan(cwd="tmp", needs="stream", expect="produced 30 records"),
    "recsys produce var/demo/events.jsonl": Plan(cwd="tmp", needs="stream", expect="produced 120 records"),
    "recsys tail -f --max 20": Plan(needs="stream", expect="user "),
    "mkdir -p var/recovery": Plan(cwd="tmp"),
    "python -m bytewax.recovery var/recovery 1": Plan(cwd="tmp", before=("mkdir -p var/recovery",)),
    "python -m bytewax.run dataflows.live:live_flow -r var/recovery -s 2 -b 0": Plan(
        cwd="tmp", needs="stream", slow=True, before=("mkdir -p var/recovery", "python -m bytewax.recovery var/recovery 1")),
    "recsys run --processes 2": Plan(needs="stream", slow=True, expect="ready: 2 shard processes"),
    "recsys run --shards 4 --shard 3": Plan(needs="stream", slow=True, expect="(shard 3 of 4)"),
    ".venv/bin/python benchmarks/throughput.py --flow-args \"--processes 2\" --out runs/bench-2p.json":
        Plan(" --help", expect="usage:"),
    ".venv/bin/python benchmarks/throughput.py --out runs/bench.json": Plan(" --help", expect="usage:"),
    ".venv/bin/python benchmarks/throughput.py --mode latency --search-share 0.2": Plan(
        " --latency-events 300 --rate 300 --catalog-items 200 --users 200 --new-items 0 --quiet-s 1", slow=True,
        expect="search append -> search result emitted_at"),
    # searches from a long tail of queries (issue 13): most of them a query's first, the model in the batch's path
    ".venv/bin/python benchmarks/throughput.py --mode latency --search-share 0.2 --distinct-queries 20000": Plan(
        " --latency-events 300 --rate 300 --catalog-items 200 --users 200 --new-items 0 --quiet-s 1", slow=True,
        expect="of the searches are a query's first"),
    # the inputs' epoch-clock drift (README, Performance): 300 s at 20 events/s there
    ".venv/bin/python benchmarks/throughput.py --mode latency --rate 20 --latency-events 6000 --new-items 0": Plan(
        " --latency-events 100 --rate 200 --catalog-items 200 --users 200 --quiet-s 1", slow=True,
        expect="a batch; by phase (ms a batch): "),  # printed after "the events partitions were polled"
    # the broker hop alone (a second of records at a low rate: the script as written, briefly)
    ".venv/bin/python benchmarks/transport_floor.py": Plan(
        " --seconds 1 --rate 200", expect="CreateTime -> in the consumer's hands"),
    ".venv/bin/python benchmarks/transport_floor.py --fetch-max-wait-ms 5": Plan(
        " --seconds 1 --rate 200", expect="consumer fetch_max_wait_ms 5,"),
    # issue 9: the state bound over 1M events (an hour here): a few thousand events, the same rows
    ".venv/bin/python benchmarks/throughput.py --mode longrun": Plan(
        " --catalog-items 200 --new-items 0 --longrun-events 3000 --longrun-users 1000 --report-every 1000",
        slow=True, expect="after a full compaction"),
    # issue 13: does a recent search help the next recommendations (two full systems, a long replay)
    ".venv/bin/python benchmarks/search_in_recs.py --format rees46 --events ../shared/data/rees46/2019-Oct_head17k.csv "
    "--search-targets purchase,add_to_cart": Plan(" --help", expect="usage:"),
    ".venv/bin/python benchmarks/search_in_recs.py --format completejourney --limit 100000 --search-sample 0.03":
        Plan(" --help", expect="usage:"),
    "recsys replay --events PATH [--format jsonl|rees46|diginetica|yoochoose|completejourney|csv] "
    "[--catalog PATH] [--protocol prequential|leave-last-out] [--k 10,20] [--models all|NAME,...] "
    "[--include-history] [--target next|next_purchase] [--seed N] [--limit N] [--map FIELD=COLUMN ...] "
    "--out DIR": Plan(how="help"),
}
for _log in ("rees46", "diginetica", "yoochoose"):
    for _protocol in ("prequential", "leave-last-out"):
        _events = "../shared/data/rees46/2019-Oct_head17k.csv" if _log == "rees46" else f"../shared/data/{_log}"
        PLANS[f"recsys replay --format {_log} --events {_events} --protocol {_protocol} --out runs/{_log}-{_protocol}"] = \
            Plan(_SMALL_REPLAY, needs="data", slow=True, expect="wrote ")
for _protocol in ("prequential", "leave-last-out"):
    PLANS[f"recsys replay --format completejourney --limit 300000 --protocol {_protocol} "
          f"--out runs/completejourney-300k-{_protocol}"] = Plan(_SMALL_REPLAY, slow=True, expect="wrote ")
PLANS["recsys replay --task search --format rees46 --events ../shared/data/rees46/2019-Oct_head17k.csv "
      "--search-targets purchase,add_to_cart --search-features --out runs/search-rees46"] = \
    Plan(_SMALL_REPLAY, needs="data", slow=True, expect="wrote ")
PLANS["recsys replay --task search --format completejourney --limit 200000 --search-sample 0.03 --search-features "
      "--out runs/search-cj"] = Plan(_SMALL_REPLAY, slow=True, expect="wrote ")
# issue 13: search weights fitted on the first half of those two replays' searches (needs their output)
PLANS[".venv/bin/python benchmarks/search_weights.py runs/search-cj/search_features.npz "
      "runs/search-rees46/search_features.npz"] = Plan(" --help", expect="usage:")
PLANS["recsys replay --format completejourney --models full-system --out runs/completejourney-full"] = \
    Plan(_SMALL_REPLAY, slow=True, expect="wrote ")


def test_every_readme_command_has_a_plan():
    commands = readme_commands(README.read_text())
    assert "bash scripts/demo.sh" == commands[0] and "bash scripts/test.sh" == commands[1]  # the first two, unchanged
    unplanned = [c for c in commands if c not in PLANS]
    assert not unplanned, f"README commands without a plan in {__file__}: {unplanned}"
    stale = [c for c in PLANS if c not in commands]
    assert not stale, f"plans for commands the README no longer shows: {stale}"


def _params():
    for command, plan in PLANS.items():
        marks = [pytest.mark.slow] if plan.slow else []
        if plan.serial:
            marks.append(pytest.mark.serial)
        if plan.needs == "data":
            marks.append(pytest.mark.data)
        yield pytest.param(command, plan, marks=marks, id=command[:90])


# ----------------------------------------------------------------------------- running them


@pytest.fixture
def stream(request, tmp_path, topic_name):
    """``RECSYS_*`` settings for a fresh set of topics on the session broker: a catalog file,
    a catalog topic holding it, events produced first, and 25 recommendations to tail."""
    broker = request.getfixturevalue("local_broker")
    prefix = topic_name("readme") + "-"
    catalog = generate_catalog(30, seed=11)
    events = generate_events(120, catalog, n_users=20, seed=12)
    catalog_file = tmp_path / "var" / "demo" / "catalog.jsonl"
    catalog_file.parent.mkdir(parents=True)
    catalog_file.write_bytes(b"\n".join(encode(c) for c in catalog) + b"\n")
    (tmp_path / "events.jsonl").write_bytes(b"\n".join(encode(e) for e in events) + b"\n")
    (tmp_path / "var" / "demo" / "events.jsonl").write_bytes(b"\n".join(encode(e) for e in events) + b"\n")
    topics = {name: prefix + name for name in ("events", "catalog", "recommendations", "dead-letters")}
    ensure_topics(broker.bootstrap, {topics["events"]: 4, topics["catalog"]: 1, topics["recommendations"]: 2,
                                     topics["dead-letters"]: 1})
    producer = KafkaClients.for_bootstrap(broker.bootstrap).producer()
    for e in events:
        producer.send(topics["events"], key=e.user_id.encode(), value=encode(e))
    rec = {"schema_version": 1, "user_id": "u1", "items": [{"item_id": "i1", "score": 1.0, "reason": "trending"}],
           "trigger_event_id": "e1", "model_version": "blend-v1", "event_ts": 1, "emitted_at": 2}
    import orjson

    for _ in range(25):
        producer.send(topics["recommendations"], key=b"u1", value=orjson.dumps(rec))
    producer.flush()
    producer.close()
    return {
        "RECSYS_BOOTSTRAP_SERVERS": broker.bootstrap,
        "RECSYS_EVENTS_TOPIC": topics["events"],
        "RECSYS_CATALOG_TOPIC": topics["catalog"],
        "RECSYS_RECOMMENDATIONS_TOPIC": topics["recommendations"],
        "RECSYS_DEAD_LETTERS_TOPIC": topics["dead-letters"],
        "RECSYS_STATE_DIR": str(tmp_path / "state"),
        "RECSYS_RECOVERY_DIR": str(tmp_path / "recovery"),
        "RECSYS_EMBED_CACHE_DIR": str(tmp_path / "emb"),
        "RECSYS_CATALOG_FILE": str(catalog_file),
        "RECSYS_STOP_AT_END": "true",  # `recsys run` ends at the end of what was produced
        "RECSYS_SNAPSHOT_INTERVAL_S": "0.5",
    }


def _env(extra: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RECSYS_")}
    return {**env, **extra, "PATH": BIN + os.pathsep + env.get("PATH", ""), "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}


def _bash(line: str, *, cwd: Path, env: dict[str, str], timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "-c", line], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def _expand(synopsis: str, full: bool, values: dict[str, str]) -> str:
    """A synopsis as a command: optional ``[...]`` groups dropped (shortest) or kept (fullest),
    placeholders filled in."""
    text = re.sub(r"\[([^\]]*)\]", (lambda m: m.group(1)) if full else "", synopsis)
    return " ".join(values.get(word, word) for word in text.split())


def _clean(done: subprocess.CompletedProcess, line: str) -> str:
    out = done.stdout + done.stderr
    assert done.returncode == 0, f"`{line}` exited {done.returncode}:\n{out[-3000:]}"
    assert "Traceback" not in out and "panicked" not in out, f"`{line}`:\n{out[-3000:]}"
    return out


@pytest.mark.parametrize("command, plan", list(_params()))
def test_readme_command_runs_as_written(command, plan, tmp_path, request):
    if plan.needs == "data":
        missing = [w for w in command.split() if w.startswith("../shared/") and not (ROOT / w).exists()]
        if missing:
            pytest.skip(f"needs {missing[0]} (the shared data sets, beside the repository)")
    env = _env(request.getfixturevalue("stream") if plan.needs == "stream" else {})
    cwd = tmp_path if plan.cwd == "tmp" else ROOT
    if plan.how == "help":
        _check_synopsis(command, env)
    elif plan.how == "synopsis":
        values = {"FILE": str(tmp_path / "events.jsonl"), "N": "2000", "T": env["RECSYS_RECOMMENDATIONS_TOPIC"]}
        for full in (False, True):
            line = _expand(command, full, values)
            if " --catalog" in line:  # a catalog file for the catalog (an events file's lines are refused there)
                line = line.replace(values["FILE"], env["RECSYS_CATALOG_FILE"])
            if " -f" in line:  # follows until stopped (its --max N is more than the topic holds)
                _run_until_signal(line, cwd=cwd, env=env, first_line="user ")
            else:
                _clean(_bash(line, cwd=cwd, env=env, timeout=120), line)
    elif plan.how == "signal":
        _run_until_signal(command, cwd=cwd, env=env, first_line="broker ready",
                          refused="already in use")  # another process may hold 9092 on a shared machine
    else:
        for earlier in plan.before:
            assert earlier in PLANS, earlier  # a README line too
            _clean(_bash(earlier, cwd=cwd, env=env, timeout=60), earlier)
        line = command + plan.append.format(tmp=tmp_path)
        out = _clean(_bash(line, cwd=cwd, env=env, timeout=900), line)
        assert plan.expect in out, f"`{line}` did not print {plan.expect!r}:\n{out[-3000:]}"
        if command.startswith(("recsys run", "python -m bytewax.run")):
            assert _recommendations(env), f"`{line}` wrote no recommendations"


def _recommendations(env: dict[str, str]) -> int:
    from dataflows.kafka_io import consume_all

    recs = consume_all(KafkaClients.for_bootstrap(env["RECSYS_BOOTSTRAP_SERVERS"]), env["RECSYS_RECOMMENDATIONS_TOPIC"])
    return len(recs) - 25  # those the fixture put there to tail


def _check_synopsis(synopsis: str, env: dict[str, str]) -> None:
    words = synopsis.split()
    command = words[:2]
    done = _bash(" ".join([*command, "--help"]), cwd=ROOT, env=env, timeout=60)
    help_text = _clean(done, synopsis)
    for flag in re.findall(r"(?<![\w-])(--[a-z][a-z-]*)", synopsis):
        assert flag in help_text, f"{' '.join(command)} --help does not know {flag} (README: `{synopsis}`)"


def _run_until_signal(line: str, *, cwd: Path, env: dict[str, str], first_line: str, refused: str = "") -> None:
    proc = subprocess.Popen(["bash", "-c", "exec " + line], cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        lines = []
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            got = proc.stdout.readline()
            if not got:
                break
            lines.append(got)
            if got.startswith(first_line):
                break
        out = "".join(lines)
        if refused and refused in out:
            assert proc.wait(10) != 0 and len(out.strip().splitlines()) == 1, out
            return
        assert lines and lines[-1].startswith(first_line), f"`{line}`:\n{out}"
        proc.send_signal(signal.SIGTERM)
        rest, _ = proc.communicate(timeout=15)
        assert proc.returncode == 0, f"`{line}` exited {proc.returncode} on SIGTERM:\n{out}{rest}"
        assert "Traceback" not in out + rest and "panicked" not in out + rest, out + rest
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
