"""The model file: round trip, sha256, and refusal of missing, corrupt or foreign files."""

from __future__ import annotations

import hashlib
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from fracture_node.errors import ModelError
from fracture_node.ml.infer import Classifier
from fracture_node.ml.model import (
    ARCHITECTURES,
    FORMAT,
    build_model,
    card_path,
    load_model_file,
    save_model_file,
)

CARD = {"name": "tiny", "version": "0", "architecture": "mobilenet_v3_small", "input_size": 64,
        "normalisation": {"mean": 0.3, "std": 0.3},
        "thresholds": {"balanced": 0.4, "high_sensitivity": 0.2}, "tta": False}


@pytest.fixture()
def model_path(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    path = tmp_path / "tiny.pt"
    save_model_file(path, build_model("mobilenet_v3_small"), CARD)
    return path


class _Evil:
    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, (f"touch {_Evil.marker}",))

    marker = "/nonexistent"


def test_round_trip_keeps_card_and_weights(model_path: Path) -> None:
    """A saved model file loads back with the same card and identical weights."""
    mf = load_model_file(model_path)
    assert mf.card == CARD
    net = mf.build()
    again = build_model("mobilenet_v3_small")
    again.load_state_dict(torch.load(model_path, weights_only=True)["state_dict"])
    for (k, a), b in zip(net.state_dict().items(), again.state_dict().values(), strict=True):
        assert torch.equal(a, b), k


def test_file_is_loadable_with_weights_only(model_path: Path) -> None:
    """The file holds only plain types and tensors, so torch's safe loader accepts it."""
    payload = torch.load(model_path, weights_only=True)
    assert payload["format"] == FORMAT
    assert set(payload) == {"format", "card", "state_dict"}


def test_json_card_is_written_beside_the_file(model_path: Path) -> None:
    """The JSON card beside the model file equals the card inside it."""
    import json

    assert json.loads(card_path(model_path).read_text()) == CARD


def test_sha256_is_that_of_the_file_bytes(model_path: Path) -> None:
    """The sha256 reported at load is the digest of the file's bytes."""
    assert load_model_file(model_path).sha256 == hashlib.sha256(model_path.read_bytes()).hexdigest()


def test_missing_file_is_refused(tmp_path: Path) -> None:
    """A missing model file raises ModelError naming the path."""
    with pytest.raises(ModelError, match="does not exist"):
        Classifier.load(tmp_path / "nope.pt", device="cpu")


def test_truncated_file_is_refused(model_path: Path) -> None:
    """A truncated model file raises ModelError, not a torch error."""
    data = model_path.read_bytes()
    model_path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelError, match="corrupt"):
        load_model_file(model_path)


def test_random_bytes_are_refused(tmp_path: Path) -> None:
    """A file of random bytes raises ModelError."""
    path = tmp_path / "random.pt"
    path.write_bytes(os.urandom(4096))
    with pytest.raises(ModelError):
        load_model_file(path)


def test_pickle_with_code_is_refused_and_not_run(tmp_path: Path) -> None:
    """A pickle whose payload would call os.system is refused and the call never happens."""
    _Evil.marker = str(tmp_path / "pwned")
    plain, zipped = tmp_path / "plain.pt", tmp_path / "zipped.pt"
    plain.write_bytes(pickle.dumps({"format": FORMAT, "card": _Evil()}))
    torch.save({"format": FORMAT, "card": _Evil(), "state_dict": {}}, zipped)
    for path in (plain, zipped):
        with pytest.raises(ModelError):
            load_model_file(path)
    assert not Path(_Evil.marker).exists()


def test_wrong_format_key_is_refused(tmp_path: Path) -> None:
    """A valid torch file with another format key raises ModelError naming the format."""
    path = tmp_path / "other.pt"
    torch.save({"format": "someone-else/3", "card": CARD, "state_dict": {}}, path)
    with pytest.raises(ModelError, match="someone-else/3"):
        load_model_file(path)


