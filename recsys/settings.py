"""One frozen settings object, built once at start-up and passed down.

Every field can be set by an environment variable (``RECSYS_`` + the field name in upper
case, e.g. ``RECSYS_BOOTSTRAP_SERVERS``) and by the CLI flag of the same name
(``--bootstrap-servers``). Nothing below start-up reads ``os.environ``: ``Settings(...)`` takes
only its arguments, and :meth:`Settings.from_env` reads the mapping it is given. pydantic-settings
reads the variables and pydantic validates them (types, ranges, choices); every refusal is a
one-line :class:`SettingsError` that names the variable.

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
import difflib
import importlib.util
import re
import types
from pathlib import Path
from typing import Any, Literal, Mapping, Union, get_args, get_origin

from pydantic import Field, ValidationError, ValidationInfo, field_validator, model_validator
from pydantic_settings import BaseSettings, EnvSettingsSource, PydanticBaseSettingsSource, SettingsConfigDict

ENV_PREFIX = "RECSYS_"


#: The characters of a Kafka topic name (Kafka's ``Topic.validate``).
_TOPIC_NAME = re.compile(r"[a-zA-Z0-9._-]+")
#: optional settings whose value may be the word "none" itself (see Settings._empty_is_none)
_LITERAL_NONE_OK = frozenset({"sasl_username", "sasl_password"})


def topic_name_error(name: str) -> str | None:
    """Why Kafka would refuse ``name`` as a topic's name (None: it would not).

    >>> topic_name_error("my events")
    "'my events' is not a Kafka topic name (1-249 of a-z, A-Z, 0-9, '.', '_', '-')"
    """
    if len(name) > 249 or name in (".", "..") or not _TOPIC_NAME.fullmatch(name):
        return f"{name!r} is not a Kafka topic name (1-249 of a-z, A-Z, 0-9, '.', '_', '-')"
    return None


class SettingsError(ValueError):
    """A setting with a value of the wrong type or out of range; names the variable."""


class Settings(BaseSettings):
    """Every setting, validated on construction (a bad one raises :class:`SettingsError`)."""

    # allow_inf_nan=False: no setting takes inf or nan (until 2026-12-07 RECSYS_SNAPSHOT_INTERVAL_S=inf
    # crashed the flow after it loaded, and a nan status interval switched the status line off unsaid)
    model_config = SettingsConfigDict(frozen=True, env_prefix=ENV_PREFIX, protected_namespaces=(), allow_inf_nan=False)

    # --- Kafka connection (kafka-python client options) ---
    bootstrap_servers: str = "127.0.0.1:9092"
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512", "OAUTHBEARER", "GSSAPI"] | None = None
    sasl_username: str | None = None
    sasl_password: str | None = None
    ssl_cafile: str | None = None
    # --- topics ---
    events_topic: str = "events"
    catalog_topic: str = "catalog"
    recommendations_topic: str = "recommendations"
    dead_letters_topic: str = "dead-letters"
    # --- consumption ---
    poll_max_records: int = Field(1000, gt=0)  # records per poll per partition: the batch the flow coalesces
    fetch_max_wait_ms: int = Field(20, ge=0, le=10_000)  # broker-side wait for data; bounds idle latency
    # catalog records one batch of the running flow takes at most: a bulk import of new text is
    # embedded a slice at a time (~3 ms an item here), the events behind it served between slices
    catalog_poll_max_records: int = Field(64, gt=0)
    max_message_bytes: int = Field(64 * 1024, gt=0)  # larger messages are dead-lettered as oversized
    stop_at_end: bool = False  # stop at the high watermark seen at start (a run that ends: benchmarks, tests)
    # --- scale-out: N independent processes, each owning the events partitions p % N == shard ---
    shards: int = 1
    shard: int = 0
    # issue 11: shards learn the global signals from everyone's events through an exchange log
    share_signals: bool = False
    exchange_topic: str = "signal-exchange"  # the exchange log: one partition, every shard reads all of it
    # issue 11 bootstrapping: snapshots of the shared records a new or wiped shard starts from
    # (recsys/signals/snapshot.py); one directory every shard can read and write (not per shard)
    exchange_snapshot_dir: str | None = "var/exchange-snapshots"  # None: no snapshots written or read
    exchange_snapshot_interval_s: float = Field(300.0, ge=0)  # a running shard writes one this often (0: never)
    # issue 11 train/serve split (recsys/signals/trainer.py): with sharing, one trainer trains the shared
    # head and re-ranker from the exchange log and publishes snapshots (in exchange_snapshot_dir) that
    # the shards load between batches; off: every shard trains them itself from the log
    model_trainer: bool = False
    trainer_publish_messages: int = Field(20, gt=0)  # the trainer publishes after this many messages learned ...
    trainer_publish_s: float = Field(1.0, ge=0)  # ... or this many seconds, whichever comes first (if the models changed)
    # --- state and recovery ---
    state_dir: str = "var/state"  # RocksDB user state + global signals
    recovery_dir: str | None = "var/recovery"  # Bytewax recovery snapshots; None disables
    snapshot_interval_s: float = Field(2.0, gt=0)  # Bytewax epoch length = offset snapshot interval
    history_len: int = Field(50, gt=0)  # recent events kept per user
    state_ttl_days: float = Field(90.0, gt=0)  # users idle longer than this are evicted on next touch/sweep
    # --- embeddings ---
    model_name: str = "all-MiniLM-L6-v2"  # the packaged model, or any sentence-transformers path
    embed_cache_dir: str = "var/embeddings"
    embed_batch_size: int = Field(64, gt=0)
    # new item text and new search queries embedded by a process of its own, off the batch's path
    # (recsys/items/worker.py); live runs on persistent state only, not with shared signals,
    # admitted unknown items or a wait of 0
    embed_worker: bool = False
    catalog_file: str | None = None  # JSONL of catalog items loaded at start-up
    # --- recommendations ---
    top_k: int = Field(10, gt=0, le=1_000)
    interest_half_life_h: float = Field(24.0 * 7, gt=0)  # decay of the user interest vector and counts
    popularity_half_life_h: float = Field(24.0, gt=0)  # decay of "trending"
    covisit_half_life_h: float = Field(24.0 * 30, gt=0)
    covisit_neighbours: int = Field(50, gt=0)  # co-visitation neighbours kept per item (bounds memory)
    # issue 12: cells of the inverted file each vector search reads, once the catalog has 5,000 items
    # or more (faiss nprobe, of ~2*sqrt(items) cells); fewer is faster and can miss candidates: a
    # quality-for-speed setting (both measured: benchmarks/README.md), 16 = the answers before it
    ivf_nprobe: int = Field(16, gt=0)
    unknown_items: Literal["dead_letter", "admit"] = "dead_letter"
    # issue 12: bounds on the session-neighbour query's work as state grows (each changes the
    # recommendations, so 0 = no bound, the default; recsys/signals/sessions.py)
    session_query_items: int = Field(0, ge=0)  # the query is the current session's last N items (0: all it holds, up to 50)
    session_postings_scanned: int = Field(0, ge=0)  # postings read per query item, most recent first (0: all, up to 500)
    session_vote_items: int = Field(0, ge=0)  # each neighbour session votes for its last N items (0: all it holds)
    # --- learning ---
    head_enabled: bool = True  # the learned head over frozen vectors (off: interest vector retrieval)
    head_steps_per_batch: int = Field(1, gt=0)  # at most this many steps each time the head trains (once 256 examples queued)
    head_lr: float = Field(1e-3, gt=0)
    head_snapshot_interval_s: float = Field(30.0, ge=0)  # versioned head + re-ranker snapshots in state_dir/models
    seed: int = 0
    # --- issue 10 metrics/bootstrap ---
    unknown_item_wait_s: float = Field(2.0, ge=0)  # an event for an item not in the catalog yet waits this long for it, then is dead-lettered
    metrics_port: int | None = None  # Prometheus endpoint on 127.0.0.1:<port + shard>; None: off
    metrics_host: str = "127.0.0.1"  # address the metrics endpoint listens on (0.0.0.0 in a container)
    status_interval_s: float = 10.0  # a status line on stderr every this many seconds
    quiet: bool = False  # no status line
    slow_batch_ms: float = Field(500.0, ge=0)  # a batch that takes longer is logged on stderr with its phases (0: never)
    # --- issue 9 integrity ---
    # a partition's log no longer holds the offset the flow recovered (topic re-created,
    # retention, broker data loss): stop naming both offsets, or go on from its start / end
    on_offset_reset: Literal["fail", "earliest", "latest"] = "fail"
    # --- issue 9 state ---
    # events whose ts is further ahead of their message's broker timestamp are dead-lettered
    # (a clock bug must not age out or decay everyone else's state); 0 disables the check
    max_event_ahead_s: float = Field(3600.0, ge=0)
    dedup_window: int = Field(50, ge=0)  # event_ids remembered per user: a re-sent event_id is counted once
    sweep_keys_per_batch: int = Field(500, ge=0)  # user records checked for expiry per batch (0: no sweep)
    control_topic: str = "control"  # erasure requests ({"type": "forget_user", "user_id": ...})
    # --- issue 14 ---
    rerank_enabled: bool = True  # the online re-ranker learns from what users did next (off: the hand-set blend only)
    # --- issue 13 search ---
    search_results_topic: str = "search-results"  # output topic of answers to `search` events
    search_k: int = Field(10, gt=0, le=1_000)  # items per search result
    search_personalise: bool = True  # re-rank search results for the shopper (off: the ablation)
    search_attribution: Literal["first+match", "match", "all"] = "first+match"  # engagements credited to a search's query: first+match|match|all (recsys/search/service.py)
    # queries whose candidates before the shopper (BM25 and vector-search answers, the merged
    # list) are kept in memory, least recently used dropped; each is caught up with every catalog
    # change (Search._refresh), so answers never depend on it. ~60-80 kB an entry (most of it BM25's hits) at 10k items
    search_query_cache: int = Field(1_000, ge=0)
    # shoppers whose last search's candidates and signals are kept for the search re-ranker's lesson
    # at their next engagement (~30 kB each at 10k items, ~300 candidates x 11 float64 signals: up
    # to ~1.4 GiB at 50,000); the re-ranker is off in the live score (SearchConfig.rerank), so 0
    # only stops its learning, never changes an answer (recsys/search/service.py, Search._remember)
    search_shown_users: int = Field(50_000, ge=0)
    search_in_history: bool = True  # a recent search's top items enter the user's next recommendations (recsys/search/intent.py)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # the arguments only: no os.environ, .env file or secrets directory behind the caller's back
        return (init_settings,)

    def __init__(self, **values: Any) -> None:
        try:
            super().__init__(**values)
        except ValidationError as exc:
            raise SettingsError(_one_line(exc)) from None

    @classmethod
    def env_var(cls, name: str) -> str:
        return ENV_PREFIX + name.upper()

    @classmethod
    def from_env(cls, environ: Mapping[str, str], **overrides: Any) -> "Settings":
        """Settings from environment variables, then ``overrides`` (e.g. parsed CLI flags).

        A ``RECSYS_*`` variable that is no setting is refused, naming the nearest one: a typo
        (``RECSYS_BOOTSTRAP_SERVER``) would otherwise leave the default in force unnoticed. What
        Kubernetes or Docker links set for a service named ``recsys`` is left alone
        (:data:`PLATFORM_VARIABLES`)."""
        _refuse_unknown_variables(environ)
        values = _MappingEnvSource(cls, environ)()
        flags = {name: value for name, value in overrides.items() if value is not None}
        values.update(flags)
        try:
            return cls(**values)
        except SettingsError as exc:  # a value given as a flag is named as that flag (until 2026-12-07 as its variable)
            said = str(exc)
            for name in flags:
                if said.startswith(var := cls.env_var(name) + ":"):
                    raise SettingsError(f"--{name.replace('_', '-')}:{said[len(var):]}") from None
            raise

    def replace(self, **changes: Any) -> "Settings":
        """A copy with ``changes``, validated like any new settings."""
        return type(self)(**{**self.model_dump(), **changes})

    @field_validator("*", mode="before")
    @classmethod
    def _empty_is_none(cls, value: Any, info: ValidationInfo) -> Any:
        """An empty value, or ``none`` in any case, unsets an optional setting
        (``RECSYS_RECOVERY_DIR=`` or ``RECSYS_RECOVERY_DIR=none`` disables recovery). Until 2026-12-07
        ``none`` was taken as it was: a recovery directory named ``./None``, and a metrics port
        refused as not a number, although the README said "None disables". The SASL user name and
        password are taken as given (a password may be the word)."""
        if (isinstance(value, str) and (value == "" or (value.strip().lower() == "none" and info.field_name not in _LITERAL_NONE_OK))
                and type(None) in get_args(cls.model_fields[info.field_name].annotation)):
            return None
        return value

    @field_validator("sasl_mechanism")
    @classmethod
    def _sasl_mechanism_this_client_can_use(cls, mechanism: str | None) -> str | None:
        """Only the mechanisms a user name and password are enough for, plus GSSAPI where the
        ``gssapi`` package is installed (until 2026-12-07 OAUTHBEARER and GSSAPI were accepted here
        and failed when the client connected: OAUTHBEARER needs a token provider object, which no
        setting can give)."""
        if mechanism == "OAUTHBEARER":
            raise ValueError("OAUTHBEARER needs a token provider, which this program cannot be given; use PLAIN, "
                             "SCRAM-SHA-256 or SCRAM-SHA-512 (with --sasl-username and --sasl-password)")
        if mechanism == "GSSAPI" and importlib.util.find_spec("gssapi") is None:
            raise ValueError("GSSAPI (Kerberos) needs the Python package gssapi, which is not installed "
                             "(pip install gssapi, and a Kerberos ticket for this process); or use PLAIN, "
                             "SCRAM-SHA-256 or SCRAM-SHA-512")
        return mechanism

    @field_validator("events_topic", "catalog_topic", "recommendations_topic", "dead_letters_topic", "exchange_topic",
                     "control_topic", "search_results_topic")
    @classmethod
    def _topic_name(cls, name: str) -> str:
        """A name Kafka takes for a topic: 1-249 of ``a-z A-Z 0-9 . _ -``, not ``.`` or ``..``
        (until 2026-12-07 an empty ``RECSYS_EVENTS_TOPIC=`` or a name with a space got as far as
        the broker, which answered in its own words)."""
        if not name:
            raise ValueError("empty (an unset shell variable?); name the topic, or leave the setting out")
        if (wrong := topic_name_error(name)) is not None:
            raise ValueError(wrong)
        return name

    @field_validator("metrics_port")
    @classmethod
    def _tcp_port(cls, port: int | None) -> int | None:
        if port is not None and not 0 < port < 65536:
            raise ValueError(f"expected a TCP port, got {port}")
        return port

    @field_validator("status_interval_s")
    @classmethod
    def _status_interval(cls, seconds: float) -> float:
        if seconds <= 0:
            raise ValueError("must be > 0 (--quiet switches the status line off)")
        return seconds

    @field_validator("bootstrap_servers")
    @classmethod
    def _servers(cls, servers: str) -> str:
        """``host:port`` pairs, comma-separated (an empty one said "no Kafka broker answered at  ")."""
        for server in servers.split(","):
            host, _, port = server.strip().rpartition(":")
            if not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise ValueError(f"expected HOST:PORT[,HOST:PORT...], got {servers!r}")
        return servers

    @model_validator(mode="after")
    def _trainer_needs_sharing(self) -> "Settings":
        if self.model_trainer and not self.share_signals:  # ignored, unsaid, until 2026-12-07
            raise SettingsError(f"{self.env_var('model_trainer')}=true needs {self.env_var('share_signals')}=true "
                                f"(--model-trainer trains the models the shards share; give --share-signals too)")
        return self

    @model_validator(mode="after")
    def _shard_in_range(self) -> "Settings":
        if self.shards <= 0 or not 0 <= self.shard < self.shards:
            raise SettingsError(
                f"{self.env_var('shard')}={self.shard}, {self.env_var('shards')}={self.shards}: "
                "need shards >= 1 and 0 <= shard < shards"
            )
        return self

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
        for name in type(self).model_fields:
            value = getattr(self, name)
            out[self.env_var(name)] = "" if value is None else str(value).lower() if isinstance(value, bool) else str(value)
        return out

    def public_dict(self) -> dict[str, Any]:
        """All settings, with secrets masked, for logs and reports."""
        d = self.model_dump()
        if d.get("sasl_password"):
            d["sasl_password"] = "***"
        return d


class _MappingEnvSource(EnvSettingsSource):
    """pydantic-settings' environment source over a given mapping instead of ``os.environ``."""

    def __init__(self, settings_cls: type[BaseSettings], environ: Mapping[str, str]) -> None:
        self._environ = environ
        super().__init__(settings_cls)

    def _load_env_vars(self) -> Mapping[str, str | None]:
        # the variables are upper case (RECSYS_TOP_K); pydantic-settings looks them up lower-cased
        return {name.lower(): value for name, value in self._environ.items() if name == name.upper()}


