import io
import json

import numpy as np
import pytest
from PIL import Image

from pouta_jax import errors, files, report
from tests.conftest import tensorboard_records


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
  # A profile that splits its FLOPs adds the discriminative part's column.
  parts = {"reconstructive": 3e9, "discriminative": 0.4e9, "scoring": 0.1e9, "total": 3.5e9}
  split = report.results_table({"draem": {"mean": row}}, {"draem": {**profile, "flops": parts}})
  assert "| params total | GFLOPs discr. | GFLOPs / image |" in split
  assert "| draem | 2.000M | 0.500M | 2.500M | 0.400 | 3.500 | 12.35 |" in split


def test_heatmap_panel_layout():
  image = np.zeros((8, 8, 3), np.uint8)
  mask = np.zeros((8, 8), bool)
  mask[2:4, 2:4] = True
  amap = mask.astype(np.float32)
  panel = report.heatmap_panel(image, mask, amap, threshold=0.5)
  assert panel.shape == (8, 4 * 8 + 3 * 2, 3) and panel.dtype == np.uint8
  predicted = panel[:, -8:, 0] > 0
  np.testing.assert_array_equal(predicted, mask)
  # A map with the weighted reconstruction error spans [0, 1 + weight]: coloured over that span
  # (not saturated at 1), thresholded as it is.
  wide = report.heatmap_panel(image, mask, 1.5 * amap + 0.3, threshold=1.0, map_max=1.5)
  np.testing.assert_array_equal(
    wide[:, :-8], report.heatmap_panel(image, mask, amap + 0.2, 2 / 3)[:, :-8]
  )
  np.testing.assert_array_equal(wide[:, -8:, 0] > 0, mask)


def test_write_heatmaps_spread_over_defect_types_and_upscale_small_maps(tmp_path):
  defects = np.array(["good", "hole", "crack", "good", "hole", "crack"])
  test_set = {
    "image": np.zeros((6, 8, 8, 3), np.uint8),
    "mask": np.zeros((6, 8, 8), bool),
    "label": (defects != "good").astype(int),
    "defect": defects,
    "name": np.array([f"{d}/{i:03d}" for i, d in enumerate(defects)]),
  }
  panels = report.heatmap_panels(test_set, np.zeros((6, 8, 8)), 0.5, count=3)
  written = report.write_heatmaps(tmp_path, panels)
  assert sorted(p.name.split("_")[0] for p in written) == ["crack", "good", "hole"]
  from PIL import Image

  assert Image.open(written[0]).size[1] == report.MIN_PANEL_HEIGHT
  np.testing.assert_array_equal(np.asarray(Image.open(written[0])), panels[written[0].stem])
  every = report.heatmap_panels(test_set, np.zeros((6, 8, 8)), 0.5, count=-1)
  assert sorted(every) == sorted(n.replace("/", "_") for n in test_set["name"])

  # TensorBoard: the metrics and the first panels, at the given step.
  report.write_evaluation_to_tensorboard(tmp_path, 40, {"pixel_ap": 0.25}, every)
  records = tensorboard_records(tmp_path / "tensorboard")
  assert ("eval/pixel_ap", 40, "simple_value") in records
  images = [r for r in records if r[2] == "image"]
  assert len(images) == report.TENSORBOARD_PANELS
  assert images[0][:2] == (f"eval/heatmaps/{next(iter(every))}", 40)


def test_curves_are_drawn_where_their_points_are():
  """A ROC curve through (0.5, 0.5): the plot's centre pixel is the series' colour."""
  x = y = np.linspace(0, 1, 101)
  picture = np.asarray(
    Image.open(io.BytesIO(report.curve_png("t", "x", "y", [("a", (1, 2, 3), x, y)])))
  )
  assert picture.shape == (report.PLOT_SIZE, report.PLOT_SIZE, 3)
  low, span = report.PLOT_MARGIN, report.PLOT_SIZE - 1.5 * report.PLOT_MARGIN
  centre_x, centre_y = (
    round(low + 0.5 * span),
    round(report.PLOT_SIZE - report.PLOT_MARGIN - 0.5 * span),
  )
  assert tuple(picture[centre_y, centre_x]) == (1, 2, 3)
  assert tuple(picture[centre_y - 30, centre_x - 30]) == (255, 255, 255)  # off the diagonal


def test_score_histogram_shows_both_classes():
  png = report.histogram_png("scores", np.array([0.1, 0.2, 0.2]), np.array([0.8, 0.9]))
  colours = {tuple(c) for c in np.asarray(Image.open(io.BytesIO(png))).reshape(-1, 3)}
  assert report.IMAGE_COLOR in colours and report.PIXEL_COLOR in colours


def test_evaluation_events_reach_a_full_disk_whole_or_not_at_all(small_disk):
  """tensorboardX writes from a thread of its own, which died on a full disk with two tracebacks
  and left a truncated file: the events are written whole, from the caller, or not at all."""
  panel = np.random.default_rng(0).integers(0, 255, (512, 512, 3), dtype=np.uint8)
  with pytest.raises(errors.DiskFullError, match=r"tensorboard/events.out.tfevents.*disk full"):
    report.write_evaluation_to_tensorboard(small_disk, 7, {"pixel_ap": 0.5}, {"p": panel})
  assert not (small_disk / "tensorboard").exists() or not list(
    (small_disk / "tensorboard").iterdir()
  )
  report.write_evaluation_to_tensorboard(small_disk, 7, {"pixel_ap": 0.5}, {})
  assert tensorboard_records(small_disk / "tensorboard") == [("eval/pixel_ap", 7, "simple_value")]
