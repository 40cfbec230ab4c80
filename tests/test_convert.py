"""Checkpoint reading without torch (mtl_jax/convert/torch_pickle.py) and conversion (the
mtl_jax/convert package and its CLI, mtl_jax/tools/convert.py).

`.pth` files are written by `save_pth` below, a minimal `torch.save` (zip archive + protocol-2
pickle calling `torch._utils._rebuild_tensor_v2` on `torch.<T>Storage` persistent ids). It was
checked once against torch 2.13.0: `torch.load(weights_only=True)` reads its files bit-exactly
(every dtype here, views, offsets) and our reader reads torch's own files bit-exactly.
"""

import collections
import dataclasses
import io
import json
import math
import os
import pickle
import subprocess
import sys
import zipfile

import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy

from conftest import FIXTURES, ROOT, smoke_config
from configs import common
from mtl_jax import ConfigError
from mtl_jax import checkpoint
from mtl_jax import convert
from mtl_jax.convert import keys
from mtl_jax.convert import torch_pickle
from mtl_jax.convert import vit as vit_convert
from mtl_jax.tools import convert as convert_cli

# -- a minimal torch.save -----------------------------------------------------------------------

_STORAGE_NAMES = {
    np.dtype(np.float32): 'FloatStorage', np.dtype(np.float64): 'DoubleStorage',
    np.dtype(np.float16): 'HalfStorage', np.dtype(ml_dtypes.bfloat16): 'BFloat16Storage',
    np.dtype(np.int64): 'LongStorage', np.dtype(np.int32): 'IntStorage',
    np.dtype(np.uint8): 'ByteStorage', np.dtype(np.bool_): 'BoolStorage'}


@dataclasses.dataclass(frozen=True)
class View:
  """A tensor viewing the 1-D `storage` at `offset` with `shape` / `stride` (in elements)."""
  storage: np.ndarray
  offset: int
  shape: tuple
  stride: tuple

  def numpy(self) -> np.ndarray:
    return np.lib.stride_tricks.as_strided(self.storage[self.offset:], self.shape,
                                           [s * self.storage.itemsize for s in self.stride])


@dataclasses.dataclass(frozen=True)
class Parameter:
  """An nn.Parameter (pickled through `_rebuild_parameter`)."""
  data: np.ndarray


class _Global:
  """A global written by name, without importing it (torch is not installed)."""

  def __init__(self, module, name):
    self.module, self.name = module, name

  def __call__(self):  # the pickler requires reduce functions to be callable
    raise NotImplementedError


@dataclasses.dataclass
class _Storage:
  key: str
  array: np.ndarray


class _TorchPickler(pickle._Pickler):  # pylint: disable=protected-access  (pure-Python pickler)
  dispatch = dict(pickle._Pickler.dispatch)  # pylint: disable=protected-access

  def __init__(self, file):
    super().__init__(file, protocol=2)
    self.storages = {}

  def _save_global(self, obj):
    self.write(pickle.GLOBAL + f'{obj.module}\n{obj.name}\n'.encode())
  dispatch[_Global] = _save_global

  def persistent_id(self, obj):
    if isinstance(obj, _Storage):
      name = _STORAGE_NAMES[obj.array.dtype]
      return ('storage', _Global('torch', name), obj.key, 'cpu', obj.array.size)
    return None

  def reducer_override(self, obj):
    if isinstance(obj, Parameter):
      return (_Global('torch._utils', '_rebuild_parameter'),
              (obj.data, True, collections.OrderedDict()))
    if isinstance(obj, np.ndarray):
      obj = View(np.ascontiguousarray(obj).reshape(-1), 0, obj.shape,
                 tuple(int(np.prod(obj.shape[i + 1:])) for i in range(obj.ndim)))
    if isinstance(obj, View):
      if id(obj.storage) not in self.storages:  # the _Storage keeps the array (and its id) alive
        self.storages[id(obj.storage)] = _Storage(str(len(self.storages)), obj.storage)
      return (_Global('torch._utils', '_rebuild_tensor_v2'),
              (self.storages[id(obj.storage)], obj.offset, tuple(obj.shape), tuple(obj.stride),
               False, collections.OrderedDict()))
    return NotImplemented


def save_pth(path, obj, name='archive'):
  """torch.save(obj) for dicts of numpy arrays / View / Parameter (and plain Python values)."""
  buf = io.BytesIO()
  pickler = _TorchPickler(buf)
  pickler.dump(obj)
  with zipfile.ZipFile(path, 'w', zipfile.ZIP_STORED) as z:
    z.writestr(f'{name}/data.pkl', buf.getvalue())
    z.writestr(f'{name}/byteorder', 'little')
    for s in pickler.storages.values():
      z.writestr(f'{name}/data/{s.key}', s.array.tobytes())
    z.writestr(f'{name}/version', '3\n')


def _zip_with_pickle(path, payload: bytes):
  with zipfile.ZipFile(path, 'w') as z:
    z.writestr('archive/data.pkl', payload)
    z.writestr('archive/version', '3\n')


# -- torch_pickle ---------------------------------------------------------------------------------

_DTYPES = (np.float32, np.float16, ml_dtypes.bfloat16, np.float64, np.int64, np.int32, np.uint8,
           np.bool_)


