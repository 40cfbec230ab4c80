"""The generic tools: parameter counts (mtl_jax.tools.params) and the parity fixture plumbing."""

import pytest

from configs import demo
from mtl_jax.tools import params
from mtl_jax.tools import parity


@pytest.mark.parametrize('model, expected', [('mlore', 789_195), ('vit_baseline', 282_323)])
def test_params_counts_follow_config_frozen(model, expected):
  c = demo.get_config(f'model={model}')
  groups = params.count(c)
  total = groups['<all>']['total']
  assert total == groups['<all>']['trainable'] == expected  # configs/demo.py docstring
  assert total == sum(groups[k]['total'] for k in ('backbone', 'decoder', 'heads'))
  c.frozen = ('^backbone/',)
  groups = params.count(c)
  assert groups['<all>']['trainable'] == total - groups['backbone']['total']
  assert groups['backbone']['trainable'] == 0 and groups['heads']['trainable'] > 0


def test_parity_family_detection():
  assert parity.family_of({'module': 'MLoRE'}) == 'mlore'
  assert parity.family_of({'module': 'MLoRE_vitB'}) == 'mlore'
  assert parity.family_of({'kind': 'swin'}) == 'mtlora'
  with pytest.raises(ValueError, match='model family'):
    parity.family_of({'kind': 'resnet'})


def test_compare_reports_relative_error():
  import numpy as np  # pylint: disable=g-import-not-at-top
  rows = parity.compare({'a': np.array([1.0, 2.0]), 'b': np.zeros(2)},
                        {'a': np.array([1.0, 4.0])})
  assert rows == [('a', 2.0, 0.5)]