#: What a platform sets in a process's environment for a service or a linked container named
#: ``recsys``, never a setting of ours: Kubernetes, in every pod of the namespace
#: (``RECSYS_SERVICE_HOST``, ``RECSYS_SERVICE_PORT[_<port name>]``, ``RECSYS_PORT[_9464_TCP[_ADDR]]``),
#: and Docker's legacy links (``RECSYS_NAME``, ``RECSYS_ENV_<var>``, the same ``RECSYS_PORT...``).
PLATFORM_VARIABLES = re.compile(
    r"RECSYS_(SERVICE_HOST|SERVICE_PORT(_[A-Z0-9_]+)?|PORT(_\d+_(TCP|UDP|SCTP)(_(PROTO|PORT|ADDR))?)?|NAME|ENV_[A-Z0-9_]+)")


def _refuse_unknown_variables(environ: Mapping[str, str]) -> None:
    known = {Settings.env_var(name) for name in Settings.model_fields}
    for var in environ:
        if var.upper().startswith(ENV_PREFIX) and var not in known and not PLATFORM_VARIABLES.fullmatch(var):
            near = difflib.get_close_matches(var.upper(), known, n=1, cutoff=0.8)
            hint = f"did you mean {near[0]}?" if near else "every setting: README, Settings"
            raise SettingsError(f"{var}: not a setting ({hint})")


