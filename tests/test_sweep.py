import csv
import io
import json

import numpy as np
import pytest

from pouta_jax import config as config_lib, sweep


@pytest.fixture
def config():
  return config_lib.load("pouta", "weave,tiny")


def test_product_zip_and_seeds(config):
  points = sweep.expand(
    config,
    ["optim.lr=1e-4,3e-4"],
    ["model.compare=both,encoder", "model.guidance=True,False"],
    seeds=2,
  )
  assert len(points) == 2 * 2 * 2
  assert points[0] == {
    "optim.lr": "1e-4",
    "model.compare": "both",
    "model.guidance": "True",
    "train.seed": "0",
  }
  assert {(p["model.compare"], p["model.guidance"]) for p in points} == {
    ("both", "True"),
    ("encoder", "False"),
  }
  assert sweep.point_name(points[-1]) == (
    "optim.lr=3e-4,model.compare=encoder,model.guidance=False,train.seed=1"
  )
  assert sweep.expand(config, [], []) == [{}]
  # Tuple values are bracketed; the commas inside them do not separate values.
  weights = sweep.expand(config, ["loss.level_weights=(1,1,1,1),[0.5,0.5,0.5,0.5]"], [])
  assert [p["loss.level_weights"] for p in weights] == ["(1,1,1,1)", "[0.5,0.5,0.5,0.5]"]


def test_bad_sweeps_name_the_flag(config):
  with pytest.raises(sweep.SweepError, match="no key 'optim.learning_rate'"):
    sweep.expand(config, ["optim.learning_rate=1,2"], [])
  with pytest.raises(sweep.SweepError, match="expected key=value1,value2"):
    sweep.expand(config, ["optim.lr"], [])
  with pytest.raises(sweep.SweepError, match=r"different lengths: optim.lr \(2\), model.compare"):
    sweep.expand(config, [], ["optim.lr=1,2", "model.compare=both"])
  for unbalanced in ["(1,1,1,1", "(1,1,1,1)),(1,1,1,1)"]:
    with pytest.raises(sweep.SweepError, match="unbalanced brackets"):
      sweep.expand(config, [f"loss.level_weights={unbalanced}"], [])


def _fake_run(root, name, compare, seed, category, value, val=None):
  folder = root / name / category
  folder.mkdir(parents=True)
  config = {
    "model": {"name": "pouta", "compare": compare},
    "data": {"category": category},
    "train": {"seed": seed},
  }
  (folder / "config.json").write_text(json.dumps(config))
  results = {category: {"pixel_ap": value}}
  if val is not None:
    results["validation"] = {category: {"pixel_ap": val}}
    # Each kind scores a tenth more than the one before it.
    results["validation_by_defect"] = {
      category: {k: {"pixel_ap": val + i / 10} for i, k in enumerate(("synthetic", "spot"))}
    }
  (folder / "metrics.json").write_text(json.dumps({"pouta": results}))


