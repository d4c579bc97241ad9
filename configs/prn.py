"""PRN (prototypical residual networks): a frozen pretrained ResNet, multi-scale prototypes of
the normal training features, and a network that segments from features and residuals; trained
on DRAEM's synthetic anomalies plus a few real ones ("seen") taken out of the test set.

    --config=configs/prn.py:<category>[,tiny] --config.backbone.weights=resnet18.npz
    Weights: python -m pouta_jax.convert --from=torchvision_resnet --weights=resnet18.pth \\
                 --backbone=resnet18 --out=resnet18.npz
    Without weights (a random backbone, e.g. the demo): --config.backbone.pretrained=False
Defaults follow the one public reimplementation (third_party/ALGORITHMS.md): ResNet18, K = 10%
of the training images, Smooth-L1 + 5 x focal (alpha 0.5, gamma 4), Adam 1e-4 with weight decay
1e-2, batch 48, 700 epochs, 256 px, 10 real anomalies per category.
"""

from pouta_jax import config as base


def get_config(arg: str | None = None):
  config = base.base_config("prn")
  config.model.base_width = 64  # channels of the finest scale after the backbone (x2 per scale)
  config.model.num_prototypes = 0  # K; 0: prototype_fraction of the training images
  config.model.prototype_fraction = 0.1
  config.backbone = dict(
    name="resnet18",  # or "wide_resnet50_2"
    weights="",  # an .npz from pouta_jax.convert; required unless pretrained is False
    pretrained=True,
  )
  config.loss = dict(smooth_l1_weight=1.0, focal_weight=5.0, focal_alpha=0.5, focal_gamma=4.0)
  config.optim.weight_decay = 1e-2
  config.optim.milestones = ()
  config.data.batch_size = 48
  config.data.num_real_anomalies = 10
  config = base.apply_args(config, arg)
  if "tiny" in (arg or "").split(","):
    # The embedded categories have 24 defect images each: keep most of them for evaluation.
    config.data.num_real_anomalies = 4
    config.data.batch_size = 8
  return config