def test_bare_state_dict_is_refused(tmp_path: Path) -> None:
    """A plain torchvision state_dict (no format, no card) is not a model file."""
    path = tmp_path / "bare.pt"
    torch.save(build_model("mobilenet_v3_small").state_dict(), path)
    with pytest.raises(ModelError, match="format"):
        load_model_file(path)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_every_architecture_takes_one_grey_channel(arch: str) -> None:
    """Every named architecture maps a 1-channel image to one logit."""
    net = build_model(arch).eval()
    with torch.inference_mode():
        out = net(torch.zeros(1, 1, 64, 64))
    assert out.shape == (1, 1)


def test_pretrained_file_of_wrong_architecture_is_refused(tmp_path: Path) -> None:
    """Local pretrained weights of another architecture raise ModelError."""
    from torchvision.models import resnet18

    path = tmp_path / "r18.pth"
    torch.save(resnet18(weights=None).state_dict(), path)
    with pytest.raises(ModelError, match="does not match"):
        build_model("mobilenet_v3_small", pretrained=path)


def test_pretrained_rgb_weights_are_loaded_into_the_grey_stem(tmp_path: Path) -> None:
    """RGB pretrained weights load, and the grey stem is the sum of the RGB kernels."""
    from torchvision.models import resnet18

    rgb = resnet18(weights=None)
    path = tmp_path / "r18.pth"
    torch.save(rgb.state_dict(), path)
    grey = build_model("resnet18", pretrained=path)
    assert torch.allclose(grey.conv1.weight, rgb.conv1.weight.sum(1, keepdim=True))
    assert torch.equal(grey.layer1[0].conv1.weight, rgb.layer1[0].conv1.weight)


def test_threshold_names_and_numbers(model_path: Path) -> None:
    """Named operating points come from the card; numeric strings are used as given."""
    clf = Classifier.load(model_path, device="cpu")
    assert clf.threshold("balanced") == 0.4
    assert clf.threshold("high_sensitivity") == 0.2
    assert clf.threshold("0.7") == 0.7
    with pytest.raises(ModelError):
        clf.threshold("lenient")


@pytest.mark.parametrize("calibration", [{"slope": 0.0, "intercept": 0.0},
                                         {"slope": -1.0, "intercept": 0.2},
                                         {"slope": float("nan"), "intercept": 0.0},
                                         {"slope": "steep", "intercept": 0.0},
                                         {"intercept": 0.0}])
def test_bad_calibration_is_refused(tmp_path: Path, calibration: dict[str, object]) -> None:
    """A calibration that is not a positive finite slope would reverse or destroy the ranking."""
    path = tmp_path / "cal.pt"
    save_model_file(path, build_model("mobilenet_v3_small"), dict(CARD, calibration=calibration))
    with pytest.raises(ModelError, match="calibration"):
        load_model_file(path)


def test_calibration_in_the_card_is_applied(tmp_path: Path) -> None:
    """A card's Platt calibration changes the probabilities a Classifier reports, monotonically."""
    torch.manual_seed(0)
    net = build_model("mobilenet_v3_small")
    plain, cal = tmp_path / "plain.pt", tmp_path / "cal.pt"
    save_model_file(plain, net, CARD)
    save_model_file(cal, net, dict(CARD, calibration={"method": "platt", "slope": 0.5,
                                                      "intercept": 0.25}))
    batch = torch.rand(4, 64, 64).numpy()
    raw = Classifier.load(plain, device="cpu").predict_batch(batch)
    got = Classifier.load(cal, device="cpu").predict_batch(batch)
    z = torch.logit(torch.from_numpy(raw)).numpy()
    assert got == pytest.approx(1.0 / (1.0 + np.exp(-(0.5 * z + 0.25))), abs=1e-6)
    assert list(np.argsort(got)) == list(np.argsort(raw))
