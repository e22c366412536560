"""The ``[http]`` section: the web console, its JSON API and the STOW-RS endpoint.

Off by default and bound to the loopback address unless configured. TLS uses the ``[tls]``
certificate, key and CA bundle unless this section names its own files.
"""

from __future__ import annotations

import ipaddress
import os
import re
from dataclasses import dataclass
from pathlib import Path

from fracture_node.errors import ConfigError

ROLES: tuple[str, ...] = ("viewer", "operator", "sender")
"""``viewer`` reads the console and the API; ``operator`` also retries and re-processes;
``sender`` may only store studies over STOW-RS."""

_HEADER_RE = re.compile(r"^[A-Za-z0-9-]{1,64}$")


@dataclass(frozen=True)
class HttpConfig:
    """One HTTP(S) server per node: console, JSON API (``/api``), STOW-RS."""

    enabled: bool = False
    host: str = "127.0.0.1"
    port: int = 8443
    users_file: Path | None = None
    """Users, one a line: ``name role argon2-hash`` (``fracture-node user add``);
    default ``<state_dir>/users``."""
    tls: bool = False
    """Serve HTTPS only, with ``certificate``/``private_key`` (default: the ``[tls]`` ones)."""
    certificate: Path | None = None
    private_key: Path | None = None
    ca_certificates: Path | None = None
    """CAs that sign client certificates (default: ``[tls] ca_certificates``)."""
    require_client_certificate: bool = False
    """Mutual TLS: refuse clients without a certificate signed by ``ca_certificates``."""
    session_timeout_s: float = 8 * 3600.0
    """A console login lasts this long."""
    secure_cookies: bool | None = None
    """Mark the session cookie ``Secure`` (default: when ``tls`` is on); set true behind an
    HTTPS reverse proxy."""
    trusted_proxies: tuple[str, ...] = ()
    """Addresses or networks of reverse proxies whose ``proxy_user_header`` is believed."""
    proxy_user_header: str = ""
    """The header naming the authenticated user (e.g. ``X-Remote-User``); empty: not used."""
    login_max_failures: int = 5
    """Wrong passwords from one address within ``login_window_s`` before it is locked out for
    ``login_lockout_s`` (HTTP 429, passwords not checked meanwhile); 0 turns this off."""
    login_window_s: float = 300.0
    login_lockout_s: float = 300.0
    stow_rs: bool = False
    """Accept studies over STOW-RS at ``/dicom-web/studies`` from users of role ``sender``
    (stored like C-STORE, same checks and queue; needs a receiving role)."""
    show_patient_data: bool = False
    """Show Patient's Name and ID (read from the stored headers) on study pages; each such view
    is recorded in the audit trail. Default: UIDs and accession numbers only."""

    def validate(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"config: [http] port = {self.port} is out of range; "
                              "fix: use a port 0..65535")
        if self.session_timeout_s <= 0:
            raise ConfigError(f"config: [http] session_timeout_s = {self.session_timeout_s} is "
                              "impossible; fix: use a number of seconds more than zero")
        if self.login_max_failures < 0 or self.login_window_s <= 0 or self.login_lockout_s <= 0:
            raise ConfigError(
                "config: [http] login_max_failures must be 0 or more, login_window_s and "
                "login_lockout_s more than zero; fix: e.g. 5, 300.0 and 300.0")
        for peer in self.trusted_proxies:
            try:
                ipaddress.ip_network(peer, strict=False)
            except ValueError:
                raise ConfigError(
                    f"config: [http] trusted_proxies has {peer!r}, which is not an address or "
                    "network; fix: use entries such as '127.0.0.1' or '10.0.0.0/24'") from None
        if self.proxy_user_header and not _HEADER_RE.match(self.proxy_user_header):
            raise ConfigError(f"config: [http] proxy_user_header = {self.proxy_user_header!r} is "
                              "not a header name; fix: e.g. 'X-Remote-User'")
        if self.stow_rs and not self.enabled:
            raise ConfigError("config: [http] stow_rs = true needs the HTTP server; fix: set "
                              "[http] enabled = true (or stow_rs = false)")
        if bool(self.proxy_user_header) != bool(self.trusted_proxies):
            raise ConfigError(
                "config: [http] proxy_user_header and trusted_proxies go together; fix: set "
                "both (the header is believed only from those addresses) or neither")

    def tls_files(self, certificate: Path | None, private_key: Path | None,
                  ca_certificates: Path | None) -> tuple[Path, Path, Path | None]:
        """The certificate, key and CA bundle to serve with (own, else ``[tls]``'s), checked.

        Raises :class:`ConfigError` naming a file that is not set or cannot be read.
        """
        cert = self.certificate or certificate
        key = self.private_key or private_key
        ca = self.ca_certificates or ca_certificates
        needed = [("certificate", cert), ("private_key", key)]
        if self.require_client_certificate:
            needed.append(("ca_certificates", ca))
        for name, path in needed:
            why = ("is not set" if path is None else "does not exist" if not path.is_file()
                   else "cannot be read" if not os.access(path, os.R_OK) else "")
            if why:
                raise ConfigError(
                    f"config: [http] {name} {why} ({path}), but [http] tls = true needs it; "
                    f"fix: set [http] {name} or [tls] {name} to a PEM file")
        assert cert is not None and key is not None
        return cert, key, ca

    def users_path(self, state_dir: Path) -> Path:
        return self.users_file or state_dir / "users"
