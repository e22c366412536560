"""Saliency maps (ml/explain.py): heat maps, target layers, letterbox inverse and regions."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fracture_node.errors import ModelError
from fracture_node.images import letterbox
from fracture_node.ml.explain import Explainer, target_layer
from fracture_node.ml.infer import Classifier
from fracture_node.ml.model import build_model
from fracture_node.saliency.defaults import METHODS
from fracture_node.saliency.geometry import (
    Letterbox,
    box_iou,
    find_regions,
    heatmap_from_png,
    heatmap_png,
    heatmap_to_source,
    label_components,
    peak_point,
    point_in_boxes,
    wilson_interval,
)


@pytest.fixture(scope="module")
def classifier(tiny_model: Path) -> Classifier:
    return Classifier.load(tiny_model, device="cpu")


@pytest.fixture(scope="module")
def batch(classifier: Classifier) -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.random((3, classifier.input_size, classifier.input_size), dtype=np.float32)


@pytest.mark.parametrize("method", METHODS)
def test_heat_maps_have_the_input_shape_and_lie_in_0_1(
    classifier: Classifier, batch: np.ndarray, method: str
) -> None:
    """explain_batch returns one float32 map per image, S x S, in [0, 1], maximum 1 or all 0."""
    _, maps = Explainer(classifier, method=method).explain_batch(batch)
    size = classifier.input_size
    assert maps.shape == (3, size, size)
    assert maps.dtype == np.float32
    assert maps.min() >= 0.0 and maps.max() <= 1.0
    for m in maps:
        assert m.max() == pytest.approx(1.0) or m.max() == 0.0


def test_a_map_peaks_between_two_hot_cells_not_on_a_cell_centre() -> None:
    """Bicubic upsampling: with two neighbouring hot cells (1.0 and 0.9) the peak lies between
    their centres, nearer the hotter one; one hot cell alone peaks at its own centre."""
    import torch

    from fracture_node.ml.explain import _upsample_normalised

    def peak(grid: torch.Tensor) -> tuple[int, int]:
        up = _upsample_normalised(grid[None], 128)[0].numpy()  # cells of 32 px
        assert up.min() >= 0.0 and up.max() == pytest.approx(1.0)
        row, col = np.unravel_index(int(np.argmax(up)), up.shape)
        return int(row), int(col)

    grid = torch.zeros(4, 4)
    grid[1, 1] = 1.0
    assert peak(grid) in {(47, 47), (47, 48), (48, 47), (48, 48)}  # the centre of cell (1, 1)
    grid[1, 2] = 0.9  # the next cell to the right, centre at column 80
    row, col = peak(grid)
    assert row in (47, 48)
    assert 52 <= col < 64


def test_probabilities_equal_predict_batch(classifier: Classifier, batch: np.ndarray) -> None:
    """The explainer's probabilities are the classifier's, from the same forward pass."""
    probabilities, _ = Explainer(classifier).explain_batch(batch)
    np.testing.assert_allclose(probabilities, classifier.predict_batch(batch), atol=1e-5)


def test_explaining_leaves_no_gradient_on_the_network(
    classifier: Classifier, batch: np.ndarray
) -> None:
    """Only activations are differentiated: no parameter gets a .grad, grad mode is restored."""
    import torch

    Explainer(classifier).explain_batch(batch)
    assert all(p.grad is None for p in classifier._net.parameters())
    assert torch.is_grad_enabled()


def test_several_methods_come_from_one_pass(classifier: Classifier, batch: np.ndarray) -> None:
    """explain_methods gives every method's map, each equal to that method run alone."""
    explainer = Explainer(classifier, method="hirescam")
    _, maps = explainer.explain_methods(batch, METHODS)
    assert set(maps) == set(METHODS)
    _, alone = explainer.explain_batch(batch)
    np.testing.assert_allclose(maps["hirescam"], alone, atol=1e-5)


def test_an_empty_batch_gives_empty_results(classifier: Classifier) -> None:
    """Zero images in, zero probabilities and zero maps out."""
    size = classifier.input_size
    probabilities, maps = Explainer(classifier).explain_batch(
        np.zeros((0, size, size), dtype=np.float32))
    assert probabilities.shape == (0,) and maps.shape == (0, size, size)


