"""Destination: one ``[[destinations]]`` entry, a C-STORE SCP or a DICOMweb (STOW-RS) service.

A destination names a DICOM node by ``ae_title``, ``host`` and ``port`` (C-STORE, PS3.4 B), or a
DICOMweb origin server by ``dicomweb_url`` (STOW-RS, PS3.18 10.5), never both. For DICOMweb the
password or token (``auth``) is read from ``secret_file`` or the environment variable
``secret_env`` at each attempt, so a token refreshed on disk is used without a restart; it never
appears in the configuration, a log line or the audit trail.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from fracture_node.errors import ConfigError

OVERLAY_CHOICES: tuple[str, ...] = ("none", "sc", "gsps", "both")
"""Values of ``[[destinations]] overlays``: which saliency objects go with the SR."""

AUTH_CHOICES: tuple[str, ...] = ("none", "basic", "bearer")
"""Values of ``[[destinations]] auth`` (DICOMweb only): HTTP Basic (RFC 7617) or a bearer token
(RFC 6750)."""

_AE_RE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # PS3.5 6.2: no backslash, no controls
_ENV_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def check_ae(key: str, value: str) -> None:
    """Raise :class:`ConfigError` unless ``value`` is a valid AE title."""
    if not _AE_RE.match(value) or not value.strip():
        raise ConfigError(
            f"config: {key} = {value!r} is not a valid AE title; "
            "fix: use 1 to 16 printable ASCII characters without a backslash, e.g. 'FRACTURE_NODE'"
        )


def check_port(key: str, value: int, allow_zero: bool = False) -> None:
    """Raise :class:`ConfigError` unless ``value`` is a TCP port (0 too with ``allow_zero``)."""
    low = 0 if allow_zero else 1
    if not low <= value <= 65535:
        raise ConfigError(f"config: {key} = {value} is out of range; fix: use a port {low}..65535")


@dataclass(frozen=True)
class Destination:
    """Where reports go: a C-STORE SCP (usually the PACS) or a DICOMweb STOW-RS service."""

    name: str
    ae_title: str = ""
    host: str = ""
    port: int = 0
    calling_ae_title: str = ""
    """Our AE title towards this destination; default: ``[node] ae_title``."""
    tls: bool = False
    """Send over TLS with the ``[tls]`` certificate, key and CA certificates."""
    overlays: str = "none"
    """Saliency objects sent with the SR: ``none``, ``sc`` (Secondary Capture with the heat map
    burned in), ``gsps`` (Grayscale Softcopy Presentation State outlining the regions) or
    ``both``; only for images that have regions in the SR."""
    dicomweb_url: str = ""
    """Base URL of a DICOMweb service, e.g. ``https://pacs/dicom-web``: STOW-RS posts the SR and
    its overlays in one request to ``{dicomweb_url}/studies/{StudyInstanceUID}``."""
    auth: str = "none"
    """DICOMweb: ``none``, ``basic`` (``username``, the secret is the password) or ``bearer``
    (the secret is the token)."""
    username: str = ""
    secret_file: Path | None = None
    """DICOMweb: a file whose first line is the password or token (keep it mode 0600)."""
    secret_env: str = ""
    """DICOMweb: the name of an environment variable holding the password or token."""
    ca_bundle: Path | None = None
    """DICOMweb over https: a PEM bundle of the CAs that verify the server (default: the bundle
    of ``requests``: ``REQUESTS_CA_BUNDLE`` when set, else certifi's)."""

    @property
    def is_dicomweb(self) -> bool:
        """Reports go by STOW-RS (``dicomweb_url``) rather than C-STORE."""
        return bool(self.dicomweb_url)

    @property
    def overlay_kinds(self) -> frozenset[str]:
        """The overlay objects this destination receives: a subset of ``{"sc", "gsps"}``."""
        return frozenset({"none": (), "sc": ("sc",), "gsps": ("gsps",),
                          "both": ("sc", "gsps")}.get(self.overlays, ()))

    def validate(self, index: int) -> None:
        key = f"[[destinations]] #{index + 1}"
        if not self.name or not re.match(r"^[A-Za-z0-9_.-]{1,64}$", self.name):
            raise ConfigError(
                f"config: {key} name = {self.name!r} is invalid; "
                "fix: use 1 to 64 letters, digits, '_', '.' or '-'"
            )
        if self.overlays not in OVERLAY_CHOICES:
            raise ConfigError(
                f"config: {key} overlays = {self.overlays!r} is unknown; "
                f"fix: use {', '.join(repr(c) for c in OVERLAY_CHOICES)}"
            )
        if self.is_dicomweb:
            self._validate_dicomweb(key)
            return
        web_keys = [k for k in ("auth", "username", "secret_file", "secret_env", "ca_bundle")
                    if getattr(self, k) not in ("none", "", None)]
        if web_keys:
            raise ConfigError(
                f"config: {key} sets {', '.join(web_keys)} without dicomweb_url; "
                "fix: remove them, or give dicomweb_url (and no ae_title, host, port)")
        check_ae(f"{key} ae_title", self.ae_title)
        if self.calling_ae_title:
            check_ae(f"{key} calling_ae_title", self.calling_ae_title)
        if not self.host:
            raise ConfigError(f"config: {key} host is empty; fix: give the PACS host name or address")
        check_port(f"{key} port", self.port)

    def _validate_dicomweb(self, key: str) -> None:
        dimse = [k for k in ("ae_title", "host", "port", "calling_ae_title", "tls")
                 if getattr(self, k) not in ("", 0, False)]
        if dimse:
            raise ConfigError(
                f"config: {key} has dicomweb_url and {', '.join(dimse)}; fix: give either "
                "dicomweb_url (STOW-RS; an https:// URL for TLS) or ae_title, host and port")
        url = urlsplit(self.dicomweb_url)
        if url.scheme not in ("http", "https") or not url.hostname or url.query or url.fragment:
            raise ConfigError(
                f"config: {key} dicomweb_url = {self.dicomweb_url!r} is not a base URL; "
                "fix: write it like 'https://pacs.hospital.local/dicom-web'")
        if "@" in url.netloc:
            raise ConfigError(
                f"config: {key} dicomweb_url holds credentials; fix: remove them from the URL "
                "and use auth, username and secret_file or secret_env")
        if self.auth not in AUTH_CHOICES:
            raise ConfigError(
                f"config: {key} auth = {self.auth!r} is unknown; "
                f"fix: use {', '.join(repr(c) for c in AUTH_CHOICES)}")
        sources = [k for k in ("secret_file", "secret_env") if getattr(self, k)]
        if self.auth == "none" and (sources or self.username):
            raise ConfigError(
                f"config: {key} gives {', '.join(sources or ['username'])} but auth = 'none'; "
                "fix: set auth = 'basic' or 'bearer', or remove them")
        if self.auth != "none" and len(sources) != 1:
            raise ConfigError(
                f"config: {key} auth = {self.auth!r} needs exactly one of secret_file and "
                "secret_env; fix: name the file or the environment variable that holds the "
                f"{'password' if self.auth == 'basic' else 'token'}")
        if self.auth == "basic" and (not self.username or ":" in self.username):
            raise ConfigError(
                f"config: {key} auth = 'basic' needs a username without ':'; fix: set username")
        if self.auth == "bearer" and self.username:
            raise ConfigError(
                f"config: {key} auth = 'bearer' takes no username; fix: remove it")
        if self.secret_env and not _ENV_RE.match(self.secret_env):
            raise ConfigError(
                f"config: {key} secret_env = {self.secret_env!r} is not a variable name; "
                "fix: give the name of the variable (e.g. 'PACS_TOKEN'), not its value")
        if self.secret_file is not None and not self.secret_file.is_file():
            raise ConfigError(
                f"config: {key} secret_file {self.secret_file} does not exist; "
                "fix: give the path of the file that holds the secret")
        if url.scheme != "https" and self.ca_bundle is not None:
            raise ConfigError(
                f"config: {key} ca_bundle is set but dicomweb_url is not https://; "
                "fix: use an https:// URL or remove ca_bundle")
        if self.ca_bundle is not None and not self.ca_bundle.is_file():
            raise ConfigError(
                f"config: {key} ca_bundle {self.ca_bundle} does not exist; "
                "fix: give the path of a PEM file")
        if url.scheme == "http" and self.auth != "none" and not _loopback(url.hostname):
            raise ConfigError(
                f"config: {key} would send a {'password' if self.auth == 'basic' else 'token'} "
                "over plain http to a host that is not this machine; fix: use an https:// URL")


def check_secret_env(destinations: Sequence[Destination], environ: Mapping[str, str]) -> None:
    """At start-up: every ``secret_env`` named is set (its value is read at each attempt)."""
    for i, dest in enumerate(destinations):
        if dest.secret_env and not environ.get(dest.secret_env):
            raise ConfigError(
                f"config: [[destinations]] #{i + 1} secret_env names {dest.secret_env}, which "
                "is not set or empty; fix: set it in the service's environment (e.g. a systemd "
                "EnvironmentFile) or use secret_file")


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
