"""Configuration: one TOML file read once into frozen, validated dataclasses.

Every key has a default, so ``Config.defaults()`` is a working node (SQLite and the spool under a
local state directory, the bundled model, port 11112). An unknown key, a wrong type or an
impossible value stops start-up with one :class:`~fracture_node.errors.ConfigError` line that
names the key and the fix. ``config.example.toml`` documents every key.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fracture_node.config_http import HttpConfig
from fracture_node.config_tls import TlsConfig as TlsConfig
from fracture_node.destination import Destination as Destination
from fracture_node.destination import check_ae as _check_ae
from fracture_node.destination import check_port as _check_port
from fracture_node.destination import check_secret_env
from fracture_node.errors import ConfigError
from fracture_node.saliency import defaults as saliency_defaults


def _check_positive(key: str, value: float, allow_zero: bool = False) -> None:
    if value < 0 or (value == 0 and not allow_zero):
        what = "zero or more" if allow_zero else "more than zero"
        raise ConfigError(f"config: {key} = {value} is impossible; fix: use a number {what}")


@dataclass(frozen=True)
class NodeConfig:
    """The DICOM application entity that listens for the PACS."""

    ae_title: str = "FRACTURE_NODE"
    port: int = 11112
    bind_address: str = "0.0.0.0"
    role: str = "all"
    """``all`` (receive, infer, report), ``receiver`` (receive only) or ``worker`` (the rest)."""
    state_dir: Path = Path("var")
    max_associations: int = 10
    """Associations negotiated at once (connections still sending their request do not count)."""
    max_connections: int = 32
    """TCP connections open at once, counted from the moment they are accepted."""
    max_connections_per_peer: int = 8
    """TCP connections open at once from one address, so one caller cannot starve the others."""
    max_pdu_bytes: int = 262144
    max_object_bytes: int = 1 << 30
    acse_timeout_s: float = 30.0
    dimse_timeout_s: float = 60.0
    network_timeout_s: float = 120.0
    allowed_calling_ae_titles: tuple[str, ...] = ()
    """Empty: any calling AE title is accepted."""
    allowed_peers: tuple[str, ...] = ()
    """Addresses or networks (CIDR) allowed to associate; empty: any."""
    require_called_ae_title: bool = False
    stop_timeout_s: float = 60.0
    """SIGTERM to exit, at most: associations in flight get half of it to finish, the worker's
    batch, a report or a delivery in flight the rest; what is left resumes from SQL."""

    def validate(self) -> None:
        _check_ae("[node] ae_title", self.ae_title)
        _check_port("[node] port", self.port, allow_zero=True)
        if self.role not in ("all", "receiver", "worker"):
            raise ConfigError(
                f"config: [node] role = {self.role!r} is unknown; fix: use 'all', 'receiver' or 'worker'"
            )
        for key in ("max_associations", "max_object_bytes", "max_connections",
                    "max_connections_per_peer"):
            _check_positive(f"[node] {key}", getattr(self, key))
        if self.max_connections_per_peer > self.max_connections:
            raise ConfigError(
                f"config: [node] max_connections_per_peer = {self.max_connections_per_peer} is "
                f"more than max_connections = {self.max_connections}; fix: lower it"
            )
        if self.max_pdu_bytes != 0 and self.max_pdu_bytes < 4096:
            raise ConfigError(
                f"config: [node] max_pdu_bytes = {self.max_pdu_bytes} is too small; "
                "fix: use 0 (no limit) or at least 4096"
            )
        for key in ("acse_timeout_s", "dimse_timeout_s", "network_timeout_s", "stop_timeout_s"):
            _check_positive(f"[node] {key}", getattr(self, key))
        for ae in self.allowed_calling_ae_titles:
            _check_ae("[node] allowed_calling_ae_titles", ae)
        for peer in self.allowed_peers:
            try:
                ipaddress.ip_network(peer, strict=False)
            except ValueError:
                raise ConfigError(
                    f"config: [node] allowed_peers has {peer!r}, which is not an address or network; "
                    "fix: use entries such as '10.1.2.3' or '10.1.0.0/16'"
                ) from None


@dataclass(frozen=True)
class StorageConfig:
    """Where received objects and produced reports are kept."""

    spool_dir: Path | None = None
    """Default: ``<state_dir>/spool``."""
    reports_dir: Path | None = None
    """Default: ``<state_dir>/reports``."""
    fsync: bool = True
    min_free_bytes: int = 256 * 1024 * 1024
    """Below this much free space on the spool, stores are refused with 0xA700."""
    retention_days: float = 30.0
    """Spool files older than this, and overlay files of reports older than this that no delivery
    needs any more, are deleted by housekeeping (SQL rows stay; SR files are kept); 0 keeps them."""

    def validate(self) -> None:
        _check_positive("[storage] min_free_bytes", self.min_free_bytes, allow_zero=True)
        _check_positive("[storage] retention_days", self.retention_days, allow_zero=True)


@dataclass(frozen=True)
class DatabaseConfig:
    """The SQL database: the queue and the audit trail."""

    url: str = ""
    """SQLAlchemy URL; default: a SQLite file ``<state_dir>/fracture-node.db``."""
    auto_upgrade: bool = True
    """Bring the schema to the current version at start (else run ``fracture-node db upgrade``)."""
    echo: bool = False

    def validate(self) -> None:
        if self.url and not re.match(r"^(sqlite|postgresql)(\+\w+)?://", self.url):
            raise ConfigError(
                "config: [database] url must start with sqlite:// or postgresql://; "
                "fix: e.g. 'postgresql+psycopg://fracture@dbhost/fracture'"
            )


@dataclass(frozen=True)
class ModelConfig:
    """The fracture model and how it is run."""

    path: Path | None = None
    """A model file made by ``fracture-node train``; default: the bundled model."""
    device: str = "auto"
    """``auto`` (CUDA when present), ``cpu``, ``cuda`` or ``cuda:N``."""
    engine: str = "auto"
    """What runs the network: ``auto`` (on the CPU the model file's ONNX graph on OpenVINO, or
    on ONNX Runtime where OpenVINO is not installed, when the graph can serve the configured
    saliency; torch on a GPU), ``torch``, ``openvino`` or ``onnxruntime`` (both CPU only)."""
    threads: int = 0
    """Intra-op threads of the engine (0: its default, one per physical core)."""
    operating_point: str = "balanced"
    """``balanced`` or ``high_sensitivity`` (both chosen on the validation split), or a number."""
    max_batch: int = 16
    sub_batch: int = 0
    """Images per pass of the network within a batch: 0 = automatic (2 on a CPU, where small
    passes stay in the caches: 1.5-1.7x as fast on torch; the whole batch on a GPU); N >=
    ``max_batch`` runs whole batches. Results do not depend on it."""
    max_wait_ms: int = 200
    decode_threads: int = 2
    claim_timeout_s: float = 600.0
    """A claim older than this is taken back from a worker that stopped."""
    max_attempts: int = 3
    nice: int = 10
    """Niceness (0-19) of the scoring threads (the worker, its decode threads and the engine's
    pool): the receiver and the report and delivery passes get the CPU first
    (:mod:`fracture_node.priority`); 0 runs them like the rest of the node."""

    def validate(self) -> None:
        if not re.match(r"^(auto|cpu|cuda(:\d+)?)$", self.device):
            raise ConfigError(
                f"config: [model] device = {self.device!r} is unknown; "
                "fix: use 'auto', 'cpu', 'cuda' or 'cuda:0'"
            )
        if self.engine not in ("auto", "torch", "onnxruntime", "openvino"):
            raise ConfigError(
                f"config: [model] engine = {self.engine!r} is unknown; "
                "fix: use 'auto', 'torch', 'openvino' or 'onnxruntime'"
            )
        if self.engine in ("onnxruntime", "openvino") and self.device.startswith("cuda"):
            raise ConfigError(
                f"config: [model] engine = {self.engine!r} runs on the CPU, "
                f"not on {self.device!r}; "
                "fix: set device = 'cpu' (or 'auto'), or engine = 'torch'"
            )
        _check_positive("[model] threads", self.threads, allow_zero=True)
        _check_positive("[model] sub_batch", self.sub_batch, allow_zero=True)
        if self.operating_point not in ("balanced", "high_sensitivity"):
            try:
                value = float(self.operating_point)
            except ValueError:
                value = -1.0
            if not 0.0 < value < 1.0:
                raise ConfigError(
                    f"config: [model] operating_point = {self.operating_point!r} is unknown; "
                    "fix: use 'balanced', 'high_sensitivity' or a threshold such as '0.42'"
                )
        for key in ("max_batch", "decode_threads", "max_attempts"):
            _check_positive(f"[model] {key}", getattr(self, key))
        _check_positive("[model] max_wait_ms", self.max_wait_ms, allow_zero=True)
        _check_positive("[model] claim_timeout_s", self.claim_timeout_s)
        if not 0 <= self.nice <= 19:
            raise ConfigError(
                f"config: [model] nice = {self.nice!r} is out of range; "
                "fix: use 0 (the node's own priority) to 19 (the lowest)"
            )


@dataclass(frozen=True)
class StudyConfig:
    """When a study is complete enough to report."""

    stable_after_s: float = 30.0
    """A study is reported when no instance arrived for this long and its associations ended."""
    report_max_attempts: int = 5
    """After this many failed attempts a study's report is parked (``fracture-node reprocess``)."""
    report_first_retry_s: float = 60.0
    """Back-off after a failed report attempt, doubled at each failure up to the next."""
    report_max_retry_s: float = 3600.0

    def validate(self) -> None:
        _check_positive("[study] stable_after_s", self.stable_after_s, allow_zero=True)
        for key in ("report_max_attempts", "report_first_retry_s", "report_max_retry_s"):
            _check_positive(f"[study] {key}", getattr(self, key))


