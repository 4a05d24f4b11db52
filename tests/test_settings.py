"""Settings: validation and its messages, env and flags, the per-shard directories, and the hand-over to child processes."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from recsys.settings import Settings, SettingsError, add_cli_flags, settings_from_args


def test_one_shard_keeps_the_directories_as_given():
    s = Settings(state_dir="var/state", recovery_dir="var/recovery")
    assert s.for_shard() == s


def test_each_of_several_shards_gets_its_own_state_and_recovery_directory():
    s = Settings(state_dir="/data/state", recovery_dir="/data/recovery", shards=3, shard=2).for_shard()
    assert Path(s.state_dir) == Path("/data/state/shard-2")
    assert Path(s.recovery_dir) == Path("/data/recovery/shard-2")
    assert Settings(recovery_dir=None, shards=2, shard=1).for_shard().recovery_dir is None


@pytest.mark.parametrize("shards, shard", [(0, 0), (2, 2), (2, -1)])
def test_impossible_shards_are_refused_naming_both_variables(shards, shard):
    with pytest.raises(SettingsError, match="RECSYS_SHARD=.*RECSYS_SHARDS="):
        Settings(shards=shards, shard=shard)


def test_to_env_round_trips_every_setting_including_none_bools_and_secrets():
    s = Settings(sasl_password="secret", sasl_username="me", recovery_dir=None, head_enabled=False,
                 stop_at_end=True, snapshot_interval_s=0.1 + 0.2, shards=4, shard=3, unknown_items="admit")
    env = s.to_env()
    assert all(k.startswith("RECSYS_") for k in env)
    assert Settings.from_env(env) == s
    assert Settings.from_env(Settings().to_env()) == Settings()


@pytest.mark.parametrize("env, message", [
    ({"RECSYS_TOP_K": "ten"}, "RECSYS_TOP_K: expected int, got 'ten'"),
    ({"RECSYS_TOP_K": "0"}, "RECSYS_TOP_K: must be > 0, got 0"),
    ({"RECSYS_SNAPSHOT_INTERVAL_S": "soon"}, "RECSYS_SNAPSHOT_INTERVAL_S: expected float, got 'soon'"),
    ({"RECSYS_STOP_AT_END": "maybe"}, "RECSYS_STOP_AT_END: expected bool, got 'maybe'"),
    ({"RECSYS_DEDUP_WINDOW": "-1"}, "RECSYS_DEDUP_WINDOW: must be >= 0, got -1"),
    ({"RECSYS_METRICS_PORT": "70000"}, "RECSYS_METRICS_PORT: expected a TCP port, got 70000"),
    ({"RECSYS_STATUS_INTERVAL_S": "0"}, "RECSYS_STATUS_INTERVAL_S: must be > 0 (--quiet switches the status line off)"),
])
def test_a_bad_variable_is_refused_in_one_line_naming_it(env, message):
    with pytest.raises(SettingsError) as info:
        Settings.from_env(env)
    assert str(info.value) == message


def test_a_bad_choice_names_the_allowed_values():
    with pytest.raises(SettingsError) as info:
        Settings.from_env({"RECSYS_ON_OFFSET_RESET": "rewind"})
    assert str(info.value) == "RECSYS_ON_OFFSET_RESET: expected one of ('fail', 'earliest', 'latest'), got 'rewind'"


def test_a_flag_beats_its_variable_which_beats_the_default():
    parser = argparse.ArgumentParser()
    add_cli_flags(parser)
    args = parser.parse_args(["--top-k", "7", "--no-head-enabled"])
    s = settings_from_args(args, {"RECSYS_TOP_K": "5", "RECSYS_HEAD_ENABLED": "true", "RECSYS_SEARCH_K": "3"})
    assert (s.top_k, s.head_enabled, s.search_k, s.history_len) == (7, False, 3, Settings().history_len)


def test_a_bad_value_is_named_as_it_was_given_a_flag_or_a_variable():
    """Until 2026-12-07 (forty-seventh session) ``--head-lr nan`` was refused as
    ``RECSYS_HEAD_LR``, a variable the operator had not set."""
    parser = argparse.ArgumentParser()
    add_cli_flags(parser)
    with pytest.raises(SettingsError, match=r"^--head-lr: .*finite number, got nan$"):
        settings_from_args(parser.parse_args(["--head-lr", "nan"]), {})
    with pytest.raises(SettingsError, match=r"^RECSYS_TOP_K: must be > 0, got 0$"):  # the variable, the flag left out
        settings_from_args(parser.parse_args(["--head-lr", "0.1"]), {"RECSYS_TOP_K": "0"})


def test_only_lists_just_those_flags():
    parser = argparse.ArgumentParser()
    add_cli_flags(parser, only=("bootstrap_servers", "metrics_port"))
    args = parser.parse_args(["--metrics-port", "9100"])
    assert vars(args) == {"bootstrap_servers": None, "metrics_port": "9100"}  # the settings check reads it (or `none`)
    with pytest.raises(SystemExit):
        parser.parse_args(["--top-k", "3"])


def test_constructing_settings_never_reads_os_environ(monkeypatch):
    monkeypatch.setenv("RECSYS_TOP_K", "99")
    assert Settings().top_k == 10
    assert Settings.from_env({}).top_k == 10


def test_an_empty_variable_unsets_an_optional_setting_only():
    s = Settings.from_env({"RECSYS_RECOVERY_DIR": "", "RECSYS_METRICS_PORT": ""})
    assert (s.recovery_dir, s.metrics_port) == (None, None)
    with pytest.raises(SettingsError, match="^RECSYS_EVENTS_TOPIC: empty"):  # kept as "" until 2026-12-07
        Settings.from_env({"RECSYS_EVENTS_TOPIC": ""})


@pytest.mark.parametrize("word", ["None", "none", "NONE"])
def test_none_unsets_an_optional_setting_as_the_settings_table_says(word):
    # until 2026-12-07 a recovery directory named ./None, and a metrics port refused as not an int
    s = Settings.from_env({"RECSYS_RECOVERY_DIR": word, "RECSYS_METRICS_PORT": word, "RECSYS_CATALOG_FILE": word,
                           "RECSYS_EXCHANGE_SNAPSHOT_DIR": word})
    assert (s.recovery_dir, s.metrics_port, s.catalog_file, s.exchange_snapshot_dir) == (None, None, None, None)
    parser = argparse.ArgumentParser()
    add_cli_flags(parser)
    assert settings_from_args(parser.parse_args(["--recovery-dir", word]), {}).recovery_dir is None
    assert settings_from_args(parser.parse_args(["--metrics-port", f" {word}"]), {}).metrics_port is None
    assert settings_from_args(parser.parse_args(["--metrics-port", "9100"]), {}).metrics_port == 9100
    with pytest.raises(SettingsError, match="^--metrics-port: "):
        settings_from_args(parser.parse_args(["--metrics-port", "ninety"]), {})


def test_the_word_none_is_a_sasl_user_name_or_password_as_given():
    s = Settings.from_env({"RECSYS_SASL_USERNAME": "none", "RECSYS_SASL_PASSWORD": "None"})
    assert (s.sasl_username, s.sasl_password) == ("none", "None")


def test_a_sasl_mechanism_the_client_cannot_be_configured_for_is_refused_at_once():
    # until 2026-12-07 accepted here, and failing when the client connected: no setting gives a token provider
    with pytest.raises(SettingsError, match="^RECSYS_SASL_MECHANISM: OAUTHBEARER needs a token provider"):
        Settings.from_env({"RECSYS_SASL_MECHANISM": "OAUTHBEARER"})
    assert Settings.from_env({"RECSYS_SASL_MECHANISM": "SCRAM-SHA-512"}).kafka_options()["sasl_mechanism"] == "SCRAM-SHA-512"


def test_gssapi_is_refused_naming_the_package_it_needs_where_that_is_missing():
    import importlib.util

    if importlib.util.find_spec("gssapi") is not None:
        pytest.skip("gssapi is installed here: GSSAPI is accepted")
    with pytest.raises(SettingsError, match="GSSAPI .*needs the Python package gssapi"):
        Settings.from_env({"RECSYS_SASL_MECHANISM": "GSSAPI"})


def test_replace_validates_the_copy_and_leaves_the_original():
    s = Settings(top_k=5)
    assert s.replace(top_k=6).top_k == 6 and s.top_k == 5
    with pytest.raises(SettingsError, match="^RECSYS_TOP_K: must be > 0, got 0$"):
        s.replace(top_k=0)


def test_an_unknown_setting_is_refused():
    with pytest.raises(SettingsError, match="^top_n: not a setting$"):
        Settings(top_n=5)


@pytest.mark.parametrize("env, message", [
    # a typo would otherwise leave the default in force: a flow reading 127.0.0.1:9092 while the
    # operator believes it reads the shop's broker
    ({"RECSYS_BOOTSTRAP_SERVER": "kafka:9092"},
     "RECSYS_BOOTSTRAP_SERVER: not a setting (did you mean RECSYS_BOOTSTRAP_SERVERS?)"),
    ({"RECSYS_TOPK": "5"}, "RECSYS_TOPK: not a setting (did you mean RECSYS_TOP_K?)"),
    ({"recsys_top_k": "5"}, "recsys_top_k: not a setting (did you mean RECSYS_TOP_K?)"),
    ({"RECSYS_COLOUR": "blue"}, "RECSYS_COLOUR: not a setting (every setting: README, Settings)"),
])
def test_a_variable_that_is_not_a_setting_is_refused_naming_the_nearest(env, message):
    with pytest.raises(SettingsError) as info:
        Settings.from_env({**env, "RECSYS_TOP_K": "7", "PATH": "/usr/bin", "RECSYSTEM": "x"})
    assert str(info.value) == message


@pytest.mark.parametrize("env, words", [
    # each passed the check until 2026-12-07 (an operator's probe), then crashed the flow after it
    # loaded (a division by a half-life of 0, an infinite epoch), or was blamed on the broker (a
    # negative fetch wait), or changed what the flow does without a word (a nan status interval,
    # an empty search answer for search_k 0, a trainer without sharing)
    ({"RECSYS_INTEREST_HALF_LIFE_H": "0"}, ["RECSYS_INTEREST_HALF_LIFE_H", "must be > 0"]),
    ({"RECSYS_POPULARITY_HALF_LIFE_H": "-5"}, ["RECSYS_POPULARITY_HALF_LIFE_H", "must be > 0"]),
    ({"RECSYS_COVISIT_HALF_LIFE_H": "0"}, ["RECSYS_COVISIT_HALF_LIFE_H", "must be > 0"]),
    ({"RECSYS_STATE_TTL_DAYS": "-1"}, ["RECSYS_STATE_TTL_DAYS", "must be > 0"]),
    ({"RECSYS_HEAD_LR": "nan"}, ["RECSYS_HEAD_LR", "finite"]),
    ({"RECSYS_SNAPSHOT_INTERVAL_S": "inf"}, ["RECSYS_SNAPSHOT_INTERVAL_S", "finite"]),
    ({"RECSYS_STATUS_INTERVAL_S": "nan"}, ["RECSYS_STATUS_INTERVAL_S", "finite"]),
    ({"RECSYS_FETCH_MAX_WAIT_MS": "-100"}, ["RECSYS_FETCH_MAX_WAIT_MS", "must be >= 0"]),
    ({"RECSYS_FETCH_MAX_WAIT_MS": "10000000"}, ["RECSYS_FETCH_MAX_WAIT_MS", "must be <= 10000"]),
    ({"RECSYS_SEARCH_K": "0"}, ["RECSYS_SEARCH_K", "must be > 0"]),
    ({"RECSYS_TOP_K": "1000000000"}, ["RECSYS_TOP_K", "must be <= 1000"]),
    ({"RECSYS_SASL_MECHANISM": "bogus"}, ["RECSYS_SASL_MECHANISM", "PLAIN"]),
    ({"RECSYS_BOOTSTRAP_SERVERS": ""}, ["RECSYS_BOOTSTRAP_SERVERS", "expected HOST:PORT"]),
    ({"RECSYS_BOOTSTRAP_SERVERS": "kafka"}, ["RECSYS_BOOTSTRAP_SERVERS", "expected HOST:PORT", "'kafka'"]),
    ({"RECSYS_MODEL_TRAINER": "true"}, ["RECSYS_MODEL_TRAINER=true needs RECSYS_SHARE_SIGNALS=true"]),
])
def test_a_value_the_flow_cannot_run_with_is_a_bad_setting(env, words):
    with pytest.raises(SettingsError) as info:
        Settings.from_env(env)
    assert all(w in str(info.value) for w in words), str(info.value)


def test_the_bounds_leave_every_documented_value_alone():
    s = Settings.from_env({"RECSYS_FETCH_MAX_WAIT_MS": "0", "RECSYS_BOOTSTRAP_SERVERS": "kafka-0:9092,[::1]:9093",
                           "RECSYS_HEAD_SNAPSHOT_INTERVAL_S": "0", "RECSYS_SASL_MECHANISM": "SCRAM-SHA-512",
                           "RECSYS_MODEL_TRAINER": "true", "RECSYS_SHARE_SIGNALS": "true", "RECSYS_TOP_K": "1000"})
    assert (s.fetch_max_wait_ms, s.top_k, s.model_trainer) == (0, 1000, True)


@pytest.mark.parametrize("env, words", [
    # until 2026-12-07 an empty name or one with a space reached the broker, which answered in its own words
    ({"RECSYS_EVENTS_TOPIC": ""}, ["RECSYS_EVENTS_TOPIC", "empty (an unset shell variable?)"]),
    ({"RECSYS_DEAD_LETTERS_TOPIC": "dead letters"}, ["RECSYS_DEAD_LETTERS_TOPIC", "'dead letters' is not a Kafka topic name"]),
    ({"RECSYS_CONTROL_TOPIC": ".."}, ["RECSYS_CONTROL_TOPIC", "'..' is not a Kafka topic name"]),
    ({"RECSYS_CATALOG_TOPIC": "c" * 250}, ["RECSYS_CATALOG_TOPIC", "is not a Kafka topic name (1-249"]),
])
def test_a_topic_name_kafka_would_refuse_is_a_bad_setting(env, words):
    with pytest.raises(SettingsError) as info:
        Settings.from_env(env)
    assert all(w in str(info.value) for w in words), str(info.value)
    assert Settings.from_env({"RECSYS_EVENTS_TOPIC": "shop.events_v2-eu"}).events_topic == "shop.events_v2-eu"


def test_what_kubernetes_or_docker_links_set_for_a_service_named_recsys_is_left_alone():
    """A Service named ``recsys`` gives every pod of its namespace these variables (Docker's
    legacy links give a linked container named so the same kind): not settings, and not ours
    to refuse, even where one is close to a setting's name."""
    platform = {"RECSYS_SERVICE_HOST": "10.0.0.7", "RECSYS_SERVICE_PORT": "9464", "RECSYS_SERVICE_PORT_METRICS": "9464",
                "RECSYS_PORT": "tcp://10.0.0.7:9464", "RECSYS_PORT_9464_TCP": "tcp://10.0.0.7:9464",
                "RECSYS_PORT_9464_TCP_PROTO": "tcp", "RECSYS_PORT_9464_TCP_PORT": "9464",
                "RECSYS_PORT_9464_TCP_ADDR": "10.0.0.7", "RECSYS_NAME": "/web/recsys", "RECSYS_ENV_LANG": "C.UTF-8"}
    s = Settings.from_env({**platform, "RECSYS_METRICS_PORT": "9464"})
    assert (s.metrics_port, s.metrics_host) == (9464, "127.0.0.1")
    with pytest.raises(SettingsError, match="^RECSYS_SERVICE_HOSTS: not a setting"):
        Settings.from_env({"RECSYS_SERVICE_HOSTS": "x"})  # only those exact shapes


def test_a_wrong_variable_stops_a_command_in_one_line_before_it_connects(tmp_path):
    import os
    import subprocess
    import sys

    env = {**os.environ, "RECSYS_BOOTSTRAP_SERVER": "kafka:9092"}
    done = subprocess.run([sys.executable, "-m", "recsys_cli", "run", "--state-dir", str(tmp_path / "s")],
                          env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "recsys run: bad setting: RECSYS_BOOTSTRAP_SERVER: not a setting (did you mean RECSYS_BOOTSTRAP_SERVERS?)"]
