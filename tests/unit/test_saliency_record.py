"""The saliency record kept in results.saliency: compact, readable back, regions in source pixels."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fracture_node.saliency import SaliencyRecord
from fracture_node.saliency.geometry import find_regions, heatmap_to_source

SOURCE = (300, 200)  # rows, columns: letterboxed into 384 with padding left and right


def _blob_map(size: int = 384) -> np.ndarray:
    """A smooth model-input map with one hot spot inside the letterboxed image."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    heat = np.exp(-((xx - 150) ** 2 + (yy - 100) ** 2) / (2 * 20.0 ** 2))
    return (heat / heat.max()).astype(np.float32)


def _record(**kw: object) -> SaliencyRecord:
    args: dict[str, object] = {"method": "hirescam", "layer": "stride16", "threshold": 0.5,
                               "max_regions": 3}
    args.update(kw)
    return SaliencyRecord.from_map(_blob_map(), SOURCE, **args)  # type: ignore[arg-type]


def test_regions_are_those_of_find_regions_in_source_pixels() -> None:
    """The stored boxes are find_regions' boxes (source pixels), rounded to 0.01 px."""
    record = _record()
    expected = find_regions(_blob_map(), SOURCE, threshold=0.5, max_regions=3)
    assert len(record.regions) == len(expected) == 1
    got, want = record.regions[0], expected[0]
    assert got.x0 == pytest.approx(want.x0, abs=0.01)
    assert got.y1 == pytest.approx(want.y1, abs=0.01)
    assert got.peak == pytest.approx(want.peak, abs=1e-4)
    assert 0 <= got.x0 < got.x1 <= SOURCE[1] and 0 <= got.y0 < got.y1 <= SOURCE[0]


def test_json_round_trip_keeps_regions_and_settings() -> None:
    """A record read back from its JSON has the same regions, method, layer and shapes."""
    record = _record(method="gradcam", layer="last", threshold=0.4)
    back = SaliencyRecord.from_json(record.to_json())
    assert back.regions == record.regions
    assert (back.method, back.layer, back.threshold) == ("gradcam", "last", 0.4)
    assert (back.input_size, back.source_shape) == (384, SOURCE)


def test_stored_map_is_compact_and_close_to_the_original() -> None:
    """The JSON stays a few kB and the map over the source image is within 8-bit-and-grid error."""
    record = _record()
    text = record.to_json()
    assert len(text) < 6000
    raw = json.loads(text)
    assert raw["heatmap"]["size"] == 64 and raw["version"] == 1
    back = SaliencyRecord.from_json(text).source_map()
    want = heatmap_to_source(_blob_map(), SOURCE, 384)
    assert back.shape == SOURCE
    assert float(np.abs(back - want).max()) < 0.05


def test_max_regions_zero_keeps_the_map_only() -> None:
    """With max_regions 0 the record has a heat map and no region."""
    record = _record(max_regions=0)
    assert record.regions == ()
    assert float(record.heatmap.max()) > 0.9


@pytest.mark.parametrize("text", ["{}", "not json", '{"version": 2}',
                                  '{"version": 1, "heatmap": {"encoding": "png_base64", '
                                  '"data": "%%%"}, "regions": []}'])
def test_malformed_record_is_a_value_error(text: str) -> None:
    """A record that cannot be read raises ValueError, without quoting its content."""
    with pytest.raises(ValueError) as info:
        SaliencyRecord.from_json(text)
    assert "%%%" not in str(info.value)