def test_a_batch_of_the_wrong_size_is_refused(classifier: Classifier) -> None:
    """Images not letterboxed to the model's input size are a ValueError."""
    with pytest.raises(ValueError, match="expected a batch"):
        Explainer(classifier).explain_batch(np.zeros((1, 10, 10), dtype=np.float32))


def test_unknown_method_is_a_model_error(classifier: Classifier) -> None:
    """A misspelt method name fails at construction with the list of choices."""
    with pytest.raises(ModelError, match="gradcam"):
        Explainer(classifier, method="gradcam+++")


@pytest.mark.parametrize(("arch", "name"), [
    ("resnet18", "layer4"),
    ("densenet121", "features"),
    ("efficientnet_b0", "features.8"),
    ("mobilenet_v3_small", "features.12"),
    ("convnext_tiny", "features.7"),
])
def test_the_last_conv_stage_is_the_target_of_each_family(arch: str, name: str) -> None:
    """Each supported family is explained at its last convolutional stage (stride 32)."""
    found, _ = target_layer(build_model(arch), arch, "last")
    assert found == name


def test_stride16_layer_gives_a_finer_map_stage(classifier: Classifier) -> None:
    """layer='stride16' picks the last MobileNetV3 stage before the final downsampling."""
    explainer = Explainer(classifier, layer="stride16")
    assert explainer.layer_name == "features.8"
    _, maps = explainer.explain_batch(np.full((1, 64, 64), 0.5, dtype=np.float32))
    assert maps.shape == (1, 64, 64)


def test_fused_layer_combines_two_stages_from_one_backward(classifier: Classifier) -> None:
    """layer='fused' names both stages and returns one normalised map per image."""
    explainer = Explainer(classifier, layer="fused")
    assert explainer.layer_name == "features.8+features.12"
    rng = np.random.default_rng(3)
    _, maps = explainer.explain_batch(rng.random((2, 64, 64), dtype=np.float32))
    assert maps.shape == (2, 64, 64) and maps.min() >= 0.0 and maps.max() <= 1.0


# Geometry ------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(300, 600), (600, 300), (97, 211), (211, 97), (50, 50)])
def test_letterbox_geometry_matches_images_letterbox(shape: tuple[int, int]) -> None:
    """The content rectangle of Letterbox.of is exactly where images.letterbox puts the image."""
    size = 64
    boxed = letterbox(np.ones(shape, dtype=np.float32), size)
    rows, cols = np.nonzero(boxed > 0)
    box = Letterbox.of(shape, size)
    assert (rows.min(), rows.max() + 1) == (box.top, box.top + box.nh)
    assert (cols.min(), cols.max() + 1) == (box.left, box.left + box.nw)


@pytest.mark.parametrize("shape", [(300, 600), (600, 300)])
def test_to_source_inverts_to_model(shape: tuple[int, int]) -> None:
    """Mapping a source point to the model input and back returns the same point."""
    box = Letterbox.of(shape, 64)
    for x, y in [(0.0, 0.0), (shape[1], shape[0]), (123.4, 56.7)]:
        back = box.to_source(*box.to_model(x, y))
        assert back == pytest.approx((x, y), abs=1e-9)


@pytest.mark.parametrize(("shape", "square"), [
    ((300, 600), (420, 90, 500, 170)),   # landscape: x0, y0, x1, y1 in source pixels
    ((600, 300), (60, 380, 140, 460)),   # portrait
])
def test_a_region_in_model_coordinates_maps_to_the_right_source_pixels(
    shape: tuple[int, int], square: tuple[int, int, int, int]
) -> None:
    """A bright square letterboxed by images.letterbox comes back at its source pixels."""
    size = 64
    image = np.zeros(shape, dtype=np.float32)
    x0, y0, x1, y1 = square
    image[y0:y1, x0:x1] = 1.0
    model_map = letterbox(image, size)
    (region,) = find_regions(model_map, shape, size, threshold=0.5)
    pixel = max(shape) / size  # one model-input pixel in source pixels
    assert region.box == pytest.approx(square, abs=pixel)
    assert region.peak == pytest.approx(1.0)
    assert x0 <= region.peak_x <= x1 and y0 <= region.peak_y <= y1
    assert peak_point(model_map, shape, size) == pytest.approx(
        (region.peak_x, region.peak_y), abs=pixel)


