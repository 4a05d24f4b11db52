"""Settings: validation, the per-shard directories, and the hand-over to child processes."""

from __future__ import annotations

from pathlib import Path

import pytest

from recsys.settings import Settings, SettingsError


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
