"""One frozen settings object, built once at start-up and passed down.

Every field can be set by an environment variable (``RECSYS_`` + the field name in upper
case, e.g. ``RECSYS_BOOTSTRAP_SERVERS``) and by the CLI flag of the same name
(``--bootstrap-servers``). Nothing below start-up reads ``os.environ``.

>>> s = Settings.from_env({"RECSYS_TOP_K": "5", "RECSYS_EVENTS_TOPIC": "ev"})
>>> (s.top_k, s.events_topic, s.recommendations_topic)
(5, 'ev', 'recommendations')
>>> Settings.from_env({"RECSYS_TOP_K": "ten"})
Traceback (most recent call last):
...
recsys.settings.SettingsError: RECSYS_TOP_K: expected int, got 'ten'
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Literal, Mapping, get_args, get_origin

ENV_PREFIX = "RECSYS_"


class SettingsError(ValueError):
    """A setting with a value of the wrong type or out of range; names the variable."""


@dataclass(frozen=True)
class Settings:
    # --- Kafka connection (kafka-python client options) ---
    bootstrap_servers: str = "127.0.0.1:9092"
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    sasl_mechanism: str | None = None  # PLAIN, SCRAM-SHA-256, SCRAM-SHA-512
    sasl_username: str | None = None
    sasl_password: str | None = None
    ssl_cafile: str | None = None
    # --- topics ---
    events_topic: str = "events"
    catalog_topic: str = "catalog"
    recommendations_topic: str = "recommendations"
    dead_letters_topic: str = "dead-letters"
    # --- consumption ---
    poll_max_records: int = 1000  # records per poll per partition: the batch the flow coalesces
    fetch_max_wait_ms: int = 20  # broker-side wait for data; bounds idle latency
    max_message_bytes: int = 64 * 1024  # larger messages are dead-lettered as oversized
    stop_at_end: bool = False  # stop at the high watermark seen at start (demo, replay, bench)
    # --- scale-out: N independent processes, each owning the events partitions p % N == shard ---
    shards: int = 1
    shard: int = 0
    # --- state and recovery ---
    state_dir: str = "var/state"  # RocksDB user state + global signals
    recovery_dir: str | None = "var/recovery"  # Bytewax recovery snapshots; None disables
    snapshot_interval_s: float = 2.0  # Bytewax epoch length = offset snapshot interval
    history_len: int = 50  # recent events kept per user
    state_ttl_days: float = 90.0  # users idle longer than this are evicted on next touch/sweep
    # --- embeddings ---
    model_name: str = "all-MiniLM-L6-v2"  # the packaged model, or any sentence-transformers path
    embed_cache_dir: str = "var/embeddings"
    embed_batch_size: int = 64
    catalog_file: str | None = None  # JSONL of catalog items loaded at start-up
    # --- recommendations ---
    top_k: int = 10
    interest_half_life_h: float = 24.0 * 7  # decay of the user interest vector and counts
    popularity_half_life_h: float = 24.0  # decay of "trending"
    covisit_half_life_h: float = 24.0 * 30
    covisit_neighbours: int = 50  # co-visitation neighbours kept per item (bounds memory)
    unknown_items: Literal["dead_letter", "admit"] = "dead_letter"
    # --- learning ---
    head_enabled: bool = True  # the learned head over frozen vectors (off: interest vector retrieval)
    head_steps_per_batch: int = 1  # optimizer steps per polled batch: bounds training cost
    head_lr: float = 1e-3
    head_snapshot_interval_s: float = 30.0  # versioned head + re-ranker snapshots in state_dir/models
    seed: int = 0
    # --- issue 9 integrity ---
    # a partition's log no longer holds the offset the flow recovered (topic re-created,
    # retention, broker data loss): stop naming both offsets, or go on from its start / end
    on_offset_reset: Literal["fail", "earliest", "latest"] = "fail"

    @classmethod
    def env_var(cls, name: str) -> str:
        return ENV_PREFIX + name.upper()

    @classmethod
    def from_env(cls, environ: Mapping[str, str], **overrides: Any) -> "Settings":
        """Settings from environment variables, then ``overrides`` (e.g. parsed CLI flags)."""
        values: dict[str, Any] = {}
        for f in fields(cls):
            var = cls.env_var(f.name)
            if var in environ:
                values[f.name] = _coerce(var, f.type, environ[var])
        for name, value in overrides.items():
            if value is not None:
                values[name] = value
        return cls(**values)

    def replace(self, **changes: Any) -> "Settings":
        return dataclasses.replace(self, **changes)

    def __post_init__(self) -> None:
        positive = ("poll_max_records", "max_message_bytes", "history_len", "top_k", "embed_batch_size", "covisit_neighbours", "head_steps_per_batch")
        for name in positive:
            if getattr(self, name) <= 0:
                raise SettingsError(f"{self.env_var(name)}: must be > 0, got {getattr(self, name)}")
        if self.shards <= 0 or not 0 <= self.shard < self.shards:
            raise SettingsError(
                f"{self.env_var('shard')}={self.shard}, {self.env_var('shards')}={self.shards}: "
                "need shards >= 1 and 0 <= shard < shards"
            )
        if self.snapshot_interval_s <= 0:
            raise SettingsError(f"{self.env_var('snapshot_interval_s')}: must be > 0")
        for f in fields(self):
            allowed = _literal_choices(f.type)
            if allowed and getattr(self, f.name) not in allowed:
                raise SettingsError(f"{self.env_var(f.name)}: expected one of {allowed}, got {getattr(self, f.name)!r}")

    def for_shard(self) -> "Settings":
        """The settings one shard process runs with: with several shards, each keeps its own
        state and recovery directories (``<dir>/shard-<i>``; one RocksDB cannot be shared by
        two processes). One shard runs with the directories as given."""
        if self.shards == 1:
            return self
        sub = f"shard-{self.shard}"
        return self.replace(
            state_dir=str(Path(self.state_dir) / sub),
            recovery_dir=str(Path(self.recovery_dir) / sub) if self.recovery_dir else None,
        )

    def kafka_options(self) -> dict[str, Any]:
        """Connection options common to kafka-python's KafkaConsumer and KafkaProducer."""
        opts: dict[str, Any] = {
            "bootstrap_servers": self.bootstrap_servers.split(","),
            "security_protocol": self.security_protocol,
        }
        if self.sasl_mechanism:
            opts["sasl_mechanism"] = self.sasl_mechanism
            opts["sasl_plain_username"] = self.sasl_username
            opts["sasl_plain_password"] = self.sasl_password
        if self.ssl_cafile:
            opts["ssl_cafile"] = self.ssl_cafile
        return opts

    def to_env(self) -> dict[str, str]:
        """Every setting as its ``RECSYS_*`` variable: how a parent process hands its settings
        (secrets included, never on a command line) to the child processes it starts.
        ``Settings.from_env(s.to_env()) == s``."""
        out: dict[str, str] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            out[self.env_var(f.name)] = "" if value is None else str(value).lower() if isinstance(value, bool) else str(value)
        return out

    def public_dict(self) -> dict[str, Any]:
        """All settings, with secrets masked, for logs and reports."""
        d = dataclasses.asdict(self)
        if d.get("sasl_password"):
            d["sasl_password"] = "***"
        return d


