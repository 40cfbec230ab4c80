"""NYUD-v2 multi-task (manual download): importing this package registers it with TFDS."""

from .nyud_v2_dataset_builder import Builder, NyudConfig

__all__ = ['Builder', 'NyudConfig']