def test_aggregate_mean_and_std_over_seeds(tmp_path):
  for seed, (a, b) in enumerate([(0.4, 0.6), (0.6, 0.8)]):
    _fake_run(tmp_path, f"both{seed}", "both", seed, "weave", a)
    _fake_run(tmp_path, f"both{seed}", "both", seed, "pill", b)
    _fake_run(tmp_path, f"enc{seed}", "encoder", seed, "weave", a / 2)
  markdown, table = sweep.aggregate(tmp_path)
  rows = list(csv.reader(io.StringIO(table)))
  # The rows are compared on the categories they all have.
  assert rows[0] == ["model.compare", "pill", "weave", "mean (weave)"]
  assert rows[1] == ['"both"', "70.0 ± 10.0", "50.0 ± 10.0", "50.0"]
  assert rows[2] == ['"encoder"', "–", "25.0 ± 5.0", "25.0"]
  _fake_run(tmp_path, "enc2", "encoder", 2, "pill", 0.3)  # one seed where others have two
  rows = list(csv.reader(io.StringIO(sweep.aggregate(tmp_path)[1])))
  assert rows[0][-1] == "mean" and rows[1] == ['"both"', "70.0 ± 10.0", "50.0 ± 10.0", "60.0"]
  assert rows[2] == ['"encoder"', "30.0 ± 0.0 (n=1)", "25.0 ± 5.0", "27.5"]
  (tmp_path / "enc2" / "pill" / "metrics.json").unlink()
  assert "| model.compare | pill | weave | mean (weave) |" in markdown
  # A run whose config lacks a key (written by an older version) still counts, as null.
  _fake_run(tmp_path, "old", "both", 0, "pill", 0.5)
  config_path = tmp_path / "old" / "pill" / "config.json"
  config = json.loads(config_path.read_text())
  config["model"]["extra"] = 1
  config_path.write_text(json.dumps(config))
  rows = list(csv.reader(io.StringIO(sweep.aggregate(tmp_path)[1])))
  assert rows[0] == [
    "model.compare",
    "model.extra",
    "pill",
    "weave",
    "mean (each row's categories)",
  ]


def test_aggregate_ranks_by_the_validation_split(tmp_path):
  for seed in (0, 1):
    _fake_run(tmp_path, f"both{seed}", "both", seed, "weave", 0.6, val=0.3 + seed / 10)
    _fake_run(tmp_path, f"enc{seed}", "encoder", seed, "weave", 0.4, val=0.5)
  test_rows = list(csv.reader(io.StringIO(sweep.aggregate(tmp_path)[1])))
  assert [r[0] for r in test_rows[1:]] == ['"both"', '"encoder"']  # the best test mean first
  markdown, table = sweep.aggregate(tmp_path, split="validation")
  rows = list(csv.reader(io.StringIO(table)))
  assert rows[1:] == [['"encoder"', "50.0 ± 0.0", "50.0"], ['"both"', "35.0 ± 5.0", "35.0"]]
  assert markdown.startswith("**pixel_ap** on the validation set")
  # One kind of validation anomaly: its metrics per run.
  markdown, table = sweep.aggregate(tmp_path, split="validation/spot")
  rows = list(csv.reader(io.StringIO(table)))
  assert rows[1:] == [['"encoder"', "60.0 ± 0.0", "60.0"], ['"both"', "45.0 ± 5.0", "45.0"]]
  assert markdown.startswith("**pixel_ap** on the validation set's spot anomalies")
  with pytest.raises(sweep.SweepError, match=r"no validation/removed metrics of \['weave'\]"):
    sweep.aggregate(tmp_path, split="validation/removed")
  with pytest.raises(sweep.SweepError, match=r"--split='test/spot': expected one of"):
    sweep.aggregate(tmp_path, split="test/spot")
  _fake_run(tmp_path, "old", "decoder", 0, "weave", 0.5)  # trained without a validation split
  with pytest.raises(sweep.SweepError, match=r"old/weave/metrics.json: no validation metrics"):
    sweep.aggregate(tmp_path, split="validation")


def test_aggregate_leaves_out_pixel_metrics_an_image_level_run_lacks(tmp_path):
  _fake_run(tmp_path, "a0", "both", 0, "weave", 0.4)
  _fake_run(tmp_path, "a1", "both", 1, "weave", None)  # no masks: pixel_ap null
  rows = list(csv.reader(io.StringIO(sweep.aggregate(tmp_path)[1])))
  assert rows[1] == ["default", "40.0 ± 0.0", "40.0"]


def test_aggregate_without_runs(tmp_path):
  with pytest.raises(sweep.SweepError, match="no run"):
    sweep.aggregate(tmp_path)


def test_aggregate_names_a_damaged_file(tmp_path):
  _fake_run(tmp_path, "a0", "both", 0, "weave", 0.4)
  metrics = tmp_path / "a0" / "weave" / "metrics.json"
  metrics.write_bytes(b"\xff")
  with pytest.raises(sweep.SweepError, match=rf"{metrics}: not valid JSON"):
    sweep.aggregate(tmp_path)


