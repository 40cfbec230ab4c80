"""The ports of the user fork's helper scripts (docs/user_fork.md §6, §7): mtl_jax.tools.stats
(calcu_stats.py), inspect_mat, repro_diagnose and prepare_nyudv2."""

import json
import os
import statistics
import subprocess
import sys

import h5py
import numpy as np
from PIL import Image
import pytest
import scipy.io

from conftest import ROOT
from mtl_jax.tools import inspect_mat
from mtl_jax.tools import prepare_nyudv2
from mtl_jax.tools import repro_diagnose
from mtl_jax.tools import stats


def _one_error_line(capsys, message: str) -> None:
  """Exactly one stderr line, `error: ...` containing `message`, and nothing on stdout."""
  captured = capsys.readouterr()
  err = captured.err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith('error: ') and message in err[0], err
  assert not captured.out, captured.out


@pytest.mark.parametrize('module', ['stats', 'inspect_mat', 'repro_diagnose', 'prepare_nyudv2'])
def test_help_exits_0(module):
  proc = subprocess.run([sys.executable, '-m', f'mtl_jax.tools.{module}', '--help'], cwd=ROOT,
                        capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr
  assert 'docs/user_fork.md' in proc.stdout or 'usage:' in proc.stdout


# ------------------------------------------------------------------------------------------------
# stats (calcu_stats.py)


def test_stats_defaults_reproduce_calcu_stats(capsys):
  # calcu_stats.py by hand: its four PASCAL results against the MTLoRA paper's baselines.
  a = (70.82 - 67.21) / 67.21
  b = (60.45 - 61.93) / 61.93
  c = (65.88 - 62.35) / 62.35
  d = (17.97 - 16.48) / 17.97  # normals mean: lower is better
  mean = (a + b + c + d) / 4
  variance = ((a - mean) ** 2 + (b - mean) ** 2 + (c - mean) ** 2 + (d - mean) ** 2) / 4
  assert stats.main([]) == 0
  out = capsys.readouterr().out
  printed = {line.split(': ')[0]: line.split(': ')[1] for line in out.splitlines() if ': ' in line}
  assert float(printed['mean gain (Δm / 100)']) == pytest.approx(mean, rel=1e-12)
  assert float(printed['variance of the gains (population, ddof 0)']) == pytest.approx(
      variance, rel=1e-12)
  assert printed['Δm'] == f'{100 * mean:+.4f} %'
  assert mean == pytest.approx(0.04234, abs=1e-5) and variance == pytest.approx(0.0015918, 1e-4)
  rows = {line.split()[0]: float(line.split()[-1]) for line in out.splitlines()[1:5]}
  assert rows == pytest.approx({'semseg': a, 'human_parts': b, 'sal': c, 'normals': d}, abs=1e-6)


def test_stats_named_results_fork_task_names_and_lower_better_depth():
  results = stats.parse_results('semseg=41.2,depth=0.62,normals=22.5')
  assert results == {'semseg': 41.2, 'depth': 0.62, 'normals': 22.5}
  base = {'semseg': 40.65, 'normals': 22.97, 'depth': 0.64}
  s = stats.compute(results, base)
  gains = [0.55 / 40.65, 0.02 / 0.64, 0.47 / 22.97]
  assert list(s['gains'].values()) == pytest.approx(gains)
  assert s['mean'] == pytest.approx(statistics.fmean(gains))
  assert s['delta_m'] == pytest.approx(100 * statistics.fmean(gains))
  assert s['variance'] == pytest.approx(statistics.pvariance(gains))
  assert stats.parse_results('1,2', 'human,saliency') == {'human_parts': 1.0, 'sal': 2.0}


@pytest.mark.parametrize('args, message', [
    (['--results=70,abc,1,2'], "'abc' is not a number"),
    (['--results=1,2,3'], '3 values for 4 tasks'),
    (['--tasks=semseg,foo', '--results=1,2'], "unknown task 'foo'"),
    (['--results=depth=0.6'], 'no baseline for depth'),
    (['--baselines=nope'], 'nor a preset'),
    (['--bogus'], 'unrecognized arguments'),
])
def test_stats_bad_input(capsys, args, message):
  assert stats.main(args) == 1
  _one_error_line(capsys, message)


# ------------------------------------------------------------------------------------------------
# inspect_mat

_MATLAB_73 = (b'MATLAB 7.3 MAT-file, Platform: GLNXA64, Created on: Mon Jan  1 00:00:00 2024 '
              b'HDF5 schema 1.00 .')


def test_inspect_v5_mat(tmp_path, capsys):
  path = tmp_path / 'v5.mat'
  scipy.io.savemat(path, {
      'depth': np.arange(12, dtype=np.float32).reshape(3, 4) - 2.5,
      'trainNdxs': np.array([[3], [9], [4]], np.uint16),
      'anno': {'objects': np.array([np.arange(3), 'dog'], dtype=object), 'imname': '2008_000003'},
  })
  assert inspect_mat.main([str(path), '--max-preview=3']) == 0
  out = capsys.readouterr().out
  assert 'MATLAB v5 .. v7.2 (read with scipy.io.loadmat)' in out
  assert 'variables: depth, trainNdxs, anno' in out
  assert 'depth: float32 (3, 4) min=-2.5 max=8.5' in out
  assert '  preview: [-2.5, -1.5, -0.5] ...' in out
  assert 'trainNdxs: uint16 (3, 1) min=3 max=9' in out
  assert 'anno: struct, fields: objects, imname' in out
  assert '  objects: cell (1, 2)' in out
  assert '    {0}: int64 (1, 3) min=0 max=2' in out and "    {1}: char (1,) 'dog'" in out
  assert "  imname: char (1,) '2008_000003'" in out
  assert inspect_mat.main([str(path), '--max-depth=0']) == 0
  assert '  ... 2 fields below --max-depth=0' in capsys.readouterr().out


def test_inspect_v73_mat(tmp_path, capsys):
  path = tmp_path / 'v73.mat'
  with h5py.File(path, 'w', userblock_size=512) as f:
    depths = f.create_dataset('depths', data=np.arange(2 * 3 * 5, dtype=np.float32).reshape(
        2, 3, 5) / 10)
    depths.attrs['MATLAB_class'] = np.bytes_('single')
    name = f.create_dataset('name', data=np.array([[ord(c)] for c in 'wall'], np.uint16))
    name.attrs['MATLAB_class'] = np.bytes_('char')
    refs = f.create_group('#refs#')
    item = refs.create_dataset('a', data=np.array([[7, 200]], np.uint8))
    item.attrs['MATLAB_class'] = np.bytes_('uint8')
    cell = f.create_dataset('names', data=np.array([[item.ref]], dtype=h5py.ref_dtype))
    cell.attrs['MATLAB_class'] = np.bytes_('cell')
    group = f.create_group('meta')
    group.attrs['MATLAB_class'] = np.bytes_('struct')
    group.create_dataset('scale', data=np.array([[0.001]])).attrs['MATLAB_class'] = np.bytes_(
        'double')
  with open(path, 'r+b') as f:  # MATLAB's text header in the HDF5 user block
    f.write(_MATLAB_73.ljust(116) + b'\0' * 8 + b'\x00\x02IM')
  assert inspect_mat.mat_kind(str(path)) == 'v7.3'
  assert inspect_mat.main([str(path)]) == 0
  out = capsys.readouterr().out
  assert "MATLAB v7.3 (HDF5, read with h5py); header 'MATLAB 7.3 MAT-file" in out
  assert 'variables: depths, meta, name, names' in out  # '#refs#' is shown under its cells
  assert 'depths: single dataset float32 (2, 3, 5) (MATLAB 5 x 3 x 2) min=0.0 max=2.9' in out
  assert "name: char (MATLAB 1 x 4) 'wall'" in out
  assert 'names: cell references (1, 1) (MATLAB 1 x 1)' in out
  assert '  {0}: uint8 dataset uint8 (1, 2) (MATLAB 2 x 1) min=7 max=200' in out
  assert 'meta: struct, fields: scale' in out and 'min=0.001 max=0.001' in out


def test_inspect_bad_files(tmp_path, capsys):
  (tmp_path / 'notes.mat').write_text('not a mat file ' * 20)
  assert inspect_mat.main([str(tmp_path / 'notes.mat')]) == 1
  _one_error_line(capsys, 'is not a MAT-file')
  assert inspect_mat.main([str(tmp_path / 'missing.mat')]) == 1
  _one_error_line(capsys, 'does not exist')
  assert inspect_mat.main([str(tmp_path / 'notes.mat'), '--max-depth=x']) == 1
  _one_error_line(capsys, "invalid int value: 'x'")
  assert sorted(os.listdir(tmp_path)) == ['notes.mat']


# ------------------------------------------------------------------------------------------------
# repro_diagnose


def _data_tree(root):
  (root / 'gt_sets').mkdir(parents=True)
  (root / 'gt_sets' / 'train.txt').write_text('0001\n0002\n')
  (root / 'images').mkdir()
  (root / 'images' / '0001.jpg').write_bytes(b'\xff\xd8' + bytes(range(256)) * 10)
  (root / 'images' / '0002.jpg').write_bytes(b'\xff\xd8' + bytes(100))
  big = np.arange(3 << 20, dtype=np.uint8)  # 3 MiB: hashed by size + first / last MiB
  (root / 'big.bin').write_bytes(big.tobytes())
  return root


def _report(tmp_path, name, *args):
  out = tmp_path / f'{name}.json'
  assert repro_diagnose.main([*args, f'--output={out}']) == 0
  return json.loads(out.read_text())


def test_repro_diagnose_report_and_data_hashes(tmp_path, capsys):
  data = _data_tree(tmp_path / 'data')
  first = _report(tmp_path, 'first', f'--data_dir={tmp_path}', '--dataset=data', '--ids=0001')
  for key in ('timestamp', 'host', 'python', 'platform', 'environment', 'packages', 'all_packages',
              'jax', 'git', 'data', 'findings'):
    assert key in first, key
  assert first['packages']['jax'] and first['packages']['numpy'] == np.__version__
  assert first['jax']['backend'] == 'cpu' and first['jax']['devices']
  assert 'jax_default_matmul_precision' in first['jax']['settings']
  assert 'jax_enable_x64' in first['jax']['settings']
  d = first['data']
  assert d['file_count'] == 4 and set(d['files']) == {
      'big.bin', 'gt_sets/train.txt', 'images/0001.jpg', 'images/0002.jpg'}
  assert d['files']['big.bin']['hashed'] == 'size+first+last MiB'
  assert d['split_files']['gt_sets/train.txt']['lines'] == 2
  assert list(d['ids']['0001']) == ['images/0001.jpg']
  import hashlib  # pylint: disable=g-import-not-at-top
  assert d['files']['images/0001.jpg']['sha256'] == hashlib.sha256(
      (data / 'images' / '0001.jpg').read_bytes()).hexdigest()
  # The same data: the same data hashes (dash spelling of the flags as in the fork).
  second = _report(tmp_path, 'second', f'--data_dir={data}', '--ids=0001', '--print-summary')
  assert '[INFO] data' in capsys.readouterr().out
  assert second['data']['tree_sha256'] == d['tree_sha256']
  assert second['data']['files'] == d['files'] and second['data']['ids'] == d['ids']
  # One byte changed in the middle of the big file: only --full-hash sees it.
  big = bytearray((data / 'big.bin').read_bytes())
  big[len(big) // 2] ^= 1
  (data / 'big.bin').write_bytes(bytes(big))
  assert _report(tmp_path, 'quick', f'--data_dir={data}')['data']['tree_sha256'] == d[
      'tree_sha256']
  full = _report(tmp_path, 'full', f'--data_dir={data}', '--full-hash')['data']
  assert full['files']['big.bin']['hashed'] == 'all'
  # A small file changed: its hash, its directory's and the tree's change, the others do not.
  (data / 'images' / '0002.jpg').write_bytes(b'\xff\xd8' + bytes(99) + b'\x01')
  third = _report(tmp_path, 'third', f'--data_dir={data}')['data']
  assert third['tree_sha256'] != d['tree_sha256']
  assert third['files']['images/0002.jpg'] != d['files']['images/0002.jpg']
  assert third['files']['images/0001.jpg'] == d['files']['images/0001.jpg']
  assert third['directories']['images'] != d['directories']['images']
  assert third['directories']['gt_sets'] == d['directories']['gt_sets']


@pytest.mark.parametrize('args, message', [
    (['--data_dir=MISSING'], 'is not a directory'),
    (['--dataset=x'], 'give --data_dir too'),
    (['--num_examples=x'], 'invalid literal'),
    (['--bogus=1'], "Unknown command line flag 'bogus'"),
])
def test_repro_diagnose_bad_input(tmp_path, capsys, args, message):
  args = [a.replace('MISSING', str(tmp_path / 'missing')) for a in args]
  out = tmp_path / 'reports' / 'r.json'
  assert repro_diagnose.main([*args, f'--output={out}']) == 1
  _one_error_line(capsys, message)
  assert not (tmp_path / 'reports').exists()


def test_repro_diagnose_decoded_examples(tmp_path, capsys):
  """--config: hashes of decoded examples of a built TFDS dataset (synthetic_scenes/tiny)."""
  import data_builders.synthetic_scenes  # noqa: F401  pylint: disable=g-import-not-at-top
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  tfds.builder('synthetic_scenes/tiny', data_dir=tmp_path / 'tfds').download_and_prepare()
  args = [f'--config={os.path.join(ROOT, "configs", "demo.py")}',
          '--config.dataset.name=synthetic_scenes/tiny',
          f'--config.dataset.data_dir={tmp_path / "tfds"}']
  first = _report(tmp_path, 'a', *args, '--num_examples=2')
  examples = first['examples']
  assert set(examples) == {'train', 'validation'}
  assert examples['train']['size'] == 8 and len(examples['train']['examples']) == 2
  features = examples['train']['examples'][0]['features']
  assert features['id'] == {'value': 'train_000000'}
  assert features['image']['shape'] == [24, 32, 3] and features['image']['dtype'] == 'uint8'
  assert {'semseg', 'depth', 'normals'} <= set(features)
  assert first['data']['tfds']['splits'] == {'train': 8, 'validation': 4}
  by_id = _report(tmp_path, 'b', *args, '--ids=train_000001,nope', '--splits=train')
  train = by_id['examples']['train']
  assert [e['id'] for e in train['examples']] == ['train_000001'] and train['missing_ids'] == [
      'nope']
  assert train['examples'][0] == first['examples']['train']['examples'][1]
  assert by_id['data']['tree_sha256'] == first['data']['tree_sha256']
  assert any('ids not found: nope' in f for f in by_id['findings'])
  # A dataset that is not built is an error, not a build (configs/demo.py has build_if_missing).
  out = tmp_path / 'not_built.json'
  capsys.readouterr()  # the build's progress bars
  assert repro_diagnose.main([args[0], f'--config.dataset.data_dir={tmp_path / "empty"}',
                              f'--output={out}']) == 1
  _one_error_line(capsys, "TFDS dataset 'synthetic_scenes/small' is not built")
  assert not out.exists() and not (tmp_path / 'empty').exists()


# ------------------------------------------------------------------------------------------------
# prepare_nyudv2

RAW_IDS = {'train': ('00003', '00004'), 'test': ('00001', '00002')}
H, W = 8, 10


def _raw_seg(index: int) -> np.ndarray:
  seg = np.zeros((H, W), np.uint8)  # 0: unlabelled (cols 0..2)
  seg[:, 3:] = 5
  seg[4:, 6:] = 40
  seg[0, 9] = index + 1
  return seg


def _write_raw(root, seed=0):
  """The raw layout prepare_nyudv2.py reads: {image,depth,seg40}/<split>/<id>.png, normal/.npy."""
  rng = np.random.default_rng(seed)
  arrays = {}
  for split, ids in RAW_IDS.items():
    for folder in ('image', 'depth', 'normal', 'seg40'):
      (root / folder / split).mkdir(parents=True, exist_ok=True)
    for k, image_id in enumerate(ids):
      image = rng.integers(0, 256, (H, W, 3), dtype=np.uint8)
      depth = rng.integers(0, 9000, (H, W)).astype(np.uint16)  # millimetres; 0 = invalid
      normals = rng.uniform(-1, 1, (H, W, 3)).astype(np.float32)
      seg = _raw_seg(k)
      Image.fromarray(image).save(root / 'image' / split / f'{image_id}.png')
      Image.fromarray(depth).save(root / 'depth' / split / f'{image_id}.png')
      np.save(root / 'normal' / split / f'{image_id}.npy', normals)
      Image.fromarray(seg).save(root / 'seg40' / split / f'{image_id}.png')
      arrays[image_id] = {'image': image, 'depth': depth, 'normals': normals, 'seg': seg}
  return arrays


def test_prepare_nyudv2_layout_and_values(tmp_path, capsys):
  from data_builders import manual_data  # pylint: disable=g-import-not-at-top
  from data_builders.nyud_v2 import nyud_v2_dataset_builder as nyud  # pylint: disable=g-import-not-at-top
  raw = _write_raw(tmp_path / 'raw')
  dst = tmp_path / 'NYUD_MT'
  assert prepare_nyudv2.main([f'--src={tmp_path / "raw"}', f'--dst={dst}', '--log-every=2']) == 0
  out = capsys.readouterr().out.splitlines()
  assert out[0] == '2/4 images'
  assert out[-1].startswith(f'prepared {dst}: 4 images; train 2, test 2, val 2 ids; edges real 0, '
                            'derived 4, zero 0')
  assert sorted(os.listdir(tmp_path)) == ['NYUD_MT', 'raw']  # NYUD_MT.tmp renamed
  assert sorted(os.listdir(dst)) == ['depth', 'edge', 'gt_sets', 'images', 'normals',
                                     'segmentation']
  assert (dst / 'gt_sets' / 'train.txt').read_text() == '00003\n00004\n'
  assert (dst / 'gt_sets' / 'val.txt').read_text() == '00001\n00002\n'  # val = test
  assert (dst / 'gt_sets' / 'test.txt').read_text() == '00001\n00002\n'
  for split, ids in RAW_IDS.items():
    for image_id in ids:
      r = raw[image_id]
      with Image.open(dst / 'images' / f'{image_id}.jpg') as jpeg:
        assert jpeg.format == 'JPEG' and jpeg.size == (W, H)
        got = np.array(jpeg)
      reference = tmp_path / 'q95.jpg'  # the same JPEG as PIL writes it at quality 95
      Image.fromarray(r['image']).save(reference, format='JPEG', quality=95)
      np.testing.assert_array_equal(got, np.array(Image.open(reference)))
      depth = np.load(dst / 'depth' / f'{image_id}.npy')
      assert depth.dtype == np.float32 and depth.shape == (H, W)
      np.testing.assert_array_equal(depth, r['depth'].astype(np.float32))  # unscaled
      assert (dst / 'normals' / f'{image_id}.npy').read_bytes() == (
          tmp_path / 'raw' / 'normal' / split / f'{image_id}.npy').read_bytes()
      assert (dst / 'segmentation' / f'{image_id}.png').read_bytes() == (
          tmp_path / 'raw' / 'seg40' / split / f'{image_id}.png').read_bytes()
      edge = np.load(dst / 'edge' / f'{image_id}.npy')
      assert edge.dtype == np.float32
      seg = r['seg']
      # The fork's rule written out: label changes between two valid (1..254) 4-neighbours.
      mask = np.zeros((H, W), bool)
      for y in range(H):
        for x in range(W):
          for dy, dx in ((0, 1), (0, -1), (1, 0), (-1, 0)):
            yy, xx = y + dy, x + dx
            if 0 <= yy < H and 0 <= xx < W and 0 < seg[y, x] < 255 and 0 < seg[yy, xx] < 255:
              mask[y, x] |= seg[y, x] != seg[yy, xx]
      np.testing.assert_array_equal(edge, manual_data.thin(mask))
      assert not edge[:, :3].any()  # the unlabelled columns and their border are no edge
      # Where every pixel is labelled it is the builder's `boundaries` computation.
      np.testing.assert_array_equal(edge[:, 3:], nyud.boundaries(seg[:, 3:]))
  # What the builder's nyud_mt_mm example code decodes from the tree.
  assert nyud.decode_semseg(manual_data.epath.Path(dst / 'segmentation' / '00001.png'))[
      0, [0, 3, 9]].tolist() == [255, 4, 0]
  np.testing.assert_allclose(nyud.load_depth(manual_data.epath.Path(dst / 'depth' / '00002.npy'),
                                             0.001), raw['00002']['depth'] * 0.001, rtol=1e-6)
  np.testing.assert_array_equal(
      nyud.decode_normals(manual_data.epath.Path(dst / 'normals' / '00003.npy')),
      raw['00003']['normals'])
  np.testing.assert_array_equal(
      nyud.decode_edge(manual_data.epath.Path(dst / 'edge' / '00004.npy')),
      np.load(dst / 'edge' / '00004.npy').astype(np.uint8))
  assert manual_data.image_bytes(manual_data.epath.Path(dst / 'images' / '00001.jpg'))[1] == (H, W)


def test_prepare_nyudv2_edge_sources_splits_mat_and_overwrite(tmp_path, capsys):
  _write_raw(tmp_path / 'raw')
  src, dst = str(tmp_path / 'raw'), tmp_path / 'out'
  # Real edges of three annotators for 00001 (majority vote), one map for 00003; auto derives
  # the others.
  edges = tmp_path / 'edges'
  (edges / 'test').mkdir(parents=True)
  a = np.zeros((H, W), np.uint8)
  a[2, :] = 255
  b, c = a.copy(), np.zeros((H, W), np.uint8)
  b[5, :] = 255
  c[2, :5] = 255
  for k, m in enumerate((a, b, c)):
    Image.fromarray(m).save(edges / 'test' / f'00001_{k}.png')
  np.save(edges / '00003.npy', (a > 0).astype(np.float32))
  assert prepare_nyudv2.main([f'--src={src}', f'--dst={dst}', f'--edge-root={edges}']) == 0
  assert 'edges real 2, derived 2, zero 0' in capsys.readouterr().out
  fused = np.load(dst / 'edge' / '00001.npy')
  expected = np.zeros((H, W), np.float32)
  expected[2] = 1  # 3 votes on cols 0..4, 2 of 3 on cols 5..9; row 5 has 1 of 3
  np.testing.assert_array_equal(fused, expected)
  gts = np.load(dst / 'edge_eval' / '00001.npz')['gts']
  assert gts.shape == (3, H, W) and gts.dtype == np.float32
  np.testing.assert_array_equal(np.load(dst / 'edge' / '00003.npy'), a > 0)
  assert sorted(os.listdir(dst / 'edge_eval')) == ['00001.npz']  # one annotator: no stack
  # --overwrite with zero placeholders and splits.mat frame numbers, val from train.
  scipy.io.savemat(tmp_path / 'splits.mat', {'trainNdxs': np.array([[3]], np.uint16),
                                              'testNdxs': np.array([[1], [2]], np.uint16)})
  assert prepare_nyudv2.main([f'--src={src}', f'--dst={dst}', '--overwrite', '--edge-source=zero',
                              f'--splits-mat={tmp_path / "splits.mat"}', '--val-from=train']) == 0
  assert 'edges real 0, derived 0, zero 3' in capsys.readouterr().out
  assert (dst / 'gt_sets' / 'train.txt').read_text() == '00003\n'
  assert (dst / 'gt_sets' / 'val.txt').read_text() == '00003\n'
  assert sorted(os.listdir(dst / 'images')) == ['00001.jpg', '00002.jpg', '00003.jpg']
  assert not np.load(dst / 'edge' / '00002.npy').any()
  assert not (dst / 'edge_eval').exists()
  assert sorted(os.listdir(tmp_path)) == ['edges', 'out', 'raw', 'splits.mat']  # no .tmp / .old


def test_prepare_nyudv2_bad_input_writes_nothing(tmp_path, capsys):
  _write_raw(tmp_path / 'raw')
  src, dst = tmp_path / 'raw', tmp_path / 'out'
  run = lambda *args: prepare_nyudv2.main([f'--src={src}', f'--dst={dst}', *args])
  (src / 'seg40' / 'test' / '00002.png').rename(tmp_path / 'moved.png')
  assert run() == 1
  _one_error_line(capsys, 'mismatched id sets in --src=')
  assert run() == 1
  _one_error_line(capsys, 'seg40/test lacks 00002')
  (tmp_path / 'moved.png').rename(src / 'seg40' / 'test' / '00002.png')
  (src / 'normal' / 'train').rename(tmp_path / 'normal_train')
  assert run() == 1
  _one_error_line(capsys, 'lacks the folders normal/train')
  (tmp_path / 'normal_train').rename(src / 'normal' / 'train')
  assert run('--edge-source=real', f'--edge-root={tmp_path}') == 1
  _one_error_line(capsys, 'no edge annotation of 00003')
  scipy.io.savemat(tmp_path / 'splits.mat', {'trainNdxs': np.array([[3], [7]], np.uint16),
                                              'testNdxs': np.array([[1]], np.uint16)})
  assert run(f'--splits-mat={tmp_path / "splits.mat"}') == 1
  _one_error_line(capsys, '00007 (train)')
  # A corrupt source file found while converting: the partial output is removed.
  (src / 'depth' / 'test' / '00002.png').write_bytes(b'not a png')
  assert run() == 1
  _one_error_line(capsys, 'cannot convert 00002')
  assert sorted(os.listdir(tmp_path)) == ['raw', 'splits.mat']
  assert prepare_nyudv2.main([f'--src={src}']) == 1
  _one_error_line(capsys, 'required: --dst')
  dst.mkdir()
  assert run() == 1
  _one_error_line(capsys, 'pass --overwrite')


def test_prepare_nyudv2_output_builds_with_nyud_mt_mm(tmp_path):
  """The written tree through a real TFDS build of nyud_v2/nyud_mt_mm (4 images)."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  from data_builders.nyud_v2 import nyud_v2_dataset_builder  # noqa: F401  pylint: disable=g-import-not-at-top
  raw = _write_raw(tmp_path / 'raw')
  assert prepare_nyudv2.main([f'--src={tmp_path / "raw"}', f'--dst={tmp_path / "NYUD_MT"}']) == 0
  builder = tfds.builder('nyud_v2/nyud_mt_mm', data_dir=tmp_path / 'tfds')
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
      manual_dir=str(tmp_path / 'NYUD_MT')))
  for split, ids in (('train', RAW_IDS['train']), ('validation', RAW_IDS['test'])):
    ds = tfds.data_source('nyud_v2/nyud_mt_mm', split=split, data_dir=tmp_path / 'tfds')
    examples = [ds[i] for i in range(len(ds))]
    assert [ex['id'].decode() for ex in examples] == list(ids)
    for ex in examples:
      r = raw[ex['id'].decode()]
      np.testing.assert_allclose(ex['depth'][..., 0], r['depth'] * 0.001, rtol=1e-6)  # metres
      np.testing.assert_array_equal(ex['semseg'][..., 0],
                                    np.where(r['seg'] == 0, 255, r['seg'].astype(int) - 1))
      np.testing.assert_array_equal(ex['normals'], r['normals'])
      assert ex['image'].shape == (H, W, 3) and ex['edge'].shape == (H, W, 1)
      assert ex['edge'][..., 0].any() and not ex['edge'][:, :3].any()
