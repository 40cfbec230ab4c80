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


def _one_error_line(err: str, match: str) -> None:
  lines = [l for l in err.strip().splitlines() if l.strip()]
  assert lines and lines[-1].startswith('error: ') and match in lines[-1], err[-2000:]
  assert 'Traceback' not in err, err[-2000:]


def test_tools_give_one_error_line_for_the_probes_bad_inputs(tmp_path, capsys):
  """docs/faults.md §4, the 2026-12-01 probe: parity on a file that is not a fixture .npz
  (before: numpy's hint to allow pickles, as a traceback), convert --output under a regular file
  (before: a traceback after the conversion), label_stats with an unknown split (before: a
  traceback)."""
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from conftest import ROOT, launch_env  # pylint: disable=g-import-not-at-top
  from mtl_jax import ConfigError  # pylint: disable=g-import-not-at-top
  from mtl_jax.tools import convert  # pylint: disable=g-import-not-at-top
  (tmp_path / 'bad.npz').write_text('garbage')
  assert parity.main([str(tmp_path / 'bad.npz')]) == 1
  _one_error_line(capsys.readouterr().err, 'is not a fixture .npz')

  (tmp_path / 'file').write_text('x')
  with pytest.raises(ConfigError, match='is a file; choose another directory'):
    convert.run('mtlora', str(tmp_path / 'missing.pth'), str(tmp_path / 'file' / 'out'),
                demo.get_config('smoke'))
  assert (tmp_path / 'file').read_text() == 'x'
  # A Swin format with a ViT config (before: KeyError 'depths').
  from test_convert import save_pth  # pylint: disable=g-import-not-at-top
  save_pth(tmp_path / 'w.pth', {'model': {'backbone.x': np.zeros((2, 3), np.float32)}})
  for fmt in ('mtlora', 'swin_imagenet'):
    with pytest.raises(ConfigError):
      convert.run(fmt, str(tmp_path / 'w.pth'), str(tmp_path / 'out'), demo.get_config('smoke'))
  assert not (tmp_path / 'out').exists()

  done = subprocess.run([sys.executable, '-m', 'mtl_jax.tools.label_stats',
                         f'--config={ROOT}/configs/demo.py:smoke', '--split=unknown'],
                        capture_output=True, text=True, cwd=tmp_path,
                        env=dict(launch_env(), PYTHONPATH=ROOT))
  assert done.returncode == 1
  _one_error_line(done.stderr, "unknown split 'unknown'")
