"""Tests of `python -m mtl_jax.tools.predict` (predictions on a folder of images).

A 3-step smoke run of the ViT baseline on the `tiny` dataset with a 32x40 canvas (its 24x32
images are padded, so `to_original_size` crops); the images are the decoded validation examples,
written as PNG (lossless: the same pixels as the eval path reads) plus one 16x24 crop as JPEG.
"""

import os
import subprocess
import sys

import jax
import numpy as np
from PIL import Image
import pytest
import scipy.io

from configs import demo
from conftest import ROOT, launch_env, smoke_config
from mtl_jax import ConfigError
from mtl_jax import input_pipeline
from mtl_jax import sharding
from mtl_jax import tasks as tasks_lib
from mtl_jax import train
from mtl_jax.evaluators import predictions
from mtl_jax.tools import predict

ORIGINAL, CROP = (24, 32), (16, 24)
STEMS = [f'validation_{i:06d}' for i in range(4)] + ['crops/small']
PNG_MODES = {'semseg': 'P', 'human_parts': 'P', 'sal': 'L', 'normals': 'RGB', 'depth': 'RGB',
             'edge': 'L'}


@pytest.fixture(scope='module')
def run_dir(tfds_dir, tmp_path_factory):
  """WORKDIR of a 3-step smoke run (config.json + checkpoint 3)."""
  config = smoke_config(tfds_dir, total_steps=3, log_every_steps=3, eval_every_steps=3,
                        checkpoint_every_steps=3, eval_at_start=False)
  config.input.crop_size = (32, 40)  # centred padding of 8 rows and columns (patch size 8)
  workdir = tmp_path_factory.mktemp('predict_run')
  train.train_and_evaluate(config, workdir)
  return workdir


@pytest.fixture(scope='module')
def images_dir(tfds_dir, tmp_path_factory):
  """The 4 validation images as <id>.png and crops/small.jpg (16x24 of the second)."""
  directory = tmp_path_factory.mktemp('predict_images')
  source = input_pipeline.open_data_source(smoke_config(tfds_dir).dataset, 'validation')
  for i in range(len(source)):
    Image.fromarray(source[i]['image']).save(directory / f'{source[i]["id"].decode()}.png')
  (directory / 'crops').mkdir()
  Image.fromarray(source[1]['image'][:CROP[0], :CROP[1]]).save(directory / 'crops' / 'small.jpg')
  (directory / 'notes.txt').write_text('not an image')
  return directory


@pytest.mark.slow
def test_cli_writes_every_task_at_the_original_size(run_dir, images_dir, tmp_path):
  """Subprocess on 1 device, batches of 2 (the last one padded): every task's .npy and .png and
  the overview for each image, at the image's own size."""
  out = tmp_path / 'out'
  proc = subprocess.run(
      [sys.executable, '-m', 'mtl_jax.tools.predict', f'--workdir={run_dir}',
       f'--images={images_dir}', f'--output={out}', '--batch_size=2'],
      cwd=ROOT, env=launch_env(1), capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert 'predict: 5/5 images' in proc.stderr
  tasks = tasks_lib.get_tasks(demo.get_config('smoke').tasks, 'synthetic_scenes')
  assert sorted(os.listdir(out)) == sorted([*tasks, 'overview'])
  assert sorted(os.listdir(tmp_path)) == ['out'], 'no temporary folder left'
  for stem in STEMS:
    h, w = CROP if stem.startswith('crops/') else ORIGINAL
    for name, task in tasks.items():
      pred = np.load(out / name / f'{stem}.npy')
      assert pred.shape == (h, w, task.num_outputs) and pred.dtype == np.float32, (name, stem)
      with Image.open(out / name / f'{stem}.png') as png:
        assert png.size == (w, h) and png.mode == PNG_MODES[name], (name, stem, png.size)
        if name == 'depth':
          assert float(png.text['depth_max_m']) >= float(png.text['depth_min_m']) >= 0
    with Image.open(out / 'overview' / f'{stem}.png') as overview:
      assert overview.mode == 'RGB' and overview.size[1] > 128  # enlarged: x6, + titles


@pytest.mark.slow
def test_predictions_equal_the_eval_path(run_dir, images_dir, tmp_path):
  """The same example through predict and through `Trainer.eval_step` + the save_predictions
  evaluator: equal logits (to 1e-6; measured: identical) and identical saved images."""
  out = tmp_path / 'out'
  out.mkdir()
  (out / 'stale.txt').write_text('replaced')
  assert predict.run(images_dir, out, workdir=run_dir, overwrite=True) == 5
  assert not (out / 'stale.txt').exists()

  config = predict.load_config(run_dir)
  config.save_predictions = True  # every task's predictions come to the host
  trainer = train.Trainer(config, tmp_path / 'eval')
  state = trainer.init_state(run_dir)
  eval_iter, _ = input_pipeline.make_eval_iterator(trainer.config, trainer.tasks, 'validation',
                                                   source=trainer.eval_source)
  logits = {}
  for local in eval_iter:
    _, host = trainer.eval_step(state, trainer.rest, sharding.global_batch(local, trainer.mesh))
    host = jax.device_get(host)
    trainer.evaluators['save_predictions'].add(local, None, host)
    for i in np.flatnonzero(local['example_valid']):
      image_id = trainer.eval_source[int(local['index'][i])]['id'].decode()
      logits[image_id] = {name: predictions.to_original_size(
          host[name][i], tuple(local['original_size'][i]),
          trainer.config.input.augment) for name in trainer.tasks}
  assert sorted(logits) == STEMS[:4]

  saved = tmp_path / 'eval' / 'predictions'
  for image_id, want in logits.items():
    for name, task in trainer.tasks.items():
      got = np.load(out / name / f'{image_id}.npy')
      np.testing.assert_allclose(got, want[name], rtol=0, atol=1e-6, err_msg=f'{name} {image_id}')
      if name == 'depth':
        np.testing.assert_allclose(np.maximum(got[..., 0], 0),
                                   scipy.io.loadmat(saved / name / f'{image_id}.mat')['depth'],
                                   rtol=0, atol=1e-6)
        continue
      with Image.open(out / name / f'{image_id}.png') as a, \
          Image.open(saved / name / f'{image_id}.png') as b:
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=name)  # P: the ids


