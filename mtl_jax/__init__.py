"""mtl_jax: multi-task dense prediction with low-rank adaptation (MLoRE, MTLoRA) in JAX."""


class ConfigError(ValueError):
  """Bad user input (config value, dataset, path).

  Raised before anything is written to the workdir; launch.py prints the one-line message (which
  names the fix) and exits with status 1.
  """
