"""docker-compose.yml and the Dockerfile stay true to the code (no Docker engine needed).

Parsed with PyYAML: the services exist and are wired in order, every RECSYS_* variable is a
real setting, the topics created are exactly the settings' topic defaults, and the torch pin
matches pyproject.toml.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from recsys.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
COMPOSE_FILE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
#: every topic the flow reads or writes (the flow creates control and search-results when missing,
#: but a production Kafka usually forbids that: kafka-init creates them all)
TOPIC_FIELDS = ("events_topic", "catalog_topic", "recommendations_topic", "dead_letters_topic", "control_topic",
                "search_results_topic", "exchange_topic")
SETTING_VARS = {Settings.env_var(name) for name in Settings.model_fields}


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE_FILE.read_text())


def environment(service: dict[str, Any]) -> dict[str, str]:
    """A service's environment as a dict, whether written as a mapping or a list."""
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: str(v) for k, v in env.items()}


def command_text(service: dict[str, Any]) -> str:
    parts = [service.get("entrypoint") or [], service.get("command") or []]
    return "\n".join(p if isinstance(p, str) else "\n".join(map(str, p)) for p in parts)


def created_topics(compose: dict[str, Any]) -> dict[str, str]:
    """Topic name -> the rest of its kafka-topics.sh line, for every topic kafka-init creates."""
    lines = [line for line in command_text(compose["services"]["kafka-init"]).splitlines() if "--topic" in line]
    return {re.search(r"--topic\s+(\S+)", line)[1]: line for line in lines}


def test_compose_has_kafka_kafka_init_and_recsys_services(compose: dict[str, Any]) -> None:
    assert {"kafka", "kafka-init", "recsys"} <= set(compose["services"])


def test_recsys_is_built_from_the_repository_dockerfile(compose: dict[str, Any]) -> None:
    build = compose["services"]["recsys"]["build"]
    context = ROOT / (build if isinstance(build, str) else build.get("context", "."))
    dockerfile = build.get("dockerfile", "Dockerfile") if isinstance(build, dict) else "Dockerfile"
    assert (context / dockerfile).resolve() == DOCKERFILE
    assert DOCKERFILE.is_file()


def test_recsys_runs_the_live_dataflow(compose: dict[str, Any]) -> None:
    assert compose["services"]["recsys"]["command"] == ["run"]
    assert 'ENTRYPOINT ["recsys"]' in DOCKERFILE.read_text()


def test_every_recsys_variable_in_compose_is_a_real_setting(compose: dict[str, Any]) -> None:
    used = {var for service in compose["services"].values() for var in environment(service) if var.startswith("RECSYS_")}
    commented = set(re.findall(r"#\s*(RECSYS_[A-Z0-9_]+):", COMPOSE_FILE.read_text()))
    assert used, "the recsys service sets no RECSYS_* variables"
    assert (used | commented) - SETTING_VARS == set()


def test_every_recsys_variable_in_the_dockerfile_is_a_real_setting() -> None:
    assert set(re.findall(r"\bRECSYS_[A-Z0-9_]+", DOCKERFILE.read_text())) - SETTING_VARS == set()


def test_every_volume_of_the_image_is_where_a_directory_setting_points_and_back() -> None:
    """A plain ``docker run`` of the image keeps each directory the program writes on a volume
    the non-root user owns (until 2026-12-07 the image declared /data/exchange-snapshots but set
    no RECSYS_EXCHANGE_SNAPSHOT_DIR: a sharing run wrote to /app/var, root's, and was refused)."""
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    volumes = set(re.findall(r'"(/[^"]+)"', re.search(r"^VOLUME \[(.*)\]", text, re.M).group(1)))
    env = dict(re.findall(r"\b(RECSYS_[A-Z0-9_]+)=(\S+)", text))
    directories = {Settings.env_var(name) for name in Settings.model_fields if name.endswith("_dir")}
    assert {value for var, value in env.items() if var in directories} == volumes
    assert directories - set(env) == set(), "a directory setting the image leaves at its default (under /app)"