def test_config_get_sweep_is_the_ablation_study():
  spec = config_lib.load_sweep(config_lib.CONFIG_DIR / "pouta.py", "weave,tiny")
  zipped = [f"{k}={','.join(map(str, v))}" for k, v in spec["zip"].items()]
  points = sweep.expand(config_lib.load("pouta", "weave,tiny"), [], zipped)
  assert points[0] == {
    "model.compare": "difference",
    "model.guidance": "True",
    "loss.deep_supervision": "True",
  }
  # The full model, then one idea off at a time.
  off = [sum(v not in ("difference", "True") for v in p.values()) for p in points]
  assert off == [0, 1, 1, 1, 1]
  with pytest.raises(ValueError, match="defines no get_sweep"):
    config_lib.load_sweep(config_lib.CONFIG_DIR / "draem.py")


def test_jobs_name_workdirs_by_point_and_category():
  jobs = sweep.jobs(
    "configs/pouta.py", "tiny", ["weave", "pill"], "runs", [{"optim.lr": "1e-4"}], ["--mode=train"]
  )
  assert [(j.category, j.workdir) for j in jobs] == [
    ("weave", "runs/optim.lr=1e-4/weave"),
    ("pill", "runs/optim.lr=1e-4/pill"),
  ]
  assert jobs[1].command("python")[3:] == [
    "--config=configs/pouta.py:pill,tiny",
    "--workdir=runs/optim.lr=1e-4/pill",
    "--config.optim.lr=1e-4",
    "--mode=train",
  ]


def test_unknown_categories_are_named(tmp_path):
  sweep.check_categories(["weave", "pill"], "")
  with pytest.raises(sweep.SweepError, match=r"\['bottle'\] not among the embedded"):
    sweep.check_categories(["weave", "bottle"], "")
  (tmp_path / "bottle").mkdir()
  sweep.check_categories(["bottle"], str(tmp_path))
  with pytest.raises(sweep.SweepError, match=r"\['weave'\] not among the folders of"):
    sweep.check_categories(["weave"], str(tmp_path))


def test_aggregate_reads_every_category_of_an_older_one_program_run(tmp_path):
  # Versions before per-run folders wrote one metrics.json for all categories of a program.
  _fake_run(tmp_path, "alone", "both", 0, "weave", 0.4)
  folder = tmp_path / "stacked0" / "stacked"
  folder.mkdir(parents=True)
  config = {
    "model": {"name": "pouta", "compare": "both"},
    "data": {"category": "weave", "categories": ["weave", "pill"]},
    "train": {"seed": 1},
  }
  (folder / "config.json").write_text(json.dumps(config))
  (folder / "metrics.json").write_text(
    json.dumps({"pouta": {"weave": {"pixel_ap": 0.6}, "pill": {"pixel_ap": 0.8}, "mean": {}}})
  )
  rows = list(csv.reader(io.StringIO(sweep.aggregate(tmp_path)[1])))
  assert rows == [
    ["setting", "pill", "weave", "mean"],
    ["default", "80.0 ± 0.0 (n=1)", "50.0 ± 10.0", "65.0"],
  ]