def _literal_choices(tp: Any) -> tuple[Any, ...]:
    tp = _resolve(tp)
    return get_args(tp) if get_origin(tp) is Literal else ()


def _resolve(tp: Any) -> Any:
    if isinstance(tp, str):  # from __future__ annotations
        return eval(tp, {"Literal": Literal})  # noqa: S307 - our own annotations only
    return tp


def _coerce(var: str, tp: Any, raw: str) -> Any:
    text = str(_resolve(tp)) if not isinstance(tp, str) else tp
    if raw == "" and "None" in text:
        return None
    try:
        if text.startswith("int"):
            return int(raw)
        if text.startswith("float"):
            return float(raw)
        if text.startswith("bool"):
            lowered = raw.strip().lower()
            if lowered in ("1", "true", "yes", "on"):
                return True
            if lowered in ("0", "false", "no", "off"):
                return False
            raise ValueError(raw)
    except ValueError:
        kind = text.split(" ")[0].split("|")[0]
        raise SettingsError(f"{var}: expected {kind}, got {raw!r}") from None
    return raw


def add_cli_flags(parser: Any, only: tuple[str, ...] | None = None) -> None:
    """Add one ``--flag`` per setting to an argparse parser (defaults come from the env);
    ``only``: just these settings (a command that uses a few lists only those in its help)."""
    for f in fields(Settings):
        if only is not None and f.name not in only:
            continue
        flag = "--" + f.name.replace("_", "-")
        text = f.type if isinstance(f.type, str) else str(f.type)
        helptext = f"(env {Settings.env_var(f.name)}, default {f.default!r})"
        if text.startswith("bool"):
            # --x / --no-x: a setting that defaults to true can be switched off too
            parser.add_argument(flag, dest=f.name, default=None, action=argparse.BooleanOptionalAction, help=helptext)
        elif text.startswith("int"):
            parser.add_argument(flag, dest=f.name, default=None, type=int, help=helptext)
        elif text.startswith("float"):
            parser.add_argument(flag, dest=f.name, default=None, type=float, help=helptext)
        else:
            parser.add_argument(flag, dest=f.name, default=None, help=helptext)


def settings_from_args(args: Any, environ: Mapping[str, str]) -> Settings:
    overrides = {f.name: getattr(args, f.name, None) for f in fields(Settings)}
    return Settings.from_env(environ, **overrides)
