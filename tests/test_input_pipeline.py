"""Tests of mtl_jax/input_pipeline.py (docs/stack.md §2-3, docs/mlore.md §5.1)."""

import grain
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest
import tensorflow_datasets as tfds

from mtl_jax import ConfigError
from mtl_jax import input_pipeline
from mtl_jax import tasks as tasks_lib
from mtl_jax import transforms

TASKS = tasks_lib.get_tasks(['semseg', 'normals', 'depth'], 'synthetic_scenes')


def make_config(**input_overrides):
  return ml_collections.ConfigDict({
      'seed': 0,
      'batch_size': 4,
      'eval_batch_size': None,
      'tasks': tuple(TASKS),
      'dataset': {'name': 'tiny_scenes', 'data_dir': None, 'train_split': 'train',
                  'eval_split': 'val', 'build_if_missing': False},
      'input': {'augment': 'mlore', 'crop_size': (32, 48), 'scale_range': (0.5, 2.0),
                'cat_max_ratio': 0.75, 'flip': True, 'photometric': True,
                'rotation_range': (-20.0, 20.0), 'scale_choices': (), 'num_workers': 0,
                **input_overrides},
  })


def make_source(n, shape=(40, 50)):
  """In-memory source; example i has semseg == i everywhere, so batches reveal which they hold."""
  source = []
  for i in range(n):
    r = np.random.default_rng(i)
    normals = r.normal(size=(*shape, 3)).astype(np.float32)
    source.append({
        'image': r.integers(0, 256, (*shape, 3), dtype=np.uint8),
        'semseg': np.full((*shape, 1), i, np.uint8),
        'normals': normals / np.linalg.norm(normals, axis=-1, keepdims=True),
        'depth': r.uniform(0.5, 10.0, (*shape, 1)).astype(np.float32),
        'id': str(i).encode(),
    })
  return source


def ids(batch):
  """The example id of each batch row (-1 for padding)."""
  return [int(s[s != 255].min()) if v else -1
          for s, v in zip(batch['semseg'], batch['example_valid'])]


def assert_batches_equal(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert sorted(x) == sorted(y)
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])


def test_train_batches_shapes_and_determinism():
  source = make_source(12)
  it = input_pipeline.make_train_iterator(make_config(), TASKS, source=source)
  batches = [next(it) for _ in range(3)]
  b = batches[0]
  assert b['image'].shape == (4, 32, 48, 3) and b['image'].dtype == np.float32
  assert b['semseg'].shape == (4, 32, 48, 1) and b['semseg'].dtype == np.uint8
  assert b['normals'].shape == (4, 32, 48, 3) and b['depth'].shape == (4, 32, 48, 1)
  assert b['example_valid'].tolist() == [True] * 4 and 'id' not in b
  again = input_pipeline.make_train_iterator(make_config(), TASKS, source=source)
  assert_batches_equal(batches, [next(again) for _ in range(3)])
  config = make_config()
  config.seed = 1
  other = input_pipeline.make_train_iterator(config, TASKS, source=source)
  assert not np.array_equal(next(other)['image'], b['image'])


def test_epochs_are_shuffled_differently_and_cover_the_data():
  it = input_pipeline.make_train_iterator(make_config(), TASKS, source=make_source(12))
  epochs = [sum((ids(next(it)) for _ in range(3)), []) for _ in range(3)]
  assert all(sorted(e) == list(range(12)) for e in epochs)
  assert epochs[0] != epochs[1] and epochs[1] != epochs[2]


def test_process_shards_are_disjoint_and_cover_everything():
  source = make_source(12)
  config = make_config()
  config.batch_size = 6
  seen = []
  for p in range(3):
    it = input_pipeline.make_train_iterator(config, TASKS, source=source, process_index=p,
                                            process_count=3)
    epoch = sum((ids(next(it)) for _ in range(2)), [])  # 4 examples per process, batches of 2
    assert len(set(epoch)) == 4
    seen.append(set(epoch))
  assert all(not (a & b) for i, a in enumerate(seen) for b in seen[i + 1:])
  assert set().union(*seen) == set(range(12))


def test_batch_size_must_divide_over_processes():
  with pytest.raises(ConfigError, match='multiple of the number of processes'):
    input_pipeline.make_train_iterator(make_config(), TASKS, source=make_source(12),
                                       process_index=0, process_count=3)


def test_iterator_state_restores_exactly():
  source = make_source(10)
  it = input_pipeline.make_train_iterator(make_config(), TASKS, source=source)
  for _ in range(4):  # crosses an epoch boundary (10 examples, batches of 4)
    next(it)
  state = it.get_state()
  expected = [next(it) for _ in range(3)]
  restored = input_pipeline.make_train_iterator(make_config(), TASKS, source=source)
  restored.set_state(state)
  assert_batches_equal(expected, [next(restored) for _ in range(3)])


