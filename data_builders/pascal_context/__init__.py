"""PASCAL-Context multi-task (manual download): importing this package registers it with TFDS."""

from .pascal_context_dataset_builder import Builder

__all__ = ['Builder']