TRAINED_BODY_PARTS = (
    "EXTREMITY", "UPPER LIMB", "LOWER LIMB", "UPR EXTREMITY", "LWR EXTREMITY",
    "HAND", "FINGER", "THUMB", "WRIST", "FOREARM", "ELBOW", "ARM", "HUMERUS", "RADIUS", "ULNA",
    "SHOULDER", "CLAVICLE", "SCAPULA",
    "HIP", "PELVIS", "FEMUR", "THIGH", "KNEE", "PATELLA", "LEG", "LOWER LEG", "TIBIA", "FIBULA",
    "ANKLE", "FOOT", "TOE", "HEEL", "CALCANEUS",
)
"""Body Part Examined terms (PS3.16 Annex L and their usual variants) of the regions in the
training data: hand, leg, hip, shoulder and other limb radiographs."""
UNKNOWN_BODY_PART_CHOICES = ("assess", "not_assessed")


@dataclass(frozen=True)
class ScopeConfig:
    """What the model is allowed to speak about (``fracture_node.dicom.scope``)."""

    body_parts: tuple[str, ...] = TRAINED_BODY_PARTS
    """Body Part Examined values (upper case) that are scored; others are not assessed."""
    unknown_body_part: str = "assess"
    """No body part in Body Part Examined, nor in the study/series description or protocol
    name: ``assess`` (score it; many senders leave it out) or ``not_assessed``."""
    min_side: int = 64
    """An image with a side shorter than this (pixels) is not a radiograph of the trained kind."""
    report_when_nothing_assessed: bool = False
    """Send an SR for a study in which no image was scored (default: none; the study is closed
    and the reasons stay in SQL, ``status`` and ``audit``)."""

    def validate(self) -> None:
        if self.unknown_body_part not in UNKNOWN_BODY_PART_CHOICES:
            raise ConfigError(
                f"config: [scope] unknown_body_part = {self.unknown_body_part!r} is unknown; "
                "fix: use 'assess' or 'not_assessed'")
        if not 8 <= self.min_side <= 4096:
            raise ConfigError(
                f"config: [scope] min_side = {self.min_side} is out of range; "
                "fix: use a number of pixels 8..4096, e.g. 64")
        if not self.body_parts or any(not p.strip() for p in self.body_parts):
            raise ConfigError(
                "config: [scope] body_parts is empty or holds an empty term; fix: list Body "
                "Part Examined terms, e.g. [\"HAND\", \"WRIST\"]")