def test_compose_settings_are_accepted_by_settings_from_env(compose: dict[str, Any]) -> None:
    settings = Settings.from_env(environment(compose["services"]["recsys"]))
    assert settings.bootstrap_servers == "kafka:9092"


def test_recsys_topics_equal_the_settings_defaults(compose: dict[str, Any]) -> None:
    env = environment(compose["services"]["recsys"])
    for name in TOPIC_FIELDS:
        assert env.get(Settings.env_var(name), getattr(Settings(), name)) == getattr(Settings(), name)


def test_kafka_init_creates_exactly_the_settings_topics(compose: dict[str, Any]) -> None:
    assert sorted(created_topics(compose)) == sorted(getattr(Settings(), name) for name in TOPIC_FIELDS)


def test_every_topic_is_created_idempotently_with_a_partition_count(compose: dict[str, Any]) -> None:
    for topic, line in created_topics(compose).items():
        assert "--if-not-exists" in command_text(compose["services"]["kafka-init"]), topic
        assert re.search(r"--partitions\s+[1-9][0-9]*", line), topic


def test_only_the_catalog_topic_is_compacted(compose: dict[str, Any]) -> None:
    compacted = {t for t, line in created_topics(compose).items() if "cleanup.policy=compact" in line}
    assert compacted == {Settings().catalog_topic}


def test_kafka_runs_in_kraft_mode(compose: dict[str, Any]) -> None:
    env = environment(compose["services"]["kafka"])
    roles = env.get("KAFKA_PROCESS_ROLES") or env.get("KAFKA_CFG_PROCESS_ROLES")
    assert roles is not None and set(roles.split(",")) == {"broker", "controller"}
    assert "KAFKA_ZOOKEEPER_CONNECT" not in env
    assert env["KAFKA_CONTROLLER_QUORUM_VOTERS"].startswith(env["KAFKA_NODE_ID"] + "@")


def test_kafka_has_a_healthcheck(compose: dict[str, Any]) -> None:
    healthcheck = compose["services"]["kafka"]["healthcheck"]
    assert "kafka" in " ".join(healthcheck["test"]) and healthcheck.get("retries", 0) > 0


def test_kafka_init_waits_for_a_healthy_kafka(compose: dict[str, Any]) -> None:
    assert compose["services"]["kafka-init"]["depends_on"]["kafka"]["condition"] == "service_healthy"


def test_recsys_waits_for_kafka_init_to_complete(compose: dict[str, Any]) -> None:
    condition = compose["services"]["recsys"]["depends_on"]["kafka-init"]["condition"]
    assert condition == "service_completed_successfully"


def test_recsys_keeps_its_state_directories_on_volumes(compose: dict[str, Any]) -> None:
    recsys = compose["services"]["recsys"]
    env = environment(recsys)
    targets = {str(v).split(":")[1] for v in recsys["volumes"]}
    for name in ("state_dir", "recovery_dir", "embed_cache_dir"):
        assert env[Settings.env_var(name)] in targets, name
    assert {str(v).split(":")[0] for v in recsys["volumes"]} <= set(compose["volumes"])


def test_dockerfile_pins_the_same_torch_as_pyproject() -> None:
    dependencies = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    pins = [d.replace(" ", "") for d in dependencies if re.match(r"torch\s*==", d)]
    assert pins == ["torch==2.13.0"]
    dockerfile = DOCKERFILE.read_text()
    assert re.findall(r"\btorch==[\w.+]+", dockerfile) == pins
    assert "download.pytorch.org/whl/cpu" in dockerfile


def test_dockerfile_installs_the_project_offline_on_python_3_11() -> None:
    dockerfile = DOCKERFILE.read_text()
    assert re.search(r"^FROM python:3\.11-slim\b", dockerfile, re.M)
    assert re.search(r"pip install \.(\s|$)", dockerfile)
    assert "HF_HUB_OFFLINE=1" in dockerfile