def test_pth_round_trip_every_dtype_views_and_offsets(tmp_path):
  rng = np.random.default_rng(0)
  tensors = {np.dtype(dt).name: (rng.standard_normal((3, 5)) * 50).astype(dt) for dt in _DTYPES}
  base = rng.standard_normal(40).astype(np.float32)
  bf16_base = rng.standard_normal(12).astype(ml_dtypes.bfloat16)
  views = {
      'transposed_offset': View(base, 3, (4, 5), (1, 4)),  # x[3:23].view(5, 4).t()
      'strided': View(base, 1, (3, 3), (10, 2)),
      'expanded': View(base, 5, (2, 3), (0, 1)),  # shares `base` with the three above
      'bf16_view': View(bf16_base, 2, (2, 3), (1, 2)),
  }
  extras = {'scalar': np.array(7, np.int64), 'empty': np.zeros((0, 4), np.float32),
            'param': Parameter(np.arange(6, dtype=np.float32).reshape(2, 3))}
  model = collections.OrderedDict({**tensors, **views, **extras})
  save_pth(tmp_path / 'a.pth', {'model': model, 'epoch': 3, 'name': 'run', 'nested': {'x': base}},
           name='a')
  out = torch_pickle.load(tmp_path / 'a.pth')
  assert isinstance(out['model'], collections.OrderedDict) and list(out['model']) == list(model)
  assert out['epoch'] == 3 and out['name'] == 'run'
  for key, want in {**tensors, **{k: v.numpy() for k, v in views.items()},
                    'scalar': extras['scalar'], 'empty': extras['empty'],
                    'param': extras['param'].data, 'x': base}.items():
    got = out['nested']['x'] if key == 'x' else out['model'][key]
    assert got.dtype == want.dtype and got.shape == want.shape, key
    np.testing.assert_array_equal(got.view(np.uint16) if got.dtype == ml_dtypes.bfloat16
                                  else got, want.view(np.uint16) if want.dtype ==
                                  ml_dtypes.bfloat16 else want, err_msg=key)
  assert out['model']['transposed_offset'][0, 1] == base[3 + 4]  # element (0, 1) = offset + 4


class Exploit:
  """Unpickling calls os.system / open (with protocol 2, `pickle.loads` would run it)."""

  def __init__(self, func, args):
    self.func, self.args = func, args

  def __reduce__(self):
    return self.func, self.args


class EvilConfig(dict):
  """A dict subclass (like yacs' CfgNode) whose item / state setters write a file."""
  target = ''

  def __setitem__(self, key, value):
    with open(EvilConfig.target, 'w') as f:
      f.write('setitem ran')

  def __setstate__(self, state):
    with open(EvilConfig.target, 'w') as f:
      f.write('setstate ran')


def test_pickled_code_never_runs(tmp_path):
  marker = tmp_path / 'pwned'
  cfg = EvilConfig()
  dict.__setitem__(cfg, 'lr', 0.1)
  cfg.__dict__['depth'] = 12
  payload = {
      'model': {'w': np.ones(2, np.float32)},
      'system': Exploit(os.system, (f'touch {marker}',)),
      'open': Exploit(open, (str(marker), 'w')),
      'exec': Exploit(exec, (f'open({str(marker)!r}, "w")',)),
      'config': cfg,
  }
  save_pth(tmp_path / 'evil.pth', payload)
  assert b'posix\nsystem' in zipfile.ZipFile(tmp_path / 'evil.pth').read('archive/data.pkl')
  EvilConfig.target = str(marker)
  out = torch_pickle.load(tmp_path / 'evil.pth')
  assert not marker.exists()
  np.testing.assert_array_equal(out['model']['w'], np.ones(2))
  for key, qualname in (('system', 'posix.system'), ('open', 'io.open'),
                        ('exec', '__builtin__.exec')):
    assert isinstance(out[key], torch_pickle.Opaque) and out[key].qualname == qualname, key
  assert out['system'].args == (f'touch {marker}',)
  assert out['config'].qualname == f'{EvilConfig.__module__}.EvilConfig'
  assert out['config'].items == {'lr': 0.1} and out['config'].state == {'depth': 12}
  # A module that does not exist is not imported either (no ImportError, no side effect).
  raw = pickle.dumps({'m': Exploit(os.system, ('true',))}, protocol=2).replace(
      b'posix\nsystem', b'nonexistent_module_xyz\nboom')
  _zip_with_pickle(tmp_path / 'missing.pth', raw)
  assert torch_pickle.load(tmp_path / 'missing.pth')['m'].qualname == 'nonexistent_module_xyz.boom'