def test_launcher_stacks_what_it_can_and_splits_the_rest():
  config = config_lib.load("pouta", "weave,tiny")
  separate, zips, stacked = sweep.split_axes(
    config, ["optim.lr=1e-4,3e-4", "model.base_width=8,16"], ["loss.final_weight=1,2"], 3
  )
  assert separate == ["model.base_width=8,16"] and zips == []
  assert stacked == ("--sweep=optim.lr=1e-4,3e-4", "--zip=loss.final_weight=1,2", "--seeds=3")
  jobs = sweep.jobs(
    "configs/pouta.py",
    "tiny",
    ["weave", "pill"],
    "runs",
    sweep.expand(config, separate, zips),
    ["--config.data.num_workers=0"],
    stacked,
  )
  assert [j.workdir for j in jobs] == [
    "runs/model.base_width=8/stacked",
    "runs/model.base_width=16/stacked",
  ]
  assert jobs[0].args == (
    "--config=configs/pouta.py:weave,pill,tiny",
    "--workdir=runs/model.base_width=8/stacked",
    "--config.model.base_width=8",
    *stacked,
    "--config.data.num_workers=0",
  )
  # A --zip axis with a key that changes the program is run as separate programs, whole.
  _, zips, stacked = sweep.split_axes(config, [], ["optim.lr=1,2", "model.compare=both,encoder"], 1)
  assert zips == ["optim.lr=1,2", "model.compare=both,encoder"] and stacked == ()


def test_settings_are_measured_against_the_default_in_pairs(tmp_path):
  """Each setting less the default, paired over (category, seed), against numpy; the default
  stays unless the best beats it by more than 2 standard errors of those differences."""
  default, other, noisy = tmp_path / "default", tmp_path / "encoder", tmp_path / "decoder"
  gains = {"encoder": [0.05, 0.04, 0.06, 0.05], "decoder": [0.20, -0.10, 0.25, -0.05]}
  pairs = [("weave", 0), ("weave", 1), ("pill", 0), ("pill", 1)]
  for i, (category, seed) in enumerate(pairs):
    base = 0.3 + 0.1 * i  # seeds and categories differ far more than the settings do
    _fake_run(default, f"s{seed}", "both", seed, category, 0.0, val=base)
    _fake_run(other, f"s{seed}", "encoder", seed, category, 0.0, val=base + gains["encoder"][i])
    _fake_run(noisy, f"s{seed}", "decoder", seed, category, 0.0, val=base + gains["decoder"][i])
  _fake_run(other, "s2", "encoder", 2, "weave", 0.0, val=0.9)  # no default to pair with
  keys = ["model.name", "model.compare"]
  found = sweep.paired_differences([other, noisy], [default], keys, "pixel_ap")
  assert found[('"pouta"', '"both"')] is None  # the default itself
  for name, gain in gains.items():
    mean, error, n = found[('"pouta"', f'"{name}"')]
    d = 100 * np.asarray(gain)
    assert n == 4 and mean == pytest.approx(d.mean())
    assert error == pytest.approx(d.std(ddof=1) / 2)
  _, ranked = sweep.aggregate([default, other, noisy], keys, "pixel_ap", "validation")
  text = sweep.choice(keys, ranked, found, "pixel_ap")
  assert text.startswith('Chosen by validation pixel_ap: **model.name="pouta", model.compare=')
  table = sweep.differences_table(keys, ranked, found, "pixel_ap")
  assert '| "pouta" | "both" | (the default) |' in table
  assert '| "pouta" | "encoder" | +5.0 ± 0.4 (n=4) |' in table
  _fake_run(tmp_path / "once", "s0", "cosine", 0, "weave", 0.0, val=0.9)  # a single pair
  once = sweep.paired_differences([tmp_path / "once"], [default], keys, "pixel_ap")
  assert ('"pouta"', '"cosine"') not in once
  _, ranked = sweep.aggregate([default, tmp_path / "once"], keys, "pixel_ap", "validation")
  assert '| "pouta" | "cosine" | – (fewer than 2 pairs) |' in sweep.differences_table(
    keys, ranked, once, "pixel_ap"
  )
  assert "fewer than 2 runs paired" in sweep.choice(keys, ranked, once, "pixel_ap")
  # Without the steady setting, the best mean is the noisy one: within 2 standard errors.
  del found[('"pouta"', '"encoder"')]
  _, ranked = sweep.aggregate([default, noisy], keys, "pixel_ap", "validation")
  assert sweep.choice(keys, ranked, found, "pixel_ap") == (
    "Chosen by validation pixel_ap: **the default** of pouta: the best mean, "
    'model.name="pouta", model.compare="decoder", is +7.5 ± 8.8 points against the default '
    "over 4 pairs, within 2 standard errors."
  )