def test_heatmap_to_source_has_the_source_shape_and_drops_the_padding() -> None:
    """A map over the padding only is not part of the source map; the rest is scaled to [0, 1]."""
    shape = (300, 600)
    box = Letterbox.of(shape, 64)
    heat = np.zeros((64, 64), dtype=np.float32)
    heat[: box.top, :] = 1.0  # padding above the image: must disappear
    heat[box.top + box.nh // 2, box.left + box.nw // 2] = 0.25
    out = heatmap_to_source(heat, shape)
    assert out.shape == shape and out.dtype == np.float32
    assert out.max() == pytest.approx(1.0)
    row, col = np.unravel_index(int(np.argmax(out)), shape)
    assert abs(row - 150) < 10 and abs(col - 300) < 10


def test_an_all_zero_map_has_no_region_and_no_peak() -> None:
    """No positive evidence gives no region, no peak point and a zero source map."""
    heat = np.zeros((64, 64), dtype=np.float32)
    assert find_regions(heat, (100, 80)) == []
    assert peak_point(heat, (100, 80)) is None
    assert not heatmap_to_source(heat, (100, 80)).any()


def test_regions_from_a_synthetic_map_are_sorted_and_thresholded() -> None:
    """Two blobs above the threshold give two regions, hottest first; a faint one gives none."""
    yy, xx = np.mgrid[0:64, 0:64]

    def blob(cx: float, cy: float, peak: float) -> np.ndarray:
        return peak * np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * 3.0 ** 2))

    heat = (blob(15, 20, 1.0) + blob(45, 40, 0.8) + blob(50, 10, 0.3)).astype(np.float32)
    regions = find_regions(heat, (64, 64), threshold=0.5)
    assert len(regions) == 2
    assert regions[0].peak == pytest.approx(1.0, abs=0.01)
    assert regions[1].peak == pytest.approx(0.8, abs=0.02)
    assert regions[0].x0 < 15.5 < regions[0].x1 and regions[0].y0 < 20.5 < regions[0].y1
    assert regions[1].x0 < 45.5 < regions[1].x1 and regions[1].y0 < 40.5 < regions[1].y1
    assert len(find_regions(heat, (64, 64), threshold=0.5, max_regions=1)) == 1
    polygon = regions[0].polygon()
    assert polygon.shape == (5, 2) and (polygon[0] == polygon[-1]).all()


def test_a_heat_map_survives_its_png_to_8_bits() -> None:
    """heatmap_png / heatmap_from_png keep the map within half a grey level."""
    heat = np.random.default_rng(2).random((64, 64), dtype=np.float32)
    back = heatmap_from_png(heatmap_png(heat))
    assert back.shape == (64, 64) and back.dtype == np.float32
    assert np.abs(back - heat).max() <= 0.5 / 255 + 1e-6


def test_components_are_four_connected() -> None:
    """Pixels touching only at a corner are two components."""
    mask = np.array([[1, 0, 0], [0, 1, 1], [0, 0, 0]], dtype=bool)
    labels, count = label_components(mask)
    assert count == 2
    assert labels[1, 1] == labels[1, 2] != labels[0, 0]


def test_localisation_scores() -> None:
    """IoU, the pointing-game hit (with tolerance) and the Wilson interval on known values."""
    assert box_iou((0, 0, 10, 10), (5, 0, 15, 10)) == pytest.approx(50 / 150)
    assert box_iou((0, 0, 1, 1), (2, 2, 3, 3)) == 0.0
    assert point_in_boxes((5, 5), [(0, 0, 10, 10)])
    assert not point_in_boxes((12, 5), [(0, 0, 10, 10)])
    assert point_in_boxes((12, 5), [(0, 0, 10, 10)], tolerance=2)
    assert not point_in_boxes(None, [(0, 0, 10, 10)])
    low, high = wilson_interval(60, 100)
    assert low == pytest.approx(0.502, abs=1e-3) and high == pytest.approx(0.691, abs=1e-3)


def test_label_components_matches_a_flood_fill_on_random_masks() -> None:
    """The run-based labelling gives the same labels as a plain 4-connected flood fill."""
    from collections import deque

    from fracture_node.saliency.geometry import label_components

    def flood(mask: np.ndarray) -> tuple[np.ndarray, int]:
        labels = np.zeros(mask.shape, dtype=np.int32)
        h, w = mask.shape
        count = 0
        for r0, c0 in zip(*np.nonzero(mask), strict=True):
            if labels[r0, c0]:
                continue
            count += 1
            labels[r0, c0] = count
            queue = deque([(r0, c0)])
            while queue:
                r, c = queue.popleft()
                for rr, cc in ((r - 1, c), (r + 1, c), (r, c - 1), (r, c + 1)):
                    if 0 <= rr < h and 0 <= cc < w and mask[rr, cc] and not labels[rr, cc]:
                        labels[rr, cc] = count
                        queue.append((rr, cc))
        return labels, count

    rng = np.random.default_rng(7)
    for _ in range(200):
        mask = rng.random((int(rng.integers(1, 30)), int(rng.integers(1, 30)))) < rng.random()
        got, n = label_components(mask)
        want, m = flood(mask)
        assert n == m and np.array_equal(got, want)