def test_dockerfile_compiles_the_signals_loops_from_the_installed_package(tmp_path) -> None:
    """The image compiles numba's loops at build time (no container compiles them in its first
    batch); the step runs outside the source tree so it warms the installed copy, and the module
    it names runs."""
    dockerfile = DOCKERFILE.read_text()
    step = re.search(r"\(cd / && python -m ([\w.]+)\)", dockerfile)
    assert step and step.group(1) == "recsys.signals.compile_kernels"
    assert dockerfile.index("pip install .") < step.start() < dockerfile.index("USER recsys")
    out = subprocess.run([sys.executable, "-m", step.group(1)], cwd=tmp_path, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "compiled loops ready" in out.stdout


_TOUCH_64_MIB = """
import ctypes, resource
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
block = libc.malloc(64 << 20)  # glibc's malloc, as torch's and numpy's allocations use it
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
ctypes.memset(block, 1, 64 << 20)  # the first touch of every page
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def test_the_image_and_the_demo_put_glibcs_heap_in_huge_pages_and_it_takes_effect() -> None:
    """The Docker image and scripts/demo.sh set the same tunable (README, "Operating it": the
    memory allocator), and it is one this machine's glibc applies: touching a 64 MiB block takes
    a few dozen page faults with it, not one per 4 KiB page (16,384)."""
    match = re.search(r"\bGLIBC_TUNABLES=(\S+)", DOCKERFILE.read_text())
    assert match and match.group(1) == "glibc.malloc.hugetlb=1"
    assert 'GLIBC_TUNABLES="${GLIBC_TUNABLES:-glibc.malloc.hugetlb=1}"' in (ROOT / "scripts" / "demo.sh").read_text()
    thp = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    if not sys.platform.startswith("linux") or not thp.is_file() or "[never]" in thp.read_text():
        pytest.skip("transparent huge pages are off (or not Linux): the tunable has nothing to change here")

    def faults(tunables: str) -> int:
        env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"} | ({"GLIBC_TUNABLES": tunables} if tunables else {})
        out = subprocess.run([sys.executable, "-c", _TOUCH_64_MIB], env=env, capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        return int(out.stdout)

    assert faults("") > 8_000  # the default: about one fault per page
    assert faults(match.group(1)) < 1_000


def test_dockerignore_keeps_local_state_out_of_the_build() -> None:
    ignored = set((ROOT / ".dockerignore").read_text().split())
    assert {".venv", "var", "runs", ".git"} <= ignored


# ---------------------------------------------------------------- metrics (issue 10)

DEPLOY = ROOT / "deploy"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "recsys.json"


def _dashboard_exprs() -> list[str]:
    import json

    def walk(node: Any) -> list[str]:
        if isinstance(node, dict):
            return ([node["expr"]] if isinstance(node.get("expr"), str) else []) + [e for v in node.values() for e in walk(v)]
        if isinstance(node, list):
            return [e for v in node for e in walk(v)]
        return []

    return walk(json.loads(DASHBOARD.read_text()))


def test_every_metric_the_dashboard_queries_is_one_the_code_exports() -> None:
    from dataflows.metrics import FlowMetrics, TrainerMetrics

    exported = FlowMetrics(Settings(), status=None).series_names() | TrainerMetrics(Settings()).series_names()
    queried = {name for expr in _dashboard_exprs() for name in re.findall(r"\brecsys_[a-z0-9_]+", expr)}
    assert len(queried) >= 10
    assert queried - exported == set()


def test_the_dashboard_shows_throughput_lag_latency_dead_letters_and_freshness() -> None:
    exprs = " ".join(_dashboard_exprs())
    for needle in ("recsys_events_in_total", "recsys_consumer_lag_records", "histogram_quantile(0.99",
                   "recsys_event_to_recommendation_seconds_bucket", "recsys_dead_letters_total",
                   "recsys_model_update_age_seconds"):
        assert needle in exprs, needle


def scrape_targets() -> dict[str, dict[str, str]]:
    """``host:port`` -> its labels (the job's name as ``job``), for every target Prometheus scrapes."""
    config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    return {target: {"job": job["job_name"], **{k: str(v) for k, v in (sc.get("labels") or {}).items()}}
            for job in config["scrape_configs"] for sc in job["static_configs"] for target in sc["targets"]}


def metrics_endpoints(compose: dict[str, Any]) -> dict[str, str]:
    """``service:port`` -> the service, for every process a compose service runs that serves
    metrics (RECSYS_METRICS_PORT set), at the port the code serves it on: a flow at
    ``metrics_port + shard``, the trainer at ``metrics_port + shards`` (dataflows/metrics.py),
    `run --processes N` as N shards (and its trainer with --model-trainer)."""
    from dataflows.metrics import FlowMetrics, TrainerMetrics
    from recsys_cli.main import build_parser, cmd_run, cmd_trainer

    found: dict[str, str] = {}
    for name, service in compose["services"].items():
        env = environment(service)
        if "RECSYS_METRICS_PORT" not in env:
            continue
        settings = Settings.from_env(env)
        args = build_parser().parse_args(service["command"])
        assert args.func in (cmd_run, cmd_trainer), name
        assert settings.metrics_host == "0.0.0.0", name  # reachable from the prometheus container
        if args.func is cmd_trainer:
            endpoints = [TrainerMetrics(settings)]
        elif args.processes > 1:
            per_process = settings.replace(shards=args.processes)
            endpoints = [FlowMetrics(per_process.replace(shard=i), status=None) for i in range(args.processes)]
            endpoints += [TrainerMetrics(per_process)] if settings.model_trainer else []
        else:
            endpoints = [FlowMetrics(settings, status=None)]
        for endpoint in endpoints:
            found[f"{name}:{endpoint.port}"] = name
    return found


def test_prometheus_scrapes_the_port_the_recsys_service_serves_metrics_on(compose: dict[str, Any]) -> None:
    env = environment(compose["services"]["recsys"])
    settings = Settings.from_env(env)
    assert settings.metrics_port is not None and settings.metrics_host == "0.0.0.0"
    assert f"recsys:{settings.metrics_port}" in scrape_targets()


def test_every_process_serving_metrics_is_a_scrape_target_at_its_port_and_no_other_is(compose: dict[str, Any]) -> None:
    """Issue 11: the shard replicas and the trainer too, each in its own container at the port the
    code gives it (shard-1 serves :9465 there, not :9464), labelled with its service so the
    dashboard can tell them apart; and no target names a port nothing serves."""
    endpoints = metrics_endpoints(compose)
    targets = scrape_targets()
    shards, trainers = shard_services(compose), trainer_services(compose)
    assert set(shards) | set(trainers) | {"recsys"} <= set(endpoints.values())  # every kind is served
    assert set(endpoints) == set(targets)
    for target, service in endpoints.items():
        labels = targets[target]
        role = "trainer" if service in trainers else "shard" if service in shards else "single"
        assert (labels.get("service"), labels.get("role")) == (service, role), target
    # a target's labels must not collide with a metric's own labels (recsys_shard_info has `shard`)
    from dataflows.metrics import FlowMetrics, TrainerMetrics

    metric_labels = {label for m in (FlowMetrics(Settings(), status=None), TrainerMetrics(Settings()))
                     for family in m.registry.collect() for sample in family.samples for label in sample.labels}
    assert {k for labels in targets.values() for k in labels} & metric_labels == set()


def test_prometheus_starts_without_the_one_process_service(compose: dict[str, Any]) -> None:
    """`docker compose --profile shards up ... prometheus grafana` must not start `recsys` beside the
    shard replicas (it would read every events partition a second time): Prometheus depends on no
    service that serves metrics, and scrapes whichever deployment is up."""
    depends = compose["services"]["prometheus"].get("depends_on") or []
    assert set(depends) & set(metrics_endpoints(compose).values()) == set()


def test_the_dashboard_shows_the_shared_model_versions_and_ages_per_shard_and_trainer() -> None:
    exprs = _dashboard_exprs()
    joined = " ".join(exprs)
    for needle in ("recsys_trainer_published_model_offset", "recsys_trainer_published_model_age_seconds",
                   "recsys_served_model_offset", "recsys_served_model_age_seconds", "recsys_trainer_lag_records"):
        assert needle in joined, needle
    # the shards' series are told apart by the label the scrape config gives every target
    for needle in ("recsys_served_model_offset", "recsys_served_model_age_seconds"):
        assert any(needle in e and "by (service)" in e for e in exprs), needle
    assert all("service" in labels for labels in scrape_targets().values())


def test_prometheus_and_grafana_mount_files_that_exist(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert {"prometheus", "grafana"} <= set(services)
    for name in ("prometheus", "grafana"):
        for volume in services[name]["volumes"]:
            source = str(volume).split(":")[0]
            if source.startswith("./"):
                assert (ROOT / source).exists(), (name, source)
    datasource = yaml.safe_load((DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yml").read_text())
    assert datasource["datasources"][0]["url"] == "http://prometheus:9090"
    provider = yaml.safe_load((DEPLOY / "grafana" / "provisioning" / "dashboards" / "recsys.yml").read_text())
    mounted = {str(v).split(":")[1] for v in services["grafana"]["volumes"]}
    assert provider["providers"][0]["options"]["path"] in mounted


# ---------------------------------------------------------------- shard replicas (issue 11)


def shard_services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The services that run one sharing shard each (RECSYS_SHARE_SIGNALS on, `recsys run`)."""
    return {name: s for name, s in compose["services"].items()
            if Settings.from_env(environment(s)).share_signals and name != "recsys" and name not in trainer_services(compose)}


def trainer_services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The services that run the model trainer (`recsys trainer`)."""
    return {name: s for name, s in compose["services"].items() if s.get("command") == ["trainer"]}


def mounts(service: dict[str, Any]) -> dict[str, str]:
    """A service's mount target -> its source (a named volume or a path)."""
    return {str(v).split(":")[1]: str(v).split(":")[0] for v in service.get("volumes", [])}


def test_compose_runs_n_shard_replicas_sharing_the_signals(compose: dict[str, Any]) -> None:
    shards = shard_services(compose)
    settings = [Settings.from_env(environment(s)) for s in shards.values()]
    n = len(shards)
    assert n >= 2
    assert {s.shards for s in settings} == {n}  # every replica knows how many there are
    assert sorted(s.shard for s in settings) == list(range(n))  # each index once
    for name, service in shards.items():
        assert "shards" in service.get("profiles", []), name  # not started next to the one-process service
        assert service["depends_on"]["kafka-init"]["condition"] == "service_completed_successfully", name
        assert service["command"] == ["run"], name
    events = created_topics(compose)[Settings().events_topic]
    assert int(re.search(r"--partitions\s+(\d+)", events)[1]) % n == 0  # every shard gets partitions


def test_each_shard_keeps_its_own_state_and_all_share_one_snapshot_volume(compose: dict[str, Any]) -> None:
    own, shared = [], set()
    for name, service in shard_services(compose).items():
        settings = Settings.from_env(environment(service))
        mounts = {str(v).split(":")[1]: str(v).split(":")[0] for v in service["volumes"]}
        assert settings.exchange_snapshot_dir and settings.exchange_snapshot_interval_s > 0, name
        shared.add(mounts[settings.exchange_snapshot_dir])  # a volume, not the container's disk
        own.append((mounts[settings.state_dir], mounts[settings.recovery_dir]))
        assert set(mounts.values()) <= set(compose["volumes"]), name
    assert len(shared) == 1  # one snapshot directory for all: a new shard finds the others' snapshots
    assert len({v for pair in own for v in pair}) == 2 * len(own)  # no two shards share a RocksDB or recovery


def test_the_exchange_topic_is_one_partition_with_delete_retention_longer_than_the_snapshot_interval(
        compose: dict[str, Any]) -> None:
    line = created_topics(compose)[Settings().exchange_topic]
    assert re.search(r"--partitions\s+1\b", line)  # one total order
    assert "cleanup.policy=delete" in line and "compact" not in line  # operations, not latest values per key
    retention_ms = int(re.search(r"retention\.ms=(\d+)", line)[1])
    for service in shard_services(compose).values():
        interval_s = Settings.from_env(environment(service)).exchange_snapshot_interval_s
        assert retention_ms >= 10 * interval_s * 1000  # a snapshot always covers what retention deleted


# ---------------------------------------------------------------- the model trainer (issue 11)


def test_compose_runs_one_model_trainer_beside_the_shard_replicas(compose: dict[str, Any]) -> None:
    from recsys_cli.main import build_parser, cmd_trainer

    [(name, trainer)] = trainer_services(compose).items()
    assert build_parser().parse_args(trainer["command"]).func is cmd_trainer  # `recsys trainer`, the image's entrypoint
    assert 'ENTRYPOINT ["recsys"]' in DOCKERFILE.read_text() and "entrypoint" not in trainer
    assert trainer["image"] == compose["services"]["recsys"]["image"]
    assert "shards" in trainer["profiles"]  # started with the replicas, not beside the one-process service
    assert trainer["depends_on"]["kafka-init"]["condition"] == "service_completed_successfully"  # the topics exist
    for shard_name, shard in shard_services(compose).items():
        # every shard starts it (a served shard without a trainer would serve its first models for
        # ever), and stops before it: the trainer learns the log to its end at its stop
        assert shard["depends_on"][name]["condition"] == "service_started", shard_name
    assert trainer.get("restart") == "unless-stopped"


def test_the_shards_load_the_trainers_models_only_when_a_trainer_runs(compose: dict[str, Any]) -> None:
    served = {Settings.from_env(environment(s)).model_trainer for s in shard_services(compose).values()}
    assert served == {bool(trainer_services(compose))}


def test_the_trainer_shares_the_shards_snapshot_volume_and_keeps_its_own_state(compose: dict[str, Any]) -> None:
    from dataflows.trainer import trainer_settings

    [trainer] = trainer_services(compose).values()
    settings = Settings.from_env(environment(trainer))
    own = mounts(trainer)
    shards = [(Settings.from_env(environment(s)), mounts(s)) for s in shard_services(compose).values()]
    # the model snapshots it publishes are where the shards look, on the one volume they share
    assert {own[settings.exchange_snapshot_dir]} == {m[s.exchange_snapshot_dir] for s, m in shards}
    assert own[settings.exchange_snapshot_dir] in compose["volumes"]
    # its RocksDB (under <state dir>/trainer) is on a volume of its own, no shard's
    state = own[settings.state_dir]
    assert trainer_settings(settings).state_dir.startswith(settings.state_dir + "/") and state in compose["volumes"]
    assert all(state not in m.values() for _, m in shards)
    assert set(own.values()) <= set(compose["volumes"])


def test_the_trainer_runs_with_the_shards_settings(compose: dict[str, Any]) -> None:
    """It trains the models the shards serve: the same head, re-ranker, topics, snapshot directory
    and model; its environment is each shard's without the shard's index."""
    [trainer] = trainer_services(compose).values()
    env = environment(trainer)
    assert "RECSYS_SHARD" not in env
    for name, shard in shard_services(compose).items():
        assert {k: v for k, v in environment(shard).items() if k != "RECSYS_SHARD"} == env, name
    settings = Settings.from_env(env)
    assert settings.share_signals and settings.exchange_snapshot_dir and settings.exchange_snapshot_interval_s > 0
    assert settings.metrics_port is not None and settings.metrics_host == "0.0.0.0"  # served on port + shards


def test_every_directory_a_volume_is_mounted_on_exists_in_the_image_for_its_user(compose: dict[str, Any]) -> None:
    """A fresh named volume takes the ownership of the image's directory it is mounted on; where the
    image has none, it is root's, and the image's non-root user cannot write it (the shards' and
    the trainer's exchange-snapshots volume was such a one)."""
    dockerfile = DOCKERFILE.read_text()
    made = set(re.search(r"mkdir -p ([^\\&]+)", dockerfile)[1].split())
    assert re.search(r"chown -R recsys:recsys /data\b", dockerfile) and all(d.startswith("/data/") for d in made)
    for name, service in compose["services"].items():
        if service.get("image") != compose["services"]["recsys"]["image"]:
            continue
        for target, source in mounts(service).items():
            if source in compose["volumes"]:
                assert target in made, (name, target)
