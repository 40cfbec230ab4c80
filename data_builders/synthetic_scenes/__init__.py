"""The `synthetic_scenes` demo dataset: importing this package registers it with TFDS."""

from .synthetic_scenes_dataset_builder import Builder, SyntheticScenesConfig

__all__ = ['Builder', 'SyntheticScenesConfig']