@dataclass(frozen=True)
class DeliveryConfig:
    """How reports are sent to the destinations."""

    timeout_s: float = 30.0
    first_retry_s: float = 10.0
    max_retry_s: float = 600.0
    deadline_s: float = 86400.0
    """After this long without success a delivery is dead-lettered (``fracture-node retry``)."""

    def validate(self) -> None:
        for key in ("timeout_s", "first_retry_s", "max_retry_s", "deadline_s"):
            _check_positive(f"[delivery] {key}", getattr(self, key))
        if self.max_retry_s < self.first_retry_s:
            raise ConfigError(
                "config: [delivery] max_retry_s is smaller than first_retry_s; "
                "fix: make max_retry_s at least first_retry_s"
            )


@dataclass(frozen=True)
class SaliencyConfig:
    """Where the model looked: heat maps and regions, stored with each result and reported."""

    enabled: bool = True
    """Compute a heat map and regions for every scored image (one extra backward pass)."""
    method: str = saliency_defaults.DEFAULT_METHOD
    layer: str = saliency_defaults.DEFAULT_LAYER
    threshold: float = saliency_defaults.DEFAULT_THRESHOLD
    """A region is where the map reaches this fraction of its maximum over the image."""
    max_regions: int = saliency_defaults.DEFAULT_MAX_REGIONS
    """Regions kept per image, hottest first (0: heat map only)."""
    positive_only: bool = True
    """Report regions (SR, overlays) only for images scored positive."""

    def validate(self) -> None:
        if self.method not in saliency_defaults.METHODS:
            raise ConfigError(
                f"config: [saliency] method = {self.method!r} is unknown; "
                f"fix: use one of {', '.join(repr(m) for m in saliency_defaults.METHODS)}"
            )
        if self.layer not in saliency_defaults.LAYERS:
            raise ConfigError(
                f"config: [saliency] layer = {self.layer!r} is unknown; "
                f"fix: use one of {', '.join(repr(m) for m in saliency_defaults.LAYERS)}"
            )
        if not 0.0 < self.threshold < 1.0:
            raise ConfigError(
                f"config: [saliency] threshold = {self.threshold} is impossible; "
                "fix: use a fraction of the map's maximum between 0 and 1, e.g. 0.5"
            )
        if not 0 <= self.max_regions <= 10:
            raise ConfigError(
                f"config: [saliency] max_regions = {self.max_regions} is out of range; "
                "fix: use a whole number 0..10"
            )




