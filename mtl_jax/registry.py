"""`Registry`: named classes selected by a config value (methods, evaluators)."""

from mtl_jax import ConfigError


class Registry:
  """{name: class} filled by the `register(name)` class decorator; `get` names the config key
  and the known names when a name is unknown."""

  def __init__(self, config_key: str):
    self.config_key = config_key
    self._classes: dict[str, type] = {}

  def register(self, name: str):
    def wrap(cls):
      self._classes[name] = cls
      return cls
    return wrap

  def __contains__(self, name: str) -> bool:
    return name in self._classes

  def get(self, name: str) -> type:
    if name not in self._classes:
      raise ConfigError(f'unknown {self.config_key} {name!r}; known: {self.known()}')
    return self._classes[name]

  def known(self) -> str:
    return ', '.join(sorted(self._classes))