def _fake_model_run(root, model, steps, weight, seed, category, pixel_ap, aupro):
  folder = root / f"{model},{steps},{weight},{seed}" / category
  folder.mkdir(parents=True)
  config = {
    "model": {"name": model},
    "data": {"category": category},
    "train": {"seed": seed, "num_steps": steps},
    "eval": {"error_weight": weight},
  }
  (folder / "config.json").write_text(json.dumps(config))
  results = {category: {"pixel_ap": pixel_ap, "aupro": aupro}}
  (folder / "metrics.json").write_text(json.dumps({model: results}))


def test_models_are_compared_in_pairs_on_the_keys_both_vary(tmp_path):
  """POUTA less DRAEM per (category, seed), against numpy: a key one model alone varies (POUTA's
  steps in an equal-time question, DRAEM's scorings) pairs every value with each of the other's;
  once both vary it, only equal values pair. The table groups the pairs by dataset."""
  pairs = [("weave", 0), ("weave", 1), ("lens", 0), ("lens", 1)]
  rng = np.random.default_rng(0)
  value = {}
  for setting in (
    ("pouta", 300, 1.0),
    ("pouta", 420, 1.0),
    ("draem", 300, 0.0),
    ("draem", 300, 1.0),
  ):
    for category, seed in pairs:
      value[setting, category, seed] = rng.uniform(0.2, 0.9, 2)
      _fake_model_run(tmp_path, *setting, seed, category, *value[setting, category, seed])
  keys = ["model.name", "train.num_steps", "eval.error_weight"]
  roots = [tmp_path]

  def compared(metric: str) -> dict:
    gaps = sweep.model_gaps(roots, keys, metric, "test", "pouta", "draem")
    return {(ours[1:], theirs[1:]): d for ours, theirs, d in gaps}

  found = compared("aupro")
  assert set(found) == {((s, "1.0"), ("300", w)) for s in ("300", "420") for w in ("0.0", "1.0")}
  for (ours, theirs), d in found.items():
    mine, peer = ("pouta", int(ours[0]), 1.0), ("draem", 300, float(theirs[1]))
    assert d == pytest.approx(
      {(c, s): 100 * (value[mine, c, s][1] - value[peer, c, s][1]) for c, s in pairs}
    )
  for category, seed in pairs:  # now DRAEM varies the steps too
    _fake_model_run(tmp_path, "draem", 420, 1.0, seed, category, 0.5, 0.5)
  assert set(compared("pixel_ap")) == {
    (("300", "1.0"), ("300", "0.0")),
    (("300", "1.0"), ("300", "1.0")),
    (("420", "1.0"), ("420", "1.0")),
  }
  table = sweep.gaps_table(
    roots,
    keys,
    ("pixel_ap", "aupro"),
    {"embedded": ("weave",), "real": ("lens",)},
    "pouta",
    "draem",
  )
  d = [100 * (value[("pouta", 420, 1.0), "weave", s][0] - 0.5) for s in (0, 1)]
  row = (
    "| train.num_steps=420, eval.error_weight=1.0 | train.num_steps=420, eval.error_weight=1.0 "
    f"| embedded | {np.mean(d):+.1f} ± {np.std(d, ddof=1) / np.sqrt(2):.1f} (n=2) |"
  )
  assert row in table
  assert table.count("| real |") == 3 and table.count("| embedded |") == 3
  assert sweep.gaps_table(roots, keys, ("pixel_ap",), {"all": ("weave",)}, "pouta", "prn") == ""