def test_help_and_a_bad_input_on_the_command_line(tmp_path):
  run = lambda *args: subprocess.run([sys.executable, '-m', 'mtl_jax.tools.predict', *args],
                                     cwd=ROOT, env=launch_env(1), capture_output=True, text=True,
                                     timeout=120)
  proc = run('--help')
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert 'python -m mtl_jax.tools.predict --workdir=' in proc.stdout
  assert '--images' in proc.stdout and '--batch_size' in proc.stdout
  (tmp_path / 'empty').mkdir()
  proc = run(f'--images={tmp_path / "empty"}', f'--output={tmp_path / "out"}',
             f'--workdir={tmp_path}')
  assert proc.returncode == 1
  errors = [l for l in proc.stderr.splitlines() if l.startswith('error:')]
  assert len(errors) == 1 and proc.stderr.strip().splitlines()[-1] == errors[0], proc.stderr
  assert 'no images' in errors[0] and 'Traceback' not in proc.stderr
  assert not (tmp_path / 'out').exists()


def _fake_run(directory):
  """A workdir with config.json (24x32 canvas) and no checkpoint."""
  config = demo.get_config('smoke,model=vit_baseline')
  config.input.crop_size = (24, 32)
  directory.mkdir()
  (directory / 'config.json').write_text(config.to_json_best_effort(indent=2))
  return directory


@pytest.mark.parametrize('case, fix', [
    ('no_images', 'no images .* point it at a folder of images'),
    ('unreadable', 'cannot read image .*broken.png.*remove or replace the file'),
    ('no_workdir', 'does not exist; give the workdir of a training run'),
    ('no_config', 'no config.json in --workdir=.*--config=configs/<file>.py'),
    ('no_checkpoint', 'no finished checkpoint .*--workdir'),
    ('too_large', r'larger than config.input.crop_size \(24, 32\).*--config.input.crop_size'),
    ('output_under_file', 'under the regular file .*; choose a path in a directory'),
    ('output_not_empty', 'exists and is not empty; choose a new path or pass --overwrite'),
    ('output_in_images', 'inside --images'),
    ('no_model', 'give --workdir=RUN'),
])
def test_bad_input_is_one_error_and_writes_nothing(case, fix, tmp_path):
  images = tmp_path / 'images'
  images.mkdir()
  size = (40, 48) if case == 'too_large' else ORIGINAL
  if case != 'no_images':
    Image.fromarray(np.zeros((*size, 3), np.uint8)).save(images / 'a.png')
  if case == 'unreadable':
    (images / 'broken.png').write_bytes(b'\x89PNG\r\n\x1a\n not really')
  workdir = _fake_run(tmp_path / 'run')
  if case == 'no_workdir':
    workdir = tmp_path / 'nowhere'
  if case == 'no_config':
    workdir = tmp_path / 'images'
  output = {'output_under_file': images / 'a.png' / 'out',
            'output_in_images': images / 'out'}.get(case, tmp_path / 'out')
  if case == 'output_not_empty':
    output.mkdir()
    (output / 'old.txt').write_text('keep me')
  before = sorted(os.listdir(tmp_path))
  with pytest.raises(ConfigError, match=fix):
    predict.run(images, output, workdir=None if case == 'no_model' else workdir)
  assert sorted(os.listdir(tmp_path)) == before, 'nothing written'
  if case == 'output_not_empty':
    assert os.listdir(output) == ['old.txt']
  elif case != 'output_under_file':
    assert not output.exists()