_EXPECTED = {"int_parsing": "int", "int_type": "int", "int_from_float": "int", "float_parsing": "float",
             "float_type": "float", "bool_parsing": "bool", "bool_type": "bool", "string_type": "str"}
_BOUNDS = {"greater_than": ("gt", ">"), "greater_than_equal": ("ge", ">="), "less_than": ("lt", "<"),
           "less_than_equal": ("le", "<=")}


def _one_line(exc: ValidationError) -> str:
    """The first of pydantic's errors as one line that names the variable: ``RECSYS_TOP_K: expected int, got 'ten'``."""
    err = exc.errors(include_url=False)[0]
    kind, value, ctx = err["type"], err.get("input"), err.get("ctx") or {}
    if not err["loc"]:  # a check across fields (SettingsError) names its variables itself
        return str(ctx.get("error", err["msg"]))
    name = str(err["loc"][0])
    if kind == "extra_forbidden":
        return f"{name}: not a setting"
    var = Settings.env_var(name)
    if kind in _EXPECTED:
        return f"{var}: expected {_EXPECTED[kind]}, got {value!r}"
    if kind in _BOUNDS:
        key, op = _BOUNDS[kind]
        return f"{var}: must be {op} {ctx[key]}, got {value}"
    if kind == "literal_error":
        return f"{var}: expected one of {get_args(_scalar(Settings.model_fields[name].annotation))}, got {value!r}"
    if kind == "value_error":
        return f"{var}: {ctx['error']}"
    return f"{var}: {err['msg']}, got {value!r}"


