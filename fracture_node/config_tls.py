"""The ``[tls]`` section: TLS for the Storage SCP and for destinations with ``tls = true``."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from fracture_node.errors import ConfigError


@dataclass(frozen=True)
class TlsConfig:
    """TLS (PS3.15 B.9 BCP 195 profile) for the SCP and for destinations with ``tls = true``.

    One certificate and key serve both roles: the SCP presents it to callers, the SCU presents
    it to destinations as a client certificate. ``ca_certificates`` verifies the other side.
    """

    enabled: bool = False
    """Serve the SCP over TLS only (plain TCP connections then fail the handshake)."""
    certificate: Path | None = None
    """PEM certificate (chain) of this node."""
    private_key: Path | None = None
    """PEM private key of ``certificate`` (unencrypted; keep it mode 0600)."""
    ca_certificates: Path | None = None
    """PEM bundle of the CAs that sign peers' certificates."""
    require_client_certificate: bool = True
    """SCP: refuse callers without a certificate signed by ``ca_certificates`` (mutual TLS)."""
    verify_destination_hostname: bool = True
    """SCU: the destination's certificate must name its ``host``."""

    def needed_files(self, scp: bool, scu: bool) -> list[tuple[str, Path | None]]:
        files: list[tuple[str, Path | None]] = []
        if scp:
            files += [("certificate", self.certificate), ("private_key", self.private_key)]
            if self.require_client_certificate:
                files.append(("ca_certificates", self.ca_certificates))
        if scu:
            files.append(("ca_certificates", self.ca_certificates))
            if self.certificate or self.private_key:
                files += [("certificate", self.certificate), ("private_key", self.private_key)]
        return files

    def check(self, scu: bool) -> None:
        """Raise :class:`ConfigError` unless the files TLS needs are named and readable."""
        for key, path in dict(self.needed_files(self.enabled, scu)).items():
            why = "is not set" if path is None else (
                "does not exist" if not path.is_file() else
                "cannot be read" if not os.access(path, os.R_OK) else "")
            if why:
                users = " and ".join(n for n, on in (("[tls] enabled", self.enabled),
                                                     ("a destination with tls = true", scu))
                                     if on)
                raise ConfigError(
                    f"config: [tls] {key} {why} ({path}), but {users} needs it; "
                    "fix: give the path of a PEM file"
                )
