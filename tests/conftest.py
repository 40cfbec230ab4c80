"""Test session setup: 8 simulated CPU devices (sharding tests), repo root importable."""

import os
import sys

# Must happen before jax is imported anywhere in the test session.
os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8')
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

from absl import flags  # pylint: disable=g-import-not-at-top

# grain reads absl flags; outside absl.app.run they must be marked parsed (specs/stack.md §3).
if not flags.FLAGS.is_parsed():
  flags.FLAGS.mark_as_parsed()

FIXTURES = os.path.join(ROOT, 'tests', 'fixtures')
