"""Mesh construction and declarative parameter sharding rules (8 simulated devices)."""

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from mtl_jax import sharding


def test_make_mesh_fills_minus_one():
  mesh = sharding.make_mesh((('data', -1),))
  assert dict(mesh.shape) == {'data': 8}
  mesh = sharding.make_mesh((('data', 2), ('fsdp', -1)))
  assert dict(mesh.shape) == {'data': 2, 'fsdp': 4}
  mesh = sharding.make_mesh((('data', -1),), jax.devices()[:1])
  assert mesh.size == 1


@pytest.mark.parametrize('spec', [(('data', 3),), (('data', -1), ('fsdp', -1)),
                                  (('data', 3), ('fsdp', -1))])
def test_make_mesh_rejects_bad_shapes(spec):
  with pytest.raises(ValueError, match='config.mesh'):
    sharding.make_mesh(spec)


def test_rules_first_match_wins_and_fsdp_picks_largest_divisible_dim():
  mesh = sharding.make_mesh((('data', 2), ('fsdp', 4)))
  tree = {'backbone': {'blocks': {'0': {'mlp': {'kernel': np.zeros((6, 16))},
                                        'norm': {'scale': np.zeros(6)}}},
                       'pos_embed': np.zeros((1, 5, 12))},
          'head': {'kernel': np.zeros((3, 5))}}
  rules = (('pos_embed', (None, None, 'fsdp')), ('norm', 'replicate'), ('.*', 'fsdp:fsdp'))
  specs = jax.tree.map(lambda s: s.spec, sharding.tree_shardings(tree, rules, mesh))
  assert specs['backbone']['blocks']['0']['mlp']['kernel'] == P(None, 'fsdp')
  assert specs['backbone']['blocks']['0']['norm']['scale'] == P()
  assert specs['backbone']['pos_embed'] == P(None, None, 'fsdp')
  assert specs['head']['kernel'] == P()  # no dimension divisible by 4: replicated


def test_global_batch_is_split_over_every_axis():
  mesh = sharding.make_mesh((('data', 2), ('fsdp', 4)))
  local = {'image': np.arange(8 * 3, dtype=np.float32).reshape(8, 3)}
  batch = sharding.global_batch(local, mesh)
  assert batch['image'].sharding.spec == P(('data', 'fsdp'))
  assert len(batch['image'].addressable_shards) == 8
  np.testing.assert_array_equal(np.asarray(batch['image']), local['image'])


def test_path_str():
  tree = {'a': [{'b': 1}]}
  (path, _), = jax.tree_util.tree_flatten_with_path(tree)[0]
  assert sharding.path_str(path) == 'a/0/b'