def test_iterator_state_restores_through_orbax_with_a_pytree(tmp_path):
  source = make_source(10)
  handlers = {'state': ocp.StandardCheckpointHandler(),
              'data': grain.checkpoint.CheckpointHandler()}
  tree = {'w': np.arange(6.0).reshape(2, 3), 'step': np.asarray(3)}
  it = input_pipeline.make_train_iterator(make_config(), TASKS, source=source)
  for _ in range(3):
    next(it)
  with ocp.CheckpointManager(tmp_path, item_handlers=handlers) as mngr:
    mngr.save(3, args=ocp.args.Composite(state=ocp.args.StandardSave(tree),
                                         data=grain.checkpoint.CheckpointSave(it)))
  expected = [next(it) for _ in range(3)]
  restored = input_pipeline.make_train_iterator(make_config(), TASKS, source=source)
  with ocp.CheckpointManager(tmp_path, item_handlers=handlers) as mngr:
    out = mngr.restore(mngr.latest_step(), args=ocp.args.Composite(
        state=ocp.args.StandardRestore(tree), data=grain.checkpoint.CheckpointRestore(restored)))
  np.testing.assert_array_equal(out['state']['w'], tree['w'])
  assert_batches_equal(expected, [next(restored) for _ in range(3)])


@pytest.mark.slow
def test_worker_processes_give_the_same_batches_and_restore():
  source = make_source(10)
  in_process = input_pipeline.make_train_iterator(make_config(), TASKS, source=source)
  expected = [next(in_process) for _ in range(4)]
  it = input_pipeline.make_train_iterator(make_config(num_workers=2), TASKS, source=source)
  got = [next(it) for _ in range(2)]
  state = it.get_state()
  assert_batches_equal(expected[:2], got)
  restored = input_pipeline.make_train_iterator(make_config(num_workers=2), TASKS, source=source)
  restored.set_state(state)
  assert_batches_equal(expected[2:], [next(restored) for _ in range(2)])


@pytest.mark.parametrize('process_count', [1, 2, 4])
def test_eval_covers_every_example_once_with_flagged_padding(process_count):
  source = make_source(11)
  config = make_config(crop_size=(48, 56))
  config.eval_batch_size = 4
  seen, counts = [], []
  for p in range(process_count):
    batches, num_batches = input_pipeline.make_eval_iterator(
        config, TASKS, 'val', source=source, process_index=p, process_count=process_count)
    assert num_batches == len(batches) == 3  # ceil(11 / 4)
    first = list(batches)
    assert_batches_equal(first, list(batches))  # re-iterable, same order
    counts.append(len(first))
    for b in first:
      assert b['image'].shape == (4 // process_count, 48, 56, 3)
      seen += ids(b)
      pad = ~b['example_valid']
      assert np.all(b['semseg'][pad] == 255) and np.all(b['normals'][pad] == 255)
      assert np.all(b['depth'][pad] == 0)
  assert counts == [3] * process_count
  assert sorted(i for i in seen if i >= 0) == list(range(11))
  assert seen.count(-1) == 12 - 11


def test_eval_batch_size_defaults_to_batch_size_and_transform_is_deterministic():
  source = make_source(5, shape=(30, 41))
  batches, n = input_pipeline.make_eval_iterator(make_config(), TASKS, 'val', source=source)
  assert n == 2
  first = next(iter(batches))
  assert ids(first) == [0, 1, 2, 3]
  # 30x41 centred in 32x48: rows 1..30, columns 3..43.
  np.testing.assert_array_equal(first['semseg'][1, 1:31, 3:44], source[1]['semseg'])
  assert np.all(first['semseg'][:, 0] == 255) and np.all(first['semseg'][:, :, :3] == 255)


def test_unknown_augment_is_a_config_error():
  config = make_config(augment='invpt')
  with pytest.raises(ConfigError, match=r"config.input.augment 'invpt'.*mlore, mtlora"):
    input_pipeline.make_train_iterator(config, TASKS, source=make_source(4))
  with pytest.raises(ConfigError, match='config.input.augment'):
    input_pipeline.make_eval_iterator(config, TASKS, 'val', source=make_source(4))


def test_mtlora_train_batches_are_deterministic_and_restore_exactly():
  config = make_config(augment='mtlora', scale_range=(0.75, 1.25))
  source = make_source(10)
  it = input_pipeline.make_train_iterator(config, TASKS, source=source)
  batches = [next(it) for _ in range(3)]  # crosses an epoch boundary (10 examples, batches of 4)
  b = batches[0]
  assert b['image'].shape == (4, 32, 48, 3) and b['semseg'].shape == (4, 32, 48, 1)
  assert b['normals'].shape == (4, 32, 48, 3) and b['depth'].shape == (4, 32, 48, 1)
  assert b['example_valid'].tolist() == [True] * 4
  for semseg in b['semseg']:  # example i's label i, plus 0 (background) from rotation borders
    assert len(set(np.unique(semseg)) - {0}) <= 1 and 255 not in semseg
  state = it.get_state()
  expected = [next(it) for _ in range(3)]
  again = input_pipeline.make_train_iterator(config, TASKS, source=source)
  assert_batches_equal(batches + expected, [next(again) for _ in range(6)])
  restored = input_pipeline.make_train_iterator(config, TASKS, source=source)
  restored.set_state(state)
  assert_batches_equal(expected, [next(restored) for _ in range(3)])
  mlore = input_pipeline.make_train_iterator(make_config(), TASKS, source=source)
  assert not np.array_equal(next(mlore)['image'], b['image'])


def test_mtlora_eval_resizes_every_example_once():
  source = make_source(5, shape=(30, 41))
  config = make_config(augment='mtlora')
  batches, n = input_pipeline.make_eval_iterator(config, TASKS, 'val', source=source)
  assert n == 2
  first, second = list(batches)
  assert ids(first) == [0, 1, 2, 3] and ids(second) == [4, -1, -1, -1]
  assert first['image'].shape == (4, 32, 48, 3)
  np.testing.assert_array_equal(first['semseg'][1], np.full((32, 48, 1), 1))  # resized, not padded
  expected = transforms.MTLoRAEvalTransform(TASKS, (32, 48)).map(source[2])
  for key in ('image', 'normals', 'depth'):
    np.testing.assert_array_equal(first[key][2], expected[key])
  assert np.all(second['semseg'][1:] == 255) and np.all(second['depth'][1:] == 0)


class TinyScenes(tfds.core.GeneratorBasedBuilder):
  """A 3 + 2 example TFDS builder (registered as 'tiny_scenes') for open_data_source."""
  VERSION = tfds.core.Version('1.0.0')

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        'image': tfds.features.Tensor(shape=(None, None, 3), dtype=np.uint8, encoding='zlib'),
        'semseg': tfds.features.Tensor(shape=(None, None, 1), dtype=np.uint8, encoding='zlib'),
        'id': tfds.features.Text()}))

  def _split_generators(self, dl_manager):
    return {'train': self._generate_examples(3), 'val': self._generate_examples(2)}

  def _generate_examples(self, n):
    for i in range(n):
      yield i, {'image': np.full((5, 7, 3), i, np.uint8), 'semseg': np.full((5, 7, 1), i, np.uint8),
                'id': str(i)}


