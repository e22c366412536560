"""Configuration: defaults, the example file, and errors that name the key and the fix."""

from __future__ import annotations

from pathlib import Path

import pytest

from fracture_node import config as cfg
from fracture_node.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]


def _load(tmp_path: Path, text: str) -> cfg.Config:
    path = tmp_path / "config.toml"
    path.write_text(text)
    return cfg.load(path, environ={})


def test_defaults_are_sqlite_spool_and_port_11112(tmp_path: Path) -> None:
    """With no file, the node uses SQLite and the spool under ./var and port 11112."""
    config = cfg.load(None, environ={})
    assert config.node.port == 11112
    assert config.database_url.startswith("sqlite:///")
    assert config.spool_dir == config.node.state_dir / "spool"
    assert config.model.path is None


def test_state_directory_from_systemd(tmp_path: Path) -> None:
    """Under systemd, $STATE_DIRECTORY is the default state folder."""
    config = cfg.load(None, environ={"STATE_DIRECTORY": str(tmp_path)})
    assert config.database_url == f"sqlite:///{tmp_path / 'fracture-node.db'}"


def test_example_config_is_valid_and_documents_every_key() -> None:
    """config.example.toml loads, and names every key of every section."""
    example = REPO / "config.example.toml"
    config = cfg.load(example, environ={})
    text = example.read_text()
    for name, section in cfg._SECTIONS.items():
        assert f"[{name}]" in text
        for field in section.__dataclass_fields__:
            assert f"{field} =" in text, f"[{name}] {field} is not documented"
    for field in cfg.Destination.__dataclass_fields__:
        assert f"{field} =" in text, f"[[destinations]] {field} is not documented"
    assert config.node.port == 11112


def test_required_keys_exist_under_their_names(tmp_path: Path) -> None:
    """The keys the issue names are read from their sections."""
    config = _load(tmp_path, """
[node]
ae_title = "FN1"
port = 4242
[storage]
spool_dir = "/data/spool"
[database]
url = "postgresql://fn@db/fn"
[study]
stable_after_s = 5
[[destinations]]
name = "pacs"
ae_title = "PACS"
host = "pacs.local"
port = 104
""")
    assert (config.node.ae_title, config.node.port) == ("FN1", 4242)
    assert config.spool_dir == Path("/data/spool")
    assert config.database_url == "postgresql://fn@db/fn"
    assert config.study.stable_after_s == 5.0
    assert config.destinations[0].host == "pacs.local"


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("[node]\nprot = 1\n", "[node] prot"),
        ("[node]\nport = 'abc'\n", "[node] port"),
        ("[node]\nport = 70000\n", "[node] port"),
        ("[node]\nae_title = 'A\\\\B'\n", "[node] ae_title"),
        ("[nodes]\nport = 1\n", "[nodes]"),
        ("[study]\nstable_after_s = -1\n", "[study] stable_after_s"),
        ("[model]\ndevice = 'tpu'\n", "[model] device"),
        ("[database]\nurl = 'mysql://x'\n", "[database] url"),
        ("[[destinations]]\nname = 'p'\nae_title = 'P'\nhost = 'h'\n", "[[destinations]] #1"),
        ("[[destinations]]\nname='p'\nae_title='P'\nhost='h'\nport=104\nextra=1\n",
         "[[destinations]] #1 extra"),
        ("[node\n", "not valid TOML"),
        ("[tls]\nenabled = true\n", "[tls] certificate"),
        ("[tls]\nenabled = true\ncertificate = 'nope.crt'\nprivate_key = 'nope.key'\n",
         "[tls] certificate"),
        ("[[destinations]]\nname='p'\nae_title='P'\nhost='h'\nport=104\ntls=true\n",
         "[tls] ca_certificates"),
        ("[node]\nallowed_peers = ['10.0.0.300']\n", "[node] allowed_peers"),
        ("[node]\nallowed_calling_ae_titles = ['A\\\\B']\n", "[node] allowed_calling_ae_titles"),
        ("[saliency]\nmethod = 'occlusion'\n", "[saliency] method"),
        ("[saliency]\nlayer = 'layer2'\n", "[saliency] layer"),
        ("[saliency]\nthreshold = 0\n", "[saliency] threshold"),
        ("[saliency]\nthreshold = 1.0\n", "[saliency] threshold"),
        ("[saliency]\nmax_regions = 11\n", "[saliency] max_regions"),
        ("[saliency]\nmax_regions = -1\n", "[saliency] max_regions"),
        ("[saliency]\nenabled = 'yes'\n", "[saliency] enabled"),
        ("[[destinations]]\nname='p'\nae_title='P'\nhost='h'\nport=104\noverlays='png'\n",
         "[[destinations]] #1 overlays"),
        ("[saliency]\nenabled = false\n[[destinations]]\nname='p'\nae_title='P'\nhost='h'\n"
         "port=104\noverlays='sc'\n", "[[destinations]] #1 overlays"),
    ],
)
def test_bad_config_names_the_key_and_the_fix(tmp_path: Path, text: str, key: str) -> None:
    """A bad key, type or value stops with one line naming the key and a fix."""
    with pytest.raises(ConfigError) as info:
        _load(tmp_path, text)
    message = str(info.value)
    assert key in message
    assert "fix:" in message
    assert "\n" not in message


