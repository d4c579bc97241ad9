"""The POUTA design study: each question is an axis of settings, trained on the embedded
categories and on a real dataset with 3 seeds, and ranked on the validation split only
(data.val_fraction: held-out normal images, and the same images with each kind of anomaly in
data.val_defects, the training synthesis's and three it never makes; no test label).

    python launch/study.py --workdir=outputs/study --real_root=../shared/data/mtoc \
        --out=docs/pouta_study.md [--only=level_weights] [--parallel=2]

runs what is missing and writes the study's tables (launch/study.py). Each question names the
config files it trains and its axes in the launchers' syntax (`sweep`: product axes, `zip`:
axes whose i-th values go together; tuple values in brackets), and may `include` other
questions' runs: the first include (a glob, or a tuple of globs) is the default each setting is
measured against (paired over category and seed; a setting replaces the default only beyond 2
standard errors). `cost_at_most` limits a question's choice to settings within that many times
DRAEM's discriminative FLOPs (the target), and a default over it gives way to the best within
it unless that is worse beyond 2 standard errors.
"""

EMBEDDED = ("weave", "granite", "washer", "pill")
# Each model's default as configs/*.py have it today (POUTA's: chosen by `compact`).
TODAY = ("defaults/*",)


def get_study() -> dict:
  return dict(
    preset="tiny",  # width 16, 64 px, 300 steps, lr 5e-4 (configs' `tiny`)
    seeds=3,
    select="pixel_ap",  # the validation metric a setting is chosen by
    report=("pixel_ap", "aupro", "image_auroc"),
    common=("--config.data.val_fraction=0.2",),
    # The defaults of configs/pouta.py before the study changed them (compact's setting): the
    # questions run before keep them; those run after (pinned=False) have today's.
    pinned={
      "configs/pouta.py": (
        "--config.model.compare=both",
        "--config.model.discriminative_fraction=0.5",
        "--config.model.fuse_kernel=3",
        "--config.model.pixel_input=False",
      ),
    },
    datasets=dict(
      embedded=dict(categories=EMBEDDED, args=()),
      # Tiny defects (often under 0.1% of the image): 128 px keeps them a few pixels wide.
      real=dict(categories=("lens",), args=("--config.data.image_size=128",)),
    ),
    questions=[
      dict(
        name="models",
        question="DRAEM and POUTA at their defaults",
        configs=("configs/draem.py", "configs/pouta.py"),
        test=True,  # also the test sets' tables: what the targets are measured on
      ),
      dict(
        name="defaults",
        question="DRAEM and POUTA at today's defaults (POUTA's chosen by the compact and error "
        "questions: it scores its map plus the reconstruction error, DRAEM its map alone; the "
        "error question compares both at each scoring): what the later questions are measured "
        "against",
        configs=("configs/draem.py", "configs/pouta.py"),
        test=True,
        pinned=False,
      ),
      dict(
        name="level_weights",
        question="(a) MSS: the focal weight of each level (finest first), or all 1 decayed "
        "linearly to 0 over training; all 0 is no deep supervision",
        configs=("configs/pouta.py",),
        zip=(
          "loss.level_weights=(0.25,0.25,0.25,0.25),(1,0.5,0.25,0.125),(1,1,1,1),(0,0,0,0)",
          "loss.level_decay=0,0,1,0",
        ),
        include=("models/*/pouta",),  # the default, (1,1,1,1)
      ),
      dict(
        name="detach",
        question="(b) the discriminative losses reaching the reconstructive network, or "
        "stopped at its features",
        configs=("configs/pouta.py",),
        sweep=("model.detach_features=True",),
        include=("models/*/pouta",),
      ),
      dict(
        name="compare",
        question="(c) what FCM compares: projections with |E-D| (both), |E-D| only "
        "(difference), projections with their cosine distance (cosine)",
        configs=("configs/pouta.py",),
        sweep=("model.compare=difference,cosine",),
        include=("models/*/pouta",),
      ),
      dict(
        name="guidance",
        question="(d) HSG's gate, plain concatenation of the coarser level, or no guidance",
        configs=("configs/pouta.py",),
        zip=("model.guidance=True,False", "model.guidance_gate=False,True"),
        include=("models/*/pouta",),
      ),
      dict(
        name="width",
        question="(e) the discriminative base width (tiny default: 8, half the base width)",
        configs=("configs/pouta.py",),
        sweep=("model.discriminative_width=4,16",),
        include=("models/*/pouta",),
      ),
      dict(
        name="cost",
        question="a discriminative part within 0.25x the FLOPs of DRAEM's (the default has "
        "0.66x, most of it the finest level's 3x3 convolutions): FCM's fuse per pixel (1x1) with "
        "the unit width 6 (0.25x), or with the unit width 4 and level multipliers 1, 2, 2, 4 "
        "(0.20x; the default's are 1, 1, 2, 4)",
        configs=("configs/pouta.py",),
        zip=(
          "model.fuse_kernel=1,1",
          "model.discriminative_width=6,4",
          "model.level_multipliers=(1,1,2,4),(1,2,2,4)",
        ),
        include=("models/*/pouta", "width/*/pouta/model.discriminative_width=4,*"),
        cost_at_most=0.25,
      ),
      dict(
        name="pixels",
        question="(f) the finest level also given the image, its reconstruction and their "
        "difference",
        configs=("configs/pouta.py",),
        sweep=("model.pixel_input=True",),
        include=("models/*/pouta",),
      ),
      dict(
        name="compact",
        question="the cost question's per-pixel fuse at unit width 6 with what helped alone: "
        "|E-D| only (compare: 0.23x DRAEM's discriminative FLOPs here), and with the pixels at "
        "the finest level too (pixels: 0.24x; 0.21x at full size); the cost question's setting "
        "(0.25x) beside them",
        configs=("configs/pouta.py",),
        zip=(
          "model.fuse_kernel=1,1",
          "model.discriminative_width=6,6",
          "model.compare=difference,difference",
          "model.pixel_input=False,True",
        ),
        include=(
          "models/*/pouta",
          "cost/*/pouta/model.fuse_kernel=1,model.discriminative_width=6,*",
        ),
        cost_at_most=0.25,
        test=True,
      ),
      dict(
        name="lr",
        question="(g) the learning rate at this short schedule (tiny default: 5e-4)",
        configs=("configs/draem.py", "configs/pouta.py"),
        sweep=("optim.lr=2e-4,1e-3",),
        include=(TODAY,),
        pinned=False,
      ),
      dict(
        name="synthesis",
        question="(g) synthesis: anomaly opacity (beta_max, default 0.8) and Perlin mask "
        "scales (perlin_max_scale_log2, default 5: larger draws smaller blobs)",
        configs=("configs/draem.py", "configs/pouta.py"),
        zip=("data.beta_max=0.5,0.8", "data.perlin_max_scale_log2=5,6"),
        include=(TODAY,),
        pinned=False,
      ),
      dict(
        name="few_shot",
        question="few-shot: 8 and 16 normal training images (drawn by the seed from those the "
        "validation split leaves)",
        configs=("configs/draem.py", "configs/pouta.py"),
        sweep=("data.few_shot=8,16",),
        test=True,
        pinned=False,
      ),
      dict(
        name="few_shot_one_scoring",
        question="DRAEM's few-shot runs scored as POUTA (its map plus the reconstruction "
        "error): the few-shot targets at one scoring",
        configs=("configs/draem.py",),
        sweep=("data.few_shot=8,16", "eval.error_weight=1"),
        include=("few_shot/*",),  # copies of its runs' checkpoints
        test=True,
        pinned=False,
      ),
      dict(
        name="equal_time",
        question="POUTA given DRAEM's training time: 420 steps against DRAEM's 300 (tiny POUTA "
        "as chosen trained at 2.57 steps/s, DRAEM at 1.83: medians of the compact and models "
        "questions' embedded runs' steps_per_second, 2 runs at a time on 2 cores)",
        configs=("configs/pouta.py",),
        sweep=("train.num_steps=420",),
        include=(TODAY,),
        test=True,
        pinned=False,
      ),
      dict(
        name="equal_time_one_scoring",
        question="equal time at one scoring: DRAEM's 300 steps scored as POUTA (its map plus "
        "the reconstruction error) against POUTA's 420",
        configs=("configs/draem.py",),
        zip=("train.num_steps=300", "eval.error_weight=1"),  # copies of the defaults runs
        include=(("equal_time/*", "defaults/*/draem"),),
        test=True,
        pinned=False,
      ),
      dict(
        name="error",
        question="the reconstruction error in the score: the map plus W times mean |x - "
        "reconstruction| (eval.error_weight; that error alone beats both maps on granite's "
        "test set, README)",
        configs=("configs/draem.py", "configs/pouta.py"),
        sweep=("eval.error_weight=0,0.5,1,2",),
        # Measured against the maps alone (W=0), each model's default before this question;
        # every run scores a copy of the defaults question's checkpoints (launch/study.py).
        include=("error/*/*/eval.error_weight=0,*",),
        test=True,
        pinned=False,
      ),
      dict(
        name="fusion",
        question="POUTA's map as the mean of its final map and its four level maps "
        "(eval.fuse_levels, as HED fuses side outputs), plus the reconstruction error as "
        "today: the level maps hold evidence the finer levels lose on granite (README)",
        configs=("configs/pouta.py",),
        sweep=("eval.fuse_levels=True",),
        include=(TODAY,),
        test=True,
        pinned=False,
      ),
      dict(
        name="steps",
        question="(g) twice the steps (600)",
        configs=("configs/draem.py", "configs/pouta.py"),
        sweep=("train.num_steps=600",),
        include=(TODAY,),
        test=True,
        pinned=False,
      ),
      dict(
        name="steps_one_scoring",
        question="DRAEM at 600 steps scored as POUTA (its map plus the reconstruction error): "
        "the targets at one scoring after twice the steps",
        configs=("configs/draem.py",),
        zip=("train.num_steps=600", "eval.error_weight=1"),
        include=("steps/*",),
        test=True,
        pinned=False,
      ),
    ],
  )