def test_open_data_source_errors_and_build_if_missing(tmp_path):
  config = make_config().dataset
  for data_dir in (tmp_path, tmp_path / 'missing'):
    config.data_dir = str(data_dir)
    with pytest.raises(input_pipeline.DatasetNotBuiltError) as e:
      input_pipeline.open_data_source(config, 'train')
    msg = str(e.value)
    assert '\n' not in msg and "'tiny_scenes'" in msg and 'build_if_missing=True' in msg
    assert (f'python -m data_builders.build data_builders/tiny_scenes --data_dir={data_dir} '
            '--file_format=array_record') in msg
  config.build_if_missing = True
  source = input_pipeline.open_data_source(config, 'train')
  assert len(source) == 3 and source[2]['semseg'].shape == (5, 7, 1)
  config.build_if_missing = False
  assert len(input_pipeline.open_data_source(config, 'val')) == 2
  with pytest.raises(ConfigError, match='available splits: train, val'):
    input_pipeline.open_data_source(config, 'test')
  config.name = 'tiny_scenes/nope'
  with pytest.raises(ConfigError, match='BuilderConfig nope not found'):
    input_pipeline.open_data_source(config, 'train')


class TinyManualScenes(TinyScenes):
  """Like TinyScenes, with a builder config and built from a manually downloaded archive."""
  BUILDER_CONFIGS = [tfds.core.BuilderConfig(name='small')]
  MANUAL_DOWNLOAD_INSTRUCTIONS = 'Place tiny.tar.gz in manual_dir.'


def test_not_built_error_names_manual_dir_and_builder_config(tmp_path):
  config = make_config().dataset
  config.update(name='tiny_manual_scenes/small:1.0.0', data_dir=str(tmp_path))
  with pytest.raises(input_pipeline.DatasetNotBuiltError) as e:
    input_pipeline.open_data_source(config, 'train')
  msg = str(e.value)
  assert (f'python -m data_builders.build data_builders/tiny_manual_scenes --config=small '
          f'--data_dir={tmp_path} --file_format=array_record --manual_dir=') in msg
  assert 'build_if_missing' not in msg