def test_tls_section_reads_paths_relative_to_the_file(tmp_path: Path) -> None:
    """[tls] and a destination's tls = true load when the named PEM files exist."""
    for name in ("node.crt", "node.key", "ca.crt"):
        (tmp_path / name).write_text("-----BEGIN PLACEHOLDER-----\n")
    config = _load(tmp_path, """
[tls]
enabled = true
certificate = "node.crt"
private_key = "node.key"
ca_certificates = "ca.crt"
[[destinations]]
name = "pacs"
ae_title = "PACS"
host = "pacs.local"
port = 2762
tls = true
""")
    assert config.tls.enabled and config.tls.require_client_certificate
    assert config.tls.certificate == tmp_path / "node.crt"
    assert config.destinations[0].tls is True


def test_missing_file_is_a_clear_error(tmp_path: Path) -> None:
    """A configuration path that does not exist is named in the error."""
    with pytest.raises(ConfigError, match="does not exist"):
        cfg.load(tmp_path / "nope.toml")


def test_relative_paths_are_relative_to_the_file(tmp_path: Path) -> None:
    """A relative spool path is taken relative to the configuration file's folder."""
    config = _load(tmp_path, "[storage]\nspool_dir = 'spool2'\n")
    assert config.spool_dir == tmp_path / "spool2"


def test_config_is_frozen() -> None:
    """Configuration objects cannot be changed after loading."""
    config = cfg.load(None, environ={})
    with pytest.raises(AttributeError):
        config.node.port = 1  # type: ignore[misc]


def test_saliency_defaults_follow_the_explain_module(tmp_path: Path) -> None:
    """Without a [saliency] section, saliency is on with explain's defaults, positives only."""
    from fracture_node.ml import explain

    s = cfg.load(None, environ={}).saliency
    assert s.enabled is True and s.positive_only is True
    assert (s.method, s.layer) == (explain.DEFAULT_METHOD, explain.DEFAULT_LAYER)
    assert (s.threshold, s.max_regions) == (explain.DEFAULT_THRESHOLD, explain.DEFAULT_MAX_REGIONS)


def test_saliency_section_is_read(tmp_path: Path) -> None:
    """Every [saliency] key is read from the file."""
    s = _load(tmp_path, """
[saliency]
enabled = true
method = "gradcam"
layer = "last"
threshold = 0.3
max_regions = 0
positive_only = false
""").saliency
    assert (s.method, s.layer, s.threshold, s.max_regions, s.positive_only) == (
        "gradcam", "last", 0.3, 0, False)


@pytest.mark.parametrize(("value", "kinds"), [
    ("none", set()), ("sc", {"sc"}), ("gsps", {"gsps"}), ("both", {"sc", "gsps"})])
def test_destination_overlays_choose_the_objects(tmp_path: Path, value: str,
                                                 kinds: set[str]) -> None:
    """A destination's overlays value names the overlay objects it receives."""
    config = _load(tmp_path, f"""
[[destinations]]
name = "pacs"
ae_title = "PACS"
host = "pacs.local"
port = 104
overlays = "{value}"
""")
    assert config.destinations[0].overlay_kinds == kinds


def test_destination_overlays_default_to_none(tmp_path: Path) -> None:
    """A destination that does not ask for overlays gets the SR only."""
    config = _load(tmp_path, "[[destinations]]\nname='p'\nae_title='P'\nhost='h'\nport=104\n")
    assert config.destinations[0].overlays == "none"
    assert config.destinations[0].overlay_kinds == frozenset()