@dataclass(frozen=True)
class LoggingConfig:
    level: str = "info"
    format: str = "auto"
    """``auto`` (JSON unless on a terminal), ``json`` or ``console``."""

    def validate(self) -> None:
        if self.level not in ("debug", "info", "warning", "error"):
            raise ConfigError(
                f"config: [logging] level = {self.level!r} is unknown; "
                "fix: use 'debug', 'info', 'warning' or 'error'"
            )
        if self.format not in ("auto", "json", "console"):
            raise ConfigError(
                f"config: [logging] format = {self.format!r} is unknown; "
                "fix: use 'auto', 'json' or 'console'"
            )


@dataclass(frozen=True)
class MetricsConfig:
    """The Prometheus ``/metrics`` and ``/health`` endpoint."""

    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = 9464

    def validate(self) -> None:
        _check_port("[metrics] port", self.port, allow_zero=True)


@dataclass(frozen=True)
class Config:
    """The whole configuration of one node."""

    node: NodeConfig = field(default_factory=NodeConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    database: DatabaseConfig = field(default_factory=DatabaseConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    study: StudyConfig = field(default_factory=StudyConfig)
    delivery: DeliveryConfig = field(default_factory=DeliveryConfig)
    destinations: tuple[Destination, ...] = ()
    saliency: SaliencyConfig = field(default_factory=SaliencyConfig)
    scope: ScopeConfig = field(default_factory=ScopeConfig)
    tls: TlsConfig = field(default_factory=TlsConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    http: HttpConfig = field(default_factory=HttpConfig)
    source: str = "<embedded defaults>"

    # Derived paths --------------------------------------------------------------------------
    @property
    def spool_dir(self) -> Path:
        return self.storage.spool_dir or self.node.state_dir / "spool"

    @property
    def reports_dir(self) -> Path:
        return self.storage.reports_dir or self.node.state_dir / "reports"

    @property
    def database_url(self) -> str:
        return self.database.url or f"sqlite:///{(self.node.state_dir / 'fracture-node.db')}"

    def validate(self) -> Config:
        for section in (self.node, self.storage, self.database, self.model, self.study,
                        self.delivery, self.saliency, self.scope, self.logging, self.metrics,
                        self.http):
            section.validate()
        names = [d.name for d in self.destinations]
        for i, dest in enumerate(self.destinations):
            dest.validate(i)
        self.tls.check(scu=any(d.tls for d in self.destinations))
        if self.http.enabled and self.http.tls:
            self.http.tls_files(self.tls.certificate, self.tls.private_key,
                                self.tls.ca_certificates)
        for i, dest in enumerate(self.destinations):
            if dest.overlays != "none" and not self.saliency.enabled:
                raise ConfigError(
                    f"config: [[destinations]] #{i + 1} overlays = {dest.overlays!r} needs "
                    "saliency, but [saliency] enabled = false; fix: set enabled = true or "
                    "overlays = 'none'"
                )
        duplicates = {n for n in names if names.count(n) > 1}
        if duplicates:
            raise ConfigError(
                f"config: [[destinations]] name {sorted(duplicates)[0]!r} is used twice; "
                "fix: give each destination its own name"
            )
        return self

    @classmethod
    def defaults(cls, environ: typing.Mapping[str, str] | None = None) -> Config:
        """The embedded defaults: state under ``$STATE_DIRECTORY`` (systemd) or ``./var``."""
        env = os.environ if environ is None else environ
        state = Path(env.get("STATE_DIRECTORY", "").split(":")[0] or "var")
        return cls(node=NodeConfig(state_dir=state.absolute())).validate()

    def redacted(self) -> dict[str, Any]:
        """The settings as a dict, for the start-up log line (no secrets)."""
        out = dataclasses.asdict(self)
        url = self.database_url
        out["database"]["url"] = re.sub(r"://([^:/@]+):[^@]*@", r"://\1:***@", url)
        return json_safe(out)


def json_safe(value: Any) -> Any:
    """Turn paths and tuples into JSON-friendly values."""
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


# Loading ------------------------------------------------------------------------------------

_SECTIONS: dict[str, type] = {
    "node": NodeConfig,
    "storage": StorageConfig,
    "database": DatabaseConfig,
    "model": ModelConfig,
    "study": StudyConfig,
    "delivery": DeliveryConfig,
    "saliency": SaliencyConfig,
    "scope": ScopeConfig,
    "logging": LoggingConfig,
    "metrics": MetricsConfig,
    "tls": TlsConfig,
    "http": HttpConfig,
}


def _type_name(tp: Any) -> str:
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false",
            Path: "a path (string)"}.get(tp, str(tp))


def _convert(key: str, value: Any, tp: Any, base: Path) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return _convert(key, value, args[0], base)
    if origin is tuple:
        (item_tp, _ellipsis) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"config: {key} must be a list of {_type_name(item_tp)[2:]}s, "
                              f"got {type(value).__name__}; fix: e.g. {key.split()[-1]} = [...]")
        return tuple(_convert(key, v, item_tp, base) for v in value)
    if tp is bool:
        ok = isinstance(value, bool)
    elif tp is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif tp is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif tp in (str, Path):
        ok = isinstance(value, str)
    else:  # pragma: no cover - a programming error
        raise TypeError(tp)
    if not ok:
        raise ConfigError(
            f"config: {key} must be {_type_name(tp)}, got {type(value).__name__} {value!r}; "
            f"fix: write {key.split()[-1]} = <{_type_name(tp)}>"
        )
    if tp is Path:
        path = Path(value).expanduser()
        return path if path.is_absolute() else (base / path)
    return value


def _build(cls: type, section: str, table: Any, base: Path, extra: dict[str, Any] | None = None
           ) -> Any:
    if not isinstance(table, dict):
        raise ConfigError(f"config: {section} must be a table; fix: write it as {section} with keys below it")
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = dict(extra or {})
    for key, value in table.items():
        if key not in fields:
            known = ", ".join(sorted(fields))
            raise ConfigError(
                f"config: unknown key {section} {key}; fix: remove it or use one of: {known}"
            )
        kwargs[key] = _convert(f"{section} {key}", value, hints[key], base)
    try:
        return cls(**kwargs)
    except TypeError as exc:
        missing = re.findall(r"'(\w+)'", str(exc))
        raise ConfigError(
            f"config: {section} is missing {', '.join(missing) or 'a required key'}; "
            "fix: add it (see config.example.toml)"
        ) from None


def load(path: str | os.PathLike[str] | None, environ: typing.Mapping[str, str] | None = None
         ) -> Config:
    """Read and validate a configuration file; ``None`` gives the embedded defaults.

    Relative paths in the file are taken relative to the file's folder.
    """
    if path is None:
        return Config.defaults(environ)
    file = Path(path)
    try:
        raw = file.read_bytes()
    except FileNotFoundError:
        raise ConfigError(
            f"config: {file} does not exist; fix: give the path of a TOML file "
            "(see config.example.toml) or leave --config out for the defaults"
        ) from None
    except OSError as exc:
        raise ConfigError(f"config: {file} cannot be read ({exc.strerror}); fix: check its permissions") from None
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config: {file} is not valid TOML ({exc}); fix: correct the syntax there") from None
    base = file.resolve().parent
    defaults = Config.defaults(environ)
    kwargs: dict[str, Any] = {"source": str(file.resolve()), "node": defaults.node}
    for key, value in data.items():
        if key in _SECTIONS:
            extra = {"state_dir": defaults.node.state_dir} if key == "node" else None
            kwargs[key] = _build(_SECTIONS[key], f"[{key}]", value, base, extra)
        elif key == "destinations":
            if not isinstance(value, list):
                raise ConfigError("config: destinations must be an array of tables; "
                                  "fix: write each one as [[destinations]]")
            kwargs[key] = tuple(
                _build(Destination, f"[[destinations]] #{i + 1}", t, base) for i, t in enumerate(value)
            )
        else:
            known = ", ".join([*sorted(_SECTIONS), "destinations"])
            raise ConfigError(f"config: unknown section [{key}]; fix: remove it or use one of: {known}")
    config = Config(**kwargs).validate()
    check_secret_env(config.destinations, os.environ if environ is None else environ)
    return config


def with_role(config: Config, role: str) -> Config:
    """The same configuration with another ``[node] role``."""
    return dataclasses.replace(config, node=dataclasses.replace(config.node, role=role)).validate()


def with_metrics_port(config: Config, port: int) -> Config:
    """The same configuration with another ``[metrics] port``."""
    return dataclasses.replace(
        config, metrics=dataclasses.replace(config.metrics, port=port)).validate()
