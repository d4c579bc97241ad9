import json

import numpy as np
import pytest

from pouta_jax import files, report


def test_write_atomic_leaves_nothing_on_failure(tmp_path, monkeypatch):
  target = tmp_path / "metrics.json"
  files.write_json(target, {"a": 1})
  monkeypatch.setattr(files.os, "replace", lambda *a: (_ for _ in ()).throw(OSError("disk")))
  with pytest.raises(OSError):
    files.write_json(target, {"a": 2})
  assert json.loads(target.read_text()) == {"a": 1}
  assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]


def test_results_table_lists_models_categories_and_mean():
  row = {m: 0.5 for m in report.METRIC_COLUMNS}
  profile = {
    "params": {"reconstructive": 2_000_000, "discriminative": 500_000, "total": 2_500_000},
    "flops_per_image": 3.5e9,
    "latency_ms": 12.345,
  }
  table = report.results_table(
    {
      "draem": {"weave": row, "mean": row},
      "draem_untrained": {"weave": {**row, "pixel_ap": float("nan")}, "mean": row},
    },
    {"draem": profile},
    caption="cap",
  )
  assert table.startswith("cap")
  assert "| draem | 2.000M | 0.500M | 2.500M | 3.500 | 12.35 | 50.0 | 50.0 | 50.0 | 50.0 |" in table
  assert "| draem_untrained | – | – | – | – | – | 50.0 |" in table
  assert "| model | weave | mean |" in table
  assert "| draem | 50.0 | 50.0 |" in table and "| draem_untrained | – | 50.0 |" in table
  assert all(f"**{m}**" in table for m in report.METRIC_COLUMNS)


def test_heatmap_panel_layout():
  image = np.zeros((8, 8, 3), np.uint8)
  mask = np.zeros((8, 8), bool)
  mask[2:4, 2:4] = True
  amap = mask.astype(np.float32)
  panel = report.heatmap_panel(image, mask, amap, threshold=0.5)
  assert panel.shape == (8, 4 * 8 + 3 * 2, 3) and panel.dtype == np.uint8
  predicted = panel[:, -8:, 0] > 0
  np.testing.assert_array_equal(predicted, mask)


def test_write_heatmaps_spread_over_defect_types_and_upscale_small_maps(tmp_path):
  defects = np.array(["good", "hole", "crack", "good", "hole", "crack"])
  test_set = {
    "image": np.zeros((6, 8, 8, 3), np.uint8),
    "mask": np.zeros((6, 8, 8), bool),
    "label": (defects != "good").astype(int),
    "defect": defects,
    "name": np.array([f"{d}/{i:03d}" for i, d in enumerate(defects)]),
  }
  written = report.write_heatmaps(tmp_path, test_set, np.zeros((6, 8, 8)), 0.5, count=3)
  assert sorted(p.name.split("_")[0] for p in written) == ["crack", "good", "hole"]
  from PIL import Image

  assert Image.open(written[0]).size[1] == report.MIN_PANEL_HEIGHT