def test_each_setting_is_measured_against_its_own_default_among_several(tmp_path):
  """Defaults of several settings (a question scoring another's runs anew: each few-shot size
  its own default): a setting pairs with the default of its values of the keys they vary."""
  for i, (category, seed) in enumerate([("weave", 0), ("weave", 1), ("pill", 0)]):
    for compare, base in (("both", 0.3), ("encoder", 0.6)):
      _fake_run(tmp_path / "default", f"{compare}{seed}", compare, seed, category, 0.0, val=base)
      _fake_run(
        tmp_path / "anew", f"{compare}{seed}", compare, seed, category, 0.0, val=base + i / 100
      )
  keys = ["model.name", "model.compare"]
  found = sweep.paired_differences([tmp_path / "anew"], [tmp_path / "default"], keys, "pixel_ap")
  for compare in ("both", "encoder"):  # not 30 points apart: paired with its own default
    mean, error, n = found[('"pouta"', f'"{compare}"')]
    assert (mean, n) == (pytest.approx(1.0), 3) and error == pytest.approx(
      np.std([0, 1, 2], ddof=1) / np.sqrt(3)
    )


def test_a_requirement_limits_the_choice_and_displaces_a_default_that_misses_it(tmp_path):
  """With `allowed` (the settings meeting a cost target, say), the choice is among those only;
  a default outside them gives way to the best inside unless that is worse by more than 2
  standard errors of the paired differences, which is then said."""
  gains = {
    "encoder": [0.05, 0.04, 0.06, 0.05],  # +5.0 ± 0.4: beyond 2 s.e.
    "decoder": [0.20, -0.10, 0.25, -0.05],  # +7.5 ± 8.8: within
    "cosine": [-0.20, -0.25, -0.30, -0.20],  # -23.8 ± 2.4: worse beyond
  }
  for i, (category, seed) in enumerate([("weave", 0), ("weave", 1), ("pill", 0), ("pill", 1)]):
    base = 0.3 + 0.1 * i
    _fake_run(tmp_path / "default", f"s{seed}", "both", seed, category, 0.0, val=base)
    for name, gain in gains.items():
      _fake_run(tmp_path / name, f"s{seed}", name, seed, category, 0.0, val=base + gain[i])
  keys = ["model.name", "model.compare"]
  roots = [tmp_path / name for name in gains]
  found = sweep.paired_differences(roots, [tmp_path / "default"], keys, "pixel_ap")
  _, ranked = sweep.aggregate([tmp_path / "default", *roots], keys, "pixel_ap", "validation")
  need = "within 0.25x"

  def chosen(*settings: str) -> str:
    allowed = {('"pouta"', f'"{name}"') for name in settings}
    return sweep.choice(keys, ranked, found, "pixel_ap", allowed, need)

  assert chosen("decoder") == (  # the default is over: the best within replaces it
    'Chosen by validation pixel_ap: **model.name="pouta", model.compare="decoder"**, the best '
    "mean of the settings within 0.25x (+7.5 ± 8.8 points against the default over 4 pairs, "
    "within 2 standard errors; the default is not within 0.25x)."
  )
  assert chosen("cosine") == (
    "Chosen by validation pixel_ap: **the default** of pouta, which is not within 0.25x: the "
    'best that is, model.name="pouta", model.compare="cosine", is -23.8 ± 2.4 points against '
    "the default over 4 pairs, worse by more than 2 standard errors."
  )
  assert chosen("both", "decoder").startswith(  # the default allowed: the usual rule
    "Chosen by validation pixel_ap: **the default** of pouta: the best mean within 0.25x, "
    'model.name="pouta", model.compare="decoder", is +7.5'
  )
  assert chosen("both", "encoder", "cosine") == (
    'Chosen by validation pixel_ap: **model.name="pouta", model.compare="encoder"** (+5.0 ± 0.4 '
    "points against the default over 4 pairs)."
  )
  assert chosen() == "No setting of pouta is within 0.25x."
  assert sweep.choice(keys, ranked, found, "pixel_ap").startswith(  # no requirement: the best
    'Chosen by validation pixel_ap: **the default** of pouta: the best mean, model.name="pouta", '
    'model.compare="decoder"'
  )