def _reference_regions(heatmap: np.ndarray, shape: tuple[int, int], threshold: float,
                       max_regions: int) -> list[tuple[float, ...]]:
    """find_regions written the plain way: one pass over the labels per component, the peak
    at the first hottest pixel in raster order."""
    box = Letterbox.of(shape, heatmap.shape[0])
    crop = np.clip(box.crop(heatmap), 0.0, None)
    if crop.max() <= 0:
        return []
    crop = crop / crop.max()
    labels, count = label_components(crop >= threshold)
    regions = []
    for k in range(1, count + 1):
        rows, cols = np.nonzero(labels == k)
        values = crop[rows, cols]
        i = int(np.argmax(values))
        x0, y0 = box.to_source(box.left + cols.min(), box.top + rows.min())
        x1, y1 = box.to_source(box.left + cols.max() + 1, box.top + rows.max() + 1)
        px, py = box.to_source(box.left + cols[i] + 0.5, box.top + rows[i] + 0.5)
        regions.append((max(0.0, x0), max(0.0, y0), min(float(box.width), x1),
                        min(float(box.height), y1), float(values[i]), px, py,
                        float(rows.size * (box.scale_x * box.scale_y))))
    regions.sort(key=lambda r: (-r[4], -r[7]))
    area = float(box.height * box.width)
    kept = [r for i, r in enumerate(regions) if i == 0 or r[7] >= 0.002 * area]
    return kept[:max_regions]


def test_find_regions_matches_the_plain_computation_on_random_maps() -> None:
    """Boxes, peaks, peak points and areas from the runs equal the per-component computation,
    on smooth maps (like a CAM), noisy ones with many components, and maps with tied peaks."""
    from PIL import Image

    rng = np.random.default_rng(11)
    for trial in range(300):
        size = int(rng.choice([16, 31, 64, 96]))
        grid = int(rng.integers(2, 16))
        small = np.maximum(rng.normal(size=(grid, grid)), 0).astype(np.float32)
        heat = np.asarray(Image.fromarray(small, mode="F").resize(
            (size, size), Image.Resampling.BILINEAR), dtype=np.float32)
        if trial % 3 == 0:
            heat = (rng.random((size, size)) < 0.4) * rng.random((size, size)).astype(np.float32)
        if trial % 4 == 0:
            heat = np.round(heat * 4) / 4  # tied peaks
        shape = (int(rng.integers(5, 3000)), int(rng.integers(5, 3000)))
        threshold = float(rng.choice([0.1, 0.5, 0.9, 1.0]))
        max_regions = int(rng.integers(1, 6))
        got = [(r.x0, r.y0, r.x1, r.y1, r.peak, r.peak_x, r.peak_y, r.area)
               for r in find_regions(heat, shape, threshold=threshold, max_regions=max_regions)]
        assert got == _reference_regions(heat, shape, threshold, max_regions), trial


def test_calibrated_probabilities_equal_predict_batch(tiny_model: Path, batch: np.ndarray) -> None:
    """With a calibration in the card, the explainer reports the same calibrated probabilities
    as ``predict_batch``, and both are ``sigmoid(slope * logit + intercept)`` of the raw ones."""
    clf = Classifier.load(tiny_model, device="cpu")
    raw = clf.predict_batch(batch)
    clf.calibration = (3.0, -1.5)
    calibrated = clf.predict_batch(batch)
    z = np.log(raw) - np.log1p(-raw)
    np.testing.assert_allclose(calibrated, 1.0 / (1.0 + np.exp(-(3.0 * z - 1.5))), atol=1e-6)
    assert not np.allclose(calibrated, raw, atol=1e-3)
    probabilities, _ = Explainer(clf).explain_batch(batch)
    np.testing.assert_allclose(probabilities, calibrated, atol=1e-5)