def test_pth_rejects_bad_files(tmp_path):
  (tmp_path / 'legacy.pth').write_bytes(pickle.dumps({'a': 1}, protocol=2))
  with pytest.raises(ValueError, match='legacy'):
    torch_pickle.load(tmp_path / 'legacy.pth')
  with zipfile.ZipFile(tmp_path / 'other.zip', 'w') as z:
    z.writestr('readme.txt', 'hi')
  with pytest.raises(ValueError, match='data.pkl'):
    torch_pickle.load(tmp_path / 'other.zip')
  base = np.arange(10, dtype=np.float32)
  save_pth(tmp_path / 'oob.pth', {'x': View(base, 8, (2, 2), (2, 1))})  # reads element 11 of 10
  with pytest.raises(pickle.UnpicklingError, match='past its storage'):
    torch_pickle.load(tmp_path / 'oob.pth')
  # A truncated download is not called a legacy file; a call chained on an inert object (a
  # getattr payload) is one ValueError, not a TypeError traceback, and runs nothing.
  good = (tmp_path / 'oob.pth').read_bytes()
  (tmp_path / 'truncated.pth').write_bytes(good[: len(good) // 2])
  with pytest.raises(ValueError, match='damaged zip archive'):
    torch_pickle.load(tmp_path / 'truncated.pth')
  (tmp_path / 'text.pth').write_text('not a checkpoint')
  with pytest.raises(ValueError, match='not a PyTorch checkpoint'):
    torch_pickle.load(tmp_path / 'text.pth')
  chain = (b'\x80\x02cbuiltins\ngetattr\nX\x03\x00\x00\x00abcX\x05\x00\x00\x00upper\x86R'
           b')R.')  # getattr('abc', 'upper')(): the inert getattr's result called
  _zip_with_pickle(tmp_path / 'chain.pth', chain)
  with pytest.raises(ValueError, match='not a plain checkpoint'):
    torch_pickle.load(tmp_path / 'chain.pth')


def test_read_state_dict_selects_and_flattens(tmp_path):
  w = np.arange(6, dtype=np.float32).reshape(2, 3)
  save_pth(tmp_path / 'c.pth', {'model': {'a': w, 'sub': {'b': w[0]}, 'cfg': 'x'},
                                'optimizer': {'state': {}}, 'epoch': 1})
  sd, info = convert.read_state_dict(str(tmp_path / 'c.pth'))
  assert sorted(sd) == ['a', 'sub.b'] and info == {'key': 'model', 'skipped_entries': 1}
  sd, info = convert.read_state_dict(str(tmp_path / 'c.pth'), 'model.sub')
  assert list(sd) == ['b']
  with pytest.raises(ConfigError, match=r"no entry 'nope'.*found: \['epoch', 'model'"):
    convert.read_state_dict(str(tmp_path / 'c.pth'), 'nope')
  bf16 = w.astype(ml_dtypes.bfloat16)
  safetensors.numpy.save_file({'a': w, 'h': bf16}, str(tmp_path / 'c.safetensors'))
  sd, _ = convert.read_state_dict(str(tmp_path / 'c.safetensors'))
  assert sd['h'].dtype == ml_dtypes.bfloat16 and np.array_equal(sd['a'], w)
  np.savez(tmp_path / 'c.npz', **{'x/y': w})
  assert list(convert.read_state_dict(str(tmp_path / 'c.npz'))[0]) == ['x/y']
  with pytest.raises(ConfigError, match='no such file'):
    convert.read_state_dict(str(tmp_path / 'none.pth'))


# -- torch bicubic --------------------------------------------------------------------------------

def torch_bicubic_reference(x: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
  """Per-pixel numpy port of torch's upsample_bicubic2d (align_corners=False), x (H, W, C)."""
  a = -0.75

  def coefficients(t):  # get_cubic_upsample_coefficients
    near = lambda s: ((a + 2) * s - (a + 3)) * s * s + 1  # cubic_convolution1
    far = lambda s: ((a * s - 5 * a) * s + 8 * a) * s - 4 * a  # cubic_convolution2
    return [far(t + 1), near(t), near(1 - t), far(2 - t)]

  def source_index(out_index, in_size, out_size):  # area_pixel_compute_source_index, float32
    f32 = np.float32
    return float(f32(in_size) / f32(out_size) * (f32(out_index) + f32(0.5)) - f32(0.5))

  h, w = x.shape[:2]
  out = np.zeros((out_h, out_w) + x.shape[2:])
  for oy in range(out_h):
    ry = source_index(oy, h, out_h)
    iy = math.floor(ry)
    wy = coefficients(ry - iy)
    for ox in range(out_w):
      rx = source_index(ox, w, out_w)
      ix = math.floor(rx)
      wx = coefficients(rx - ix)
      for i in range(4):
        for j in range(4):
          out[oy, ox] += wy[i] * wx[j] * x[min(max(iy - 1 + i, 0), h - 1),
                                           min(max(ix - 1 + j, 0), w - 1)]
  return out


def test_bicubic_matches_torch_formula():
  # Hand-computed: [0, 1] -> 4 samples at -0.25, 0.25, 0.75, 1.25 (Keys a=-0.75, clamped).
  np.testing.assert_allclose(vit_convert.bicubic_matrix(2, 4) @ [0.0, 1.0],
                             [-0.10546875, 0.2265625, 0.7734375, 1.10546875], atol=1e-12)
  np.testing.assert_array_equal(vit_convert.bicubic_matrix(5, 5), np.eye(5))
  rng = np.random.default_rng(0)
  for (g, h, w) in ((6, 8, 10), (24, 32, 32), (24, 28, 36), (6, 4, 3)):
    pos = rng.standard_normal((1, 1 + g * g, 3)).astype(np.float32)
    got = vit_convert.resize_pos_embed(pos, (h, w))
    want = torch_bicubic_reference(pos[0, 1:].reshape(g, g, 3).astype(np.float64), h, w)
    assert got.shape == (1, 1 + h * w, 3) and got.dtype == np.float32
    np.testing.assert_array_equal(got[:, 0], pos[:, 0])  # slot 0 copied
    np.testing.assert_allclose(got[0, 1:].reshape(h, w, 3), want, rtol=1e-6, atol=1e-7)


# -- timm ViT -> backbone -------------------------------------------------------------------------

def timm_vit(rng, d=32, depth=2, patch=8, grid=5, classes=10) -> dict[str, np.ndarray]:
  """A random timm ViT state dict (class token, pos_embed for a grid x grid image, head)."""
  shapes = {'cls_token': (1, 1, d), 'pos_embed': (1, 1 + grid * grid, d),
            'patch_embed.proj.weight': (d, 3, patch, patch), 'patch_embed.proj.bias': (d,)}
  for i in range(depth):
    b = f'blocks.{i}.'
    shapes.update({
        b + 'norm1.weight': (d,), b + 'norm1.bias': (d,), b + 'attn.qkv.weight': (3 * d, d),
        b + 'attn.qkv.bias': (3 * d,), b + 'attn.proj.weight': (d, d), b + 'attn.proj.bias': (d,),
        b + 'norm2.weight': (d,), b + 'norm2.bias': (d,), b + 'mlp.fc1.weight': (4 * d, d),
        b + 'mlp.fc1.bias': (4 * d,), b + 'mlp.fc2.weight': (d, 4 * d), b + 'mlp.fc2.bias': (d,)})
  shapes.update({'norm.weight': (d,), 'norm.bias': (d,), 'head.weight': (classes, d),
                 'head.bias': (classes,)})
  return {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}


def augreg_npz(sd: dict[str, np.ndarray], heads: int) -> dict[str, np.ndarray]:
  """The Google AugReg .npz layout of a timm ViT state dict (big_vision / flax names)."""
  d = sd['norm.weight'].shape[0]
  out = {'embedding/kernel': sd['patch_embed.proj.weight'].transpose(2, 3, 1, 0),
         'embedding/bias': sd['patch_embed.proj.bias'], 'cls': sd['cls_token'],
         'Transformer/posembed_input/pos_embedding': sd['pos_embed'],
         'Transformer/encoder_norm/scale': sd['norm.weight'],
         'Transformer/encoder_norm/bias': sd['norm.bias'],
         'head/kernel': sd['head.weight'].T, 'head/bias': sd['head.bias']}
  depth = len({k.split('.')[1] for k in sd if k.startswith('blocks.')})
  for i in range(depth):
    b, t = f'blocks.{i}.', f'Transformer/encoderblock_{i}/'
    mha = t + 'MultiHeadDotProductAttention_1/'
    qkv_w, qkv_b = sd[b + 'attn.qkv.weight'], sd[b + 'attn.qkv.bias']
    for j, name in enumerate(('query', 'key', 'value')):
      out[mha + name + '/kernel'] = qkv_w[j * d:(j + 1) * d].T.reshape(d, heads, d // heads)
      out[mha + name + '/bias'] = qkv_b[j * d:(j + 1) * d].reshape(heads, d // heads)
    out[mha + 'out/kernel'] = sd[b + 'attn.proj.weight'].T.reshape(heads, d // heads, d)
    out[mha + 'out/bias'] = sd[b + 'attn.proj.bias']
    for n, norm in (('0', 'norm1'), ('2', 'norm2')):
      out[f'{t}LayerNorm_{n}/scale'] = sd[b + norm + '.weight']
      out[f'{t}LayerNorm_{n}/bias'] = sd[b + norm + '.bias']
    for n in (0, 1):
      out[f'{t}MlpBlock_3/Dense_{n}/kernel'] = sd[f'{b}mlp.fc{n + 1}.weight'].T
      out[f'{t}MlpBlock_3/Dense_{n}/bias'] = sd[f'{b}mlp.fc{n + 1}.bias']
  return out


def expected_backbone(sd, grid_hw):
  """What the converted backbone must hold: timm weights, pos-embed grid resized like torch."""
  g = int(round((sd['pos_embed'].shape[1] - 1) ** 0.5))
  resized = torch_bicubic_reference(sd['pos_embed'][0, 1:].reshape(g, g, -1), *grid_hw)
  pos = np.concatenate([sd['pos_embed'][0, :1], resized.reshape(-1, resized.shape[-1])])[None]
  params = vit_convert.backbone_from_torch(dict(sd, pos_embed=pos.astype(np.float32)), prefix='')
  np.testing.assert_array_equal(params['blocks'][1]['attn']['qkv']['kernel'],
                                sd['blocks.1.attn.qkv.weight'].T)
  return params


def assert_tree_close(got, want, atol=0.0, path=''):
  assert sorted(map(str, got)) == sorted(map(str, want)), path
  want = {str(k): v for k, v in want.items()}
  for k, v in got.items():
    if isinstance(v, dict):
      assert_tree_close(v, want[str(k)], atol, f'{path}/{k}')
    else:
      np.testing.assert_allclose(np.asarray(v), want[str(k)], atol=atol, rtol=0,
                                 err_msg=f'{path}/{k}')


@pytest.mark.parametrize('kind', ['pth', 'safetensors', 'npz'])
def test_timm_vit_to_backbone(tmp_path, kind):
  config = smoke_config('unused')  # demo smoke ViT: patch 8, D 32, depth 2, 24x32 -> 3x4 grid
  sd = timm_vit(np.random.default_rng(1))
  path = str(tmp_path / f'vit.{kind}')
  if kind == 'pth':
    save_pth(path, {'state_dict': sd, 'epoch': 300})
  elif kind == 'safetensors':
    safetensors.numpy.save_file(sd, path)
  else:
    np.savez(path, **augreg_npz(sd, heads=2))
  metadata = convert_cli.run('timm_vit', path, str(tmp_path / 'out'), config)
  assert metadata['pos_embed_resized'] == '25 -> 3x4' and metadata['dropped'] == 3
  assert metadata['source_sha256'] == convert_cli.sha256(path) and metadata['format'] == 'timm_vit'
  params, batch_stats = checkpoint.load_weights(str(tmp_path / 'out'))
  assert list(params) == ['backbone'] and not batch_stats
  assert_tree_close(params['backbone'], expected_backbone(sd, (3, 4)), atol=2e-6)
  assert not [p for p in os.listdir(tmp_path) if '.tmp-' in p]


@pytest.mark.slow
def test_converted_backbone_loads_into_trainer(tfds_dir, tmp_path):
  from mtl_jax import train  # pylint: disable=g-import-not-at-top
  config = smoke_config(tfds_dir)
  sd = timm_vit(np.random.default_rng(2), grid=2)
  safetensors.numpy.save_file(sd, str(tmp_path / 'vit.safetensors'))
  convert_cli.run('timm_vit', str(tmp_path / 'vit.safetensors'), str(tmp_path / 'w'), config)
  trainer = train.Trainer(config, tmp_path / 'run')
  fresh = trainer.init_state()
  state = trainer.load_weights(fresh, str(tmp_path / 'w'))  # what --config.init_from does
  assert_tree_close(state.params['backbone'], expected_backbone(sd, (3, 4)), atol=2e-6)
  for part in ('decoder', 'heads'):  # not in the checkpoint: kept at init
    assert_tree_close(state.params[part], fresh.params[part])


def test_timm_vit_key_errors_are_one_line(tmp_path):
  config = smoke_config('unused')
  sd = timm_vit(np.random.default_rng(3))
  del sd['blocks.1.norm2.bias']
  sd['blocks.1.attn.proj.weight'] = sd['blocks.1.attn.proj.weight'][:, :5]
  sd['reg_token'] = np.zeros((1, 4, 32), np.float32)
  with pytest.raises(ConfigError) as e:
    convert.convert_state_dict(sd, 'timm_vit', config)
  message = str(e.value)
  assert '\n' not in message
  assert '1 missing (blocks.1.norm2.bias)' in message
  assert '1 unexpected (reg_token)' in message
  assert 'blocks.1.attn.proj.weight (32, 5) vs (32, 32)' in message
  deep = timm_vit(np.random.default_rng(3), depth=9)
  with pytest.raises(ConfigError, match=r'84 unexpected \(blocks\.2\.attn\.proj\.bias, .*'
                                        r'\.\.\. 80 more\)'):
    convert.convert_state_dict(deep, 'timm_vit', config)


@pytest.mark.slow
def test_cli_one_error_line_and_no_partial_output(tmp_path):
  config_arg = f'--config={os.path.join(ROOT, "configs", "demo.py")}:smoke'
  sd = timm_vit(np.random.default_rng(4))
  sd['patch_embed.proj.weight'] = sd['patch_embed.proj.weight'][:, :, :4, :4]  # patch 4 != 8
  save_pth(tmp_path / 'bad.pth', {'model': sd})
  env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=ROOT)
  cmd = [sys.executable, '-m', 'mtl_jax.tools.convert', '--format=timm_vit', config_arg,
         f'--input={tmp_path / "bad.pth"}', f'--output={tmp_path / "out"}']
  result = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, check=False)
  assert result.returncode == 1, result.stderr
  assert result.stderr.strip().count('\n') == 0, result.stderr
  assert result.stderr.startswith('error: timm ViT -> config ViT: 1 shape mismatches')
  assert 'patch_embed.proj.weight (32, 3, 4, 4) vs (32, 3, 8, 8)' in result.stderr
  assert sorted(os.listdir(tmp_path)) == ['bad.pth']  # nothing written


# -- official state-dict listings (listed from the official code into tests/fixtures) ------

def read_listing(name: str) -> dict[str, tuple[tuple[int, ...], str, str]]:
  """{key: (shape, dtype, tag)} of a `key (shape) dtype [tag]` listing."""
  out = {}
  with open(os.path.join(FIXTURES, name)) as f:
    for line in f:
      if line.strip() and not line.startswith('#'):
        key, rest = line.split(' ', 1)
        shape, _, rest = rest.partition(')')
        dtype, _, tag = rest.strip().partition(' ')
        out[key] = (tuple(int(s) for s in shape.strip('(').split(',') if s.strip()), dtype, tag)
  return out


def relative_position_index(ws: int) -> np.ndarray:
  """docs/mtlora.md §1.3: index[i, j] = (dr + ws - 1) * (2 ws - 1) + (dc + ws - 1)."""
  r, c = np.divmod(np.arange(ws * ws), ws)
  return (r[:, None] - r[None] + ws - 1) * (2 * ws - 1) + (c[:, None] - c[None] + ws - 1)


def listing_state_dict(listing, prefix='') -> dict[str, np.ndarray]:
  """The listing as zero-stride arrays (no memory), correct relative_position_index buffers."""
  return {prefix + k: relative_position_index(int(round(math.sqrt(shape[0]))))
          if k.endswith('relative_position_index') else np.broadcast_to(np.zeros((), dtype), shape)
          for k, (shape, dtype, _) in listing.items()}


def _swin_config(module: str, arg: str):
  import importlib  # pylint: disable=g-import-not-at-top
  return importlib.import_module(f'configs.{module}').get_config(arg)


@pytest.fixture(scope='module')
def swin_t_imagenet():
  """Random Swin-T ImageNet weights in the official `model` layout (docs/mtlora.md §7)."""
  rng = np.random.default_rng(0)
  return {k: relative_position_index(7) if k.endswith('relative_position_index')
          else rng.standard_normal(shape, dtype=np.float32) for k, (shape, _, _) in
          read_listing('mtlora_state_dict_swin_tiny_patch4_window7_224_imagenet_ckpt.txt').items()}


_SWIN_LISTINGS = {
    ('mtlora_pascal', ''): 'mtlora_state_dict_mtlora_tiny_448_r64_scale4_pertask.txt',
    ('mtlora_pascal', 'rank=16,plus'):
        'mtlora_state_dict_mtlora_plus_tiny_448_r16_scale4_pertask.txt',
    ('swin_pascal', ''): 'mtlora_state_dict_swin_tiny_patch4_window7_448.txt',
}


@pytest.mark.parametrize('module,arg', list(_SWIN_LISTINGS))
def test_swin_imagenet_to_backbone(swin_t_imagenet, module, arg):
  from mtl_jax.convert import mtlora  # pylint: disable=g-import-not-at-top
  config = _swin_config(module, arg)
  params, batch_stats, info = convert.convert_state_dict(swin_t_imagenet, 'swin_imagenet', config)
  assert list(params) == ['backbone'] and not batch_stats
  listing = read_listing(_SWIN_LISTINGS[module, arg])
  # Every frozen-or-trainable backbone parameter of the official 448 model except LoRA ...
  want = {k for k, (_, _, tag) in listing.items()
          if k.startswith('backbone.') and tag != 'B' and 'lora_' not in k}
  got = {mtlora.torch_key(('backbone', *path.split('/'))): v
         for path, v in keys.flatten(params['backbone']).items()}
  assert set(got) == want
  # ... is the ImageNet tensor of the same name without `backbone.` and MTLoRALinear's `.linear`.
  for key, value in got.items():
    source = swin_t_imagenet[key[len('backbone.'):].replace('.linear.', '.')]
    if source.ndim == 4:
      source = source.transpose(2, 3, 1, 0)
    elif key.endswith('.weight') and source.ndim == 2:
      source = source.T
    np.testing.assert_array_equal(value, source, err_msg=key)
  num_lora = sum('lora_' in k for k in listing)
  # Dropped: head + final norm (2 + 2) and the 5 shifted-block masks at 224 (stage 3 is unshifted).
  assert info == {'dropped': 2 + 2 + 5, 'index_checked': 12, 'lora_kept_at_init': num_lora}


@pytest.mark.slow
def test_swin_imagenet_errors(swin_t_imagenet):
  config = _swin_config('mtlora_pascal', '')
  sd = dict(swin_t_imagenet)
  sd['layers.1.blocks.1.attn.relative_position_index'] = relative_position_index(7).T
  with pytest.raises(ConfigError, match=r'1 relative_position_index .*layers\.1\.blocks\.1\.'):
    convert.convert_state_dict(sd, 'swin_imagenet', config)
  sd = dict(swin_t_imagenet)
  del sd['layers.2.blocks.5.mlp.fc1.weight']
  sd['layers.0.blocks.0.attn.relative_position_bias_table'] = np.zeros((225, 3), np.float32)
  with pytest.raises(ConfigError) as e:
    convert.convert_state_dict(sd, 'swin_imagenet', config)
  assert '1 missing (layers.2.blocks.5.mlp.fc1.weight)' in str(e.value)
  assert 'relative_position_bias_table (225, 3) vs (169, 3)' in str(e.value)
  with pytest.raises(ConfigError, match='needs config.model.name swin, mtlora or'):
    convert.convert_state_dict(sd, 'swin_imagenet', smoke_config('unused'))


@pytest.mark.slow
@pytest.mark.parametrize('module,arg', list(_SWIN_LISTINGS))
def test_mtlora_listings_convert(module, arg):
  """Official MTLoRA / Swin key sets and shapes convert to exactly the config's model."""
  config = _swin_config(module, arg)
  sd = listing_state_dict(read_listing(_SWIN_LISTINGS[module, arg]), prefix='module.')
  params, batch_stats, _ = convert.convert_state_dict(sd, 'mtlora', config)  # checks all shapes
  want_params, want_stats = keys.abstract_weights(config)
  assert len(keys.flatten(params)) == len(keys.flatten(want_params))
  assert len(keys.flatten(batch_stats)) == len(keys.flatten(want_stats)) == 4 * 2


def test_mtlora_checkpoint_round_trip(tmp_path):
  """A full `ckpt_epoch_N.pth` (model + optimizer + pickled yacs config) -> weights."""
  from mtl_jax.convert import mtlora  # pylint: disable=g-import-not-at-top
  with open(os.path.join(FIXTURES, 'mtlora_tiny_seed0.json')) as f:
    config = mtlora.config_from_reference(common.get_config(), json.load(f))
  arrays = np.load(os.path.join(FIXTURES, 'mtlora_tiny_seed0_slim.npz'))
  sd = {k[len('param/'):]: arrays[k] for k in arrays.files if k.startswith('param/')}
  cfg = EvilConfig()
  dict.__setitem__(cfg, 'MODEL', {'NAME': 'mtlora'})
  EvilConfig.target = str(tmp_path / 'pwned')
  save_pth(tmp_path / 'ckpt_epoch_4.pth', {
      'model': sd, 'optimizer': {'state': {0: {'exp_avg': sd['backbone.patch_embed.proj.bias']}},
                                 'param_groups': [{'lr': 1e-4, 'params': [0]}]},
      'lr_scheduler': {'last_epoch': 4}, 'max_accuracy': 0.0, 'epoch': 4, 'config': cfg})
  metadata = convert_cli.run('mtlora', str(tmp_path / 'ckpt_epoch_4.pth'), str(tmp_path / 'w'),
                             config)
  assert not (tmp_path / 'pwned').exists()
  assert metadata['key'] == 'model' and metadata['source_arrays'] == len(sd)
  params, batch_stats = checkpoint.load_weights(str(tmp_path / 'w'))
  want = mtlora.from_torch(sd, config)
  assert_tree_close(params, want['params'])
  assert_tree_close(batch_stats, want['batch_stats'])


# -- MLoRE checkpoints (docs/mlore.md §3.5, §7, §8) ----------------------------------------------

# official listing -> (config module, arg, parameters of the mtl_jax model: §7, without the
# 26,661,804 that the ViT-B variant never uses)
_MLORE_LISTINGS = {
    'mlore_state_dict_pascal_vitSp16_MLoRE.txt': ('mlore_pascal', 'vit=S', 42_176_918),
    'mlore_state_dict_pascal_vitBp16_MLoRE.txt': ('mlore_pascal', 'vit=B', 259_132_406),
    'mlore_state_dict_pascal_vitLp16_MLoRE.txt': ('mlore_pascal', 'vit=L', 407_690_406),
    'mlore_state_dict_nyud_vitLp16_MLoRE.txt': ('mlore_nyud', '', 551_625_533),
}
_MLORE_DROPPED = r'.*num_batches_tracked|backbone\.(q_fuse|classify_route_[12])\..*|aux_heads\..*'


def abstract_listing(name: str, prefix: str = 'module.') -> dict:
  """The listing as a state dict of jax.ShapeDtypeStruct (DDP `module.` keys, nothing allocated)."""
  import jax  # pylint: disable=g-import-not-at-top
  return {prefix + k: jax.ShapeDtypeStruct(shape, np.dtype(dtype))
          for k, (shape, dtype, _) in read_listing(name).items()}


@pytest.mark.slow
@pytest.mark.parametrize('listing', list(_MLORE_LISTINGS))
def test_mlore_listings_convert(listing):
  """Every released MLoRE layout converts, abstractly, to exactly the config's model."""
  import jax  # pylint: disable=g-import-not-at-top
  import re  # pylint: disable=g-import-not-at-top
  from mtl_jax.convert import mlore  # pylint: disable=g-import-not-at-top
  module, arg, num_params = _MLORE_LISTINGS[listing]
  config = _swin_config(module, arg)
  sd = abstract_listing(listing)
  dropped = {k for k in sd if re.fullmatch(_MLORE_DROPPED, k[len('module.'):])}
  params, batch_stats, info = convert.convert_state_dict(sd, 'mlore', config)  # checks all shapes
  assert info == {'dropped': len(dropped)}
  assert sum(math.prod(x.shape) for x in jax.tree.leaves(params)) == num_params
  assert sum(math.prod(x.shape) for x in jax.tree.leaves(batch_stats)) == sum(
      math.prod(v.shape) for k, v in sd.items() if k.endswith(('running_mean', 'running_var'))
      and k not in dropped)
  # ... and every other official tensor is read, with its official shape.
  assert mlore.torch_state_dict_shapes(config) == {
      k[len('module.'):]: v.shape for k, v in sd.items() if k not in dropped}


def test_mlore_key_errors_are_listed_together():
  config = _swin_config('mlore_pascal', 'vit=S')
  sd = abstract_listing('mlore_state_dict_pascal_vitSp16_MLoRE.txt')
  del sd['module.backbone.MLoRE_2.1.conv3.sal.bias']
  sd['module.backbone.MLoRE_1.0.lora_list_1.15.W.bias'] = sd['module.backbone.fea_fuse.0.bias']
  fuse = sd['module.backbone.fea_fuse.2.weight']
  sd['module.backbone.fea_fuse.2.weight'] = fuse.update(shape=(192, 384, 3, 3))
  with pytest.raises(ConfigError) as e:
    convert.convert_state_dict(sd, 'mlore', config)
  message = str(e.value)
  assert '1 missing: backbone.MLoRE_2.1.conv3.sal.bias' in message
  assert '1 unexpected: backbone.MLoRE_1.0.lora_list_1.15.W.bias' in message
  assert ('1 shape-mismatched: backbone.fea_fuse.2.weight (192, 384, 3, 3) (expected '
          '(192, 384, 1, 1))') in message
  # A NYUD checkpoint for a PASCAL config: both task sets named, the counts in full.
  with pytest.raises(ConfigError, match=r'(?s)\d+ missing: .*human_parts.*\d+ unexpected: '
                                        r'.*depth.* and \d+ more'):
    convert.convert_state_dict(abstract_listing('mlore_state_dict_nyud_vitLp16_MLoRE.txt'),
                               'mlore', _swin_config('mlore_pascal', 'vit=L'))


@pytest.mark.slow
def test_mlore_checkpoint_round_trip(tfds_dir, tmp_path):
  """Official-format .pth of the fixture weights -> convert -> `config.init_from` of the trainer
  -> the eval forward reproduces the official outputs (tests/test_mlore.py has the full parity).

  The trainer runs on synthetic_scenes, whose semseg / human_parts have other class counts, so
  the model is the fixture's with its sal, normals and edge tasks; per-task parts of the other
  tasks are left out of the checkpoint (in eval mode a task's output does not depend on them).
  """
  import re  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  from mtl_jax import train  # pylint: disable=g-import-not-at-top
  from mtl_jax.convert import mlore  # pylint: disable=g-import-not-at-top
  with open(os.path.join(FIXTURES, 'mlore_pascal_tiny_seed0.json')) as f:
    config = mlore.config_from_reference(common.get_config(), json.load(f))
  arrays = np.load(os.path.join(FIXTURES, 'mlore_pascal_tiny_seed0_slim.npz'))
  tasks = ('sal', 'normals', 'edge')
  config.tasks = ','.join(tasks)
  config.dataset.update(name='synthetic_scenes/tiny', data_dir=tfds_dir, build_if_missing=False)
  config.batch_size = config.eval_batch_size = 2
  model_sd = {f'module.{k[len("param/"):]}': arrays[k] for k in arrays.files
              if k.startswith('param/') and not re.search(r'\.(semseg|human_parts)\.', k)}
  model_sd['module.aux_heads.sal.linear_pred.bias'] = np.zeros(2, np.float32)  # ViT-B's, unused
  save_pth(tmp_path / 'checkpoint.pth.tar', {
      'model': model_sd, 'optimizer': {'state': {}, 'param_groups': [{'lr': 2e-5}]},
      'scheduler': {'last_epoch': 7}, 'epoch': 7, 'iter_count': 40000})
  metadata = convert_cli.run('mlore', str(tmp_path / 'checkpoint.pth.tar'), str(tmp_path / 'w'),
                         config)
  assert metadata['key'] == 'model' and metadata['source_arrays'] == len(model_sd)
  assert metadata['dropped'] == 1 + sum(k.endswith('num_batches_tracked') for k in model_sd)

  config.init_from = str(tmp_path / 'w')
  trainer = train.Trainer(config, tmp_path / 'run', devices=jax.devices()[:1])
  # trainer.init_state() = a random init (a long compile here), then this:
  blank = jax.tree.map(lambda s: jax.device_put(np.zeros(s.shape, s.dtype)),
                       trainer.abstract_state)
  state = trainer.load_weights(blank, config.init_from)
  want = mlore.from_torch(model_sd, config)
  assert_tree_close(state.params, want['params'])
  assert_tree_close(state.batch_stats, want['batch_stats'])
  preds = jax.jit(lambda s, r, x: trainer.model(trainer.eval_graph, s, r)(x)[0])(
      state, trainer.rest, arrays['input'].transpose(0, 2, 3, 1))
  for t in tasks:
    want = arrays[f'out/{t}']  # (2, K, 96, 96)[..., ::7, ::7] (make_slim.py)
    got = np.asarray(preds[t]).transpose(0, 3, 1, 2)[:, :, ::7, ::7]
    np.testing.assert_allclose(got, want, atol=1e-5 * np.abs(want).max(), rtol=0, err_msg=t)


@pytest.mark.slow
def test_mlore_cli_one_error_line(tmp_path):
  """The tiny fixture checkpoint against the ViT-S config: exit 1, one line, nothing written."""
  arrays = np.load(os.path.join(FIXTURES, 'mlore_pascal_tiny_seed0_slim.npz'))
  save_pth(tmp_path / 'tiny.pth', {'model': {
      f'module.{k[len("param/"):]}': arrays[k] for k in arrays.files if k.startswith('param/')}})
  env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=ROOT)
  cmd = [sys.executable, '-m', 'mtl_jax.tools.convert', '--format=mlore',
         f'--config={os.path.join(ROOT, "configs", "mlore_pascal.py")}:vit=S',
         f'--input={tmp_path / "tiny.pth"}', f'--output={tmp_path / "out"}']
  result = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, check=False)
  assert result.returncode == 1, result.stderr
  assert result.stderr.strip().count('\n') == 0, result.stderr
  assert result.stderr.startswith('error: the state dict does not match config.model')
  assert 'missing: backbone.blocks.8.norm1.weight' in result.stderr
  assert 'shape-mismatched: backbone.pos_embed (1, 37, 48) (expected (1, 1025, 384))' in (
      result.stderr)
  assert sorted(os.listdir(tmp_path)) == ['tiny.pth']


def test_timm_vit_into_mlore_backbone(tmp_path):
  """AugReg ViT -> the ViT of an MLoRE config (grid 5x5 -> 4x4); the decoder is not touched."""
  config = _swin_config('mlore_pascal', 'smoke')  # ViT patch 8, D 16, depth 4 at 32x32
  sd = timm_vit(np.random.default_rng(5), d=16, depth=4, patch=8, grid=5)
  np.savez(tmp_path / 'augreg.npz', **augreg_npz(sd, heads=2))
  params, batch_stats, info = convert.convert_state_dict(
      convert.read_state_dict(str(tmp_path / 'augreg.npz'))[0], 'timm_vit', config)
  assert list(params) == ['backbone'] and not batch_stats
  assert info == {'dropped': 3, 'pos_embed_resized': '25 -> 4x4'}
  assert_tree_close(params['backbone'], expected_backbone(sd, (4, 4)), atol=2e-6)


# -- every family both ways, one error format, versioned dataset names ---------------------------

def fixture_state_dict(name: str) -> dict[str, np.ndarray]:
  """The `param/*` arrays of a shipped slim fixture: an official state dict."""
  arrays = np.load(os.path.join(FIXTURES, f'{name}_slim.npz'))
  return {k[len('param/'):]: arrays[k] for k in arrays.files if k.startswith('param/')}


def fixture_config(name: str):
  from mtl_jax.tools import parity  # pylint: disable=g-import-not-at-top
  import importlib  # pylint: disable=g-import-not-at-top
  with open(os.path.join(FIXTURES, f'{name}.json')) as f:
    sidecar = json.load(f)
  family = importlib.import_module(f'mtl_jax.convert.{parity.family_of(sidecar)}')
  return family, family.config_from_reference(common.get_config(), sidecar)


def assert_state_dicts_equal(got, want):
  assert sorted(got) == sorted(want)
  for key, value in want.items():
    assert got[key].dtype == value.dtype and got[key].shape == value.shape, key
    np.testing.assert_array_equal(got[key], value, err_msg=key)


@pytest.mark.parametrize('name', ['mlore_pascal_tiny_seed0', 'swin_tiny_decoder_seed0',
                                  'mtlora_tiny_seed0', 'mtlora_layers_qkv_fc2_seed6'])
def test_round_trip_official_state_dicts(name):
  """to_torch(from_torch(sd)) == sd for MLoRE, the Swin multi-task baseline and MTLoRA, less the
  keys the families drop (BN counters; Swin's attn_mask, recomputed from the geometry)."""
  import re  # pylint: disable=g-import-not-at-top
  family, config = fixture_config(name)
  sd = fixture_state_dict(name)
  want = {k: v for k, v in sd.items() if not re.fullmatch(r'.*(num_batches_tracked|attn_mask)', k)}
  assert_state_dicts_equal(family.to_torch(family.from_torch(sd, config), config), want)


def test_round_trip_timm_vit():
  config = smoke_config('unused')  # ViT patch 8, D 32, depth 2 at 24x32: a 3x4 grid
  sd = timm_vit(np.random.default_rng(6))
  sd['pos_embed'] = np.random.default_rng(7).standard_normal((1, 13, 32)).astype(np.float32)
  want = {k: v for k, v in sd.items() if k not in ('cls_token', 'head.weight', 'head.bias')}
  weights = vit_convert.from_torch(sd, config)
  assert list(weights['params']) == ['backbone'] and not weights['batch_stats']
  assert_state_dicts_equal(vit_convert.to_torch(weights, config), want)


@pytest.mark.slow
def test_round_trip_swin_imagenet(swin_t_imagenet):
  import re  # pylint: disable=g-import-not-at-top
  from mtl_jax.convert import mtlora  # pylint: disable=g-import-not-at-top
  config = _swin_config('mtlora_pascal', '')
  weights = mtlora.imagenet_from_torch(swin_t_imagenet, config)
  want = {k: v for k, v in swin_t_imagenet.items()
          if not re.fullmatch(r'.*attn_mask|norm\.(weight|bias)|head\..*', k)}
  assert_state_dicts_equal(mtlora.imagenet_to_torch(weights, config), want)


def _break_mtlora():
  sd = fixture_state_dict('mtlora_tiny_seed0')
  del sd['backbone.layers.1.blocks.0.attn.qkv.linear.bias']
  sd['backbone.layers.0.blocks.0.attn.extra'] = np.zeros(3, np.float32)
  sd['downsampler.sal.downsample_2.weight'] = np.zeros((5, 3, 1, 1), np.float32)
  return (sd, fixture_config('mtlora_tiny_seed0')[1], 'mtlora',
          'MTLoRA / Swin state dict -> config model',
          'backbone.layers.1.blocks.0.attn.qkv.linear.bias',
          'backbone.layers.0.blocks.0.attn.extra', 'downsampler.sal.downsample_2.weight')


def _break_timm():
  sd = timm_vit(np.random.default_rng(8))
  del sd['blocks.0.mlp.fc2.bias']
  sd['blocks.1.ls1.gamma'] = np.zeros(32, np.float32)
  sd['norm.bias'] = np.zeros(31, np.float32)
  return (sd, smoke_config('unused'), 'timm_vit', 'timm ViT -> config ViT',
          'blocks.0.mlp.fc2.bias', 'blocks.1.ls1.gamma', 'norm.bias')


@pytest.mark.parametrize('broken', [_break_timm, _break_mtlora])
def test_one_error_format(broken):
  """A missing, an unexpected and a mismatched key, all named in one one-line ConfigError of
  the same format (keys.check) for two families."""
  import re  # pylint: disable=g-import-not-at-top
  sd, config, fmt, what, missing, unexpected, mismatched = broken()
  with pytest.raises(ConfigError) as e:
    convert.convert_state_dict(sd, fmt, config)
  assert re.fullmatch(
      rf'{re.escape(what)}: 1 missing \({re.escape(missing)}\); 1 unexpected '
      rf'\({re.escape(unexpected)}\); 1 shape mismatches: got vs want \({re.escape(mismatched)} '
      r'\([\d, ]+\) vs \([\d, ]+\)\); check --format and --config', str(e.value)), str(e.value)


@pytest.mark.slow
@pytest.mark.parametrize('name', ['mlore_pascal_tiny_seed0', 'mtlora_tiny_seed0'])
def test_dataset_name_with_version(name, monkeypatch):
  """`pascal_context:1.0.0` (a TFDS name with its version) in convert and parity."""
  from mtl_jax.tools import parity  # pylint: disable=g-import-not-at-top
  family, config = fixture_config(name)
  sd = fixture_state_dict(name)
  want = family.from_torch(sd, config)
  config.dataset.name = 'pascal_context:1.0.0'
  params, batch_stats, _ = convert.convert_state_dict(sd, config.model.name, config)
  assert_tree_close(params, want['params'])
  assert_tree_close(batch_stats, want['batch_stats'])
  reference = family.config_from_reference

  def versioned(base, sidecar):
    out = reference(base, sidecar)
    out.dataset.name = 'pascal_context:1.0.0'
    return out

  monkeypatch.setattr(family, 'config_from_reference', versioned)
  arrays = dict(np.load(os.path.join(FIXTURES, f'{name}_slim.npz')))
  with open(os.path.join(FIXTURES, f'{name}.json')) as f:
    model, parity_config, got_family = parity.build_from_fixture(arrays, json.load(f))
  assert got_family is family and parity_config.dataset.name == 'pascal_context:1.0.0'
  assert sorted(model.heads) == sorted(config.tasks.split(','))
