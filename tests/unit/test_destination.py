"""DICOMweb settings: ``[[destinations]]`` with ``dicomweb_url``, ``[http] stow_rs``; what loads and
the errors that name the fix."""

from __future__ import annotations

from pathlib import Path

import pytest

from fracture_node import config as cfg
from fracture_node.errors import ConfigError


def _load(tmp_path: Path, table: str, environ: dict[str, str] | None = None) -> cfg.Config:
    path = tmp_path / "config.toml"
    path.write_text('[[destinations]]\nname = "web"\n' + table)
    return cfg.load(path, environ=environ or {})


def test_dicomweb_destination_loads_with_a_secret_file_relative_to_the_config(
        tmp_path: Path) -> None:
    """A DICOMweb destination with basic auth loads; secret_file is taken from the config's
    folder and the secret itself appears nowhere in the settings."""
    (tmp_path / "pacs.secret").write_text("hunter2\n")
    config = _load(tmp_path, 'dicomweb_url = "https://pacs.example/dicom-web"\n'
                             'auth = "basic"\nusername = "fn"\nsecret_file = "pacs.secret"\n')
    [dest] = config.destinations
    assert dest.is_dicomweb and dest.secret_file == tmp_path / "pacs.secret"
    assert "hunter2" not in repr(config.redacted())


@pytest.mark.parametrize(("table", "words"), [
    ('dicomweb_url = "https://p/dw"\nae_title = "PACS"\n', "dicomweb_url and ae_title"),
    ('dicomweb_url = "https://p/dw"\ntls = true\n', "an https:// URL for TLS"),
    ('dicomweb_url = "ftp://p/dw"\n', "is not a base URL"),
    ('dicomweb_url = "https://fn:pw@p/dw"\n', "holds credentials"),
    ('dicomweb_url = "https://p/dw"\nauth = "digest"\n', "auth = 'digest' is unknown"),
    ('dicomweb_url = "https://p/dw"\nauth = "bearer"\n', "exactly one of secret_file"),
    ('dicomweb_url = "https://p/dw"\nauth = "basic"\nsecret_env = "PW"\n', "needs a username"),
    ('dicomweb_url = "https://p/dw"\nsecret_env = "PW"\n', "but auth = 'none'"),
    ('dicomweb_url = "https://p/dw"\nauth = "bearer"\nsecret_env = "abc def"\n',
     "is not a variable name"),
    ('dicomweb_url = "http://pacs.example/dw"\nauth = "bearer"\nsecret_env = "PW"\n',
     "over plain http"),
    ('dicomweb_url = "http://p/dw"\nca_bundle = "/etc/hosts"\n', "is not https://"),
    ('ae_title = "PACS"\nhost = "p"\nport = 104\nauth = "basic"\n', "without dicomweb_url"),
])
def test_inconsistent_dicomweb_destination_is_refused(tmp_path: Path, table: str,
                                                      words: str) -> None:
    """Each inconsistent combination stops start-up with an error that names it."""
    with pytest.raises(ConfigError, match=r"\[\[destinations\]\] #1") as err:
        _load(tmp_path, table, environ={"PW": "x"})
    assert words in str(err.value)


def test_unset_secret_env_stops_start_up_without_reading_other_variables(
        tmp_path: Path) -> None:
    """A secret_env that is not set in the environment is a configuration error at start-up."""
    with pytest.raises(ConfigError, match="PACS_TOKEN, which is not set"):
        _load(tmp_path, 'dicomweb_url = "https://p/dw"\nauth = "bearer"\n'
                        'secret_env = "PACS_TOKEN"\n', environ={"OTHER": "x"})


def test_token_over_http_to_loopback_is_allowed(tmp_path: Path) -> None:
    """A secret over plain http is allowed to this machine (e.g. a local TLS proxy)."""
    config = _load(tmp_path, 'dicomweb_url = "http://127.0.0.1:8042/dicom-web"\n'
                             'auth = "bearer"\nsecret_env = "PW"\n', environ={"PW": "x"})
    assert config.destinations[0].auth == "bearer"


def test_stow_rs_without_the_http_server_is_refused(tmp_path: Path) -> None:
    """[http] stow_rs = true with the HTTP server off is a configuration error naming the fix."""
    path = tmp_path / "config.toml"
    path.write_text("[http]\nstow_rs = true\n")
    with pytest.raises(ConfigError, match=r"stow_rs = true needs the HTTP server"):
        cfg.load(path, environ={})