def _scalar(annotation: Any) -> Any:
    """``int`` for ``int | None``; the annotation itself otherwise."""
    if get_origin(annotation) in (Union, types.UnionType):
        args = [a for a in get_args(annotation) if a is not type(None)]
        return args[0] if len(args) == 1 else annotation
    return annotation


def add_cli_flags(parser: Any, only: tuple[str, ...] | None = None) -> None:
    """Add one ``--flag`` per setting to an argparse parser (defaults come from the env);
    ``only``: just these settings (a command that uses a few lists only those in its help)."""
    for name, field in Settings.model_fields.items():
        if only is not None and name not in only:
            continue
        flag = "--" + name.replace("_", "-")
        kind = _scalar(field.annotation)
        helptext = f"(env {Settings.env_var(name)}, default {field.default!r})"
        if kind is bool:
            # --x / --no-x: a setting that defaults to true can be switched off too
            parser.add_argument(flag, dest=name, default=None, action=argparse.BooleanOptionalAction, help=helptext)
        elif kind in (int, float) and type(None) in get_args(field.annotation):
            # an optional number takes `none` too (--metrics-port none), checked by the settings
            parser.add_argument(flag, dest=name, default=None, help=helptext)
        elif kind in (int, float):
            parser.add_argument(flag, dest=name, default=None, type=kind, help=helptext)
        else:
            parser.add_argument(flag, dest=name, default=None, help=helptext)


def settings_from_args(args: Any, environ: Mapping[str, str]) -> Settings:
    """Settings from parsed :func:`add_cli_flags` flags over ``environ`` over the defaults."""
    overrides = {name: getattr(args, name, None) for name in Settings.model_fields}
    return Settings.from_env(environ, **overrides)
