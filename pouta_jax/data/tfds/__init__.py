"""TFDS builders that build and read without TensorFlow (array_record files, images stored as
encoded bytes and decoded by Pillow in grain workers).

Importing this package registers `mvtec_ad`, `anomaly_folder`, `visa` and `dtd_textures` with
tensorflow-datasets (`dtd_textures`, not `dtd`: TFDS's own `dtd` downloads, ours reads a copy).
"""

from pouta_jax.data.tfds.builders import AnomalyConfig, AnomalyFolder, DtdTextures, MvtecAd, Visa

__all__ = ["AnomalyConfig", "AnomalyFolder", "DtdTextures", "MvtecAd", "Visa"]
