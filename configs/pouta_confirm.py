"""A check of the design study's outcome on data nothing was chosen on: an independent draw of
the embedded dataset (data.embedded_seed=2: new images of the same categories and defect kinds;
draw 0 is the study's, draw 1 chose the tiny schedule, README), trained anew with the same
preset, seeds and validation split as configs/pouta_study.py.

    python launch/study.py --study=configs/pouta_confirm.py --workdir=outputs/confirm \
        --out=docs/pouta_confirm.md [--parallel=2]

What it checks, written before its runs (2026-12-02):
- the targets at one scoring: on these test sets, POUTA at today's defaults at least DRAEM's
  pixel AP and AUPRO, both scoring their map plus the reconstruction error (eval.error_weight=1,
  the study's choice for both; DRAEM's config keeps its paper's map alone, `defaults`);
- fusing POUTA's levels (`fusion`): on draw 0 its validation pixel AP pooled over the
  kinds of anomaly was level with the final map's (-0.2 +- 0.4) and the mean over kinds higher
  (+2.2 +- 0.8). Whether the two rankings split again here, and which one these test sets
  follow, says which ranking the next study should fix in advance.
"""

from pathlib import Path

from pouta_jax import config as config_lib

# The design study's settings, read from its file beside this one.
STUDY = Path(__file__).with_name("pouta_study.py")


def get_study() -> dict:
  study = config_lib.load_study(STUDY)
  questions = {q["name"]: q for q in study["questions"]}
  return dict(
    preset=study["preset"],
    seeds=study["seeds"],
    select=study["select"],
    report=study["report"],
    common=study["common"],
    datasets=dict(
      embedded=dict(
        categories=study["datasets"]["embedded"]["categories"],
        args=("--config.data.embedded_seed=2",),
      )
    ),
    questions=[
      questions["defaults"],
      dict(
        name="one_scoring",
        question="DRAEM scored as POUTA: its map plus the reconstruction error "
        "(eval.error_weight=1)",
        configs=("configs/draem.py",),
        sweep=("eval.error_weight=1",),
        include=("defaults/*",),
        test=True,
        pinned=False,
      ),
      questions["fusion"],
    ],
  )
