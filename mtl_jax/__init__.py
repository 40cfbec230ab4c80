"""mtl_jax: multi-task dense prediction with low-rank adaptation (MLoRE, MTLoRA) in JAX."""


class ConfigError(ValueError):
  """Bad user input (config value, dataset, path).

  Raised before anything is written to the workdir; launch.py prints the one-line message (which
  names the fix) and exits with status 1.
  """


class RunStopped(RuntimeError):
  """A training run that stopped before its last step, with every good checkpoint kept.

  launch.py prints the one-line message and exits with `exit_code`: 1 for a non-finite step
  under ``config.nonfinite='stop'`` (or too many skipped ones), 128 + the signal number (143 for
  SIGTERM, 130 for SIGINT) after a preemption checkpoint (docs/faults.md).
  """

  def __init__(self, message: str, exit_code: int = 1):
    super().__init__(message)
    self.exit_code = exit_code
