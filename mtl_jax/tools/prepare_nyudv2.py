r"""A raw NYUD-v2 extraction -> the NYUD_MT tree that the nyud_v2 builder (nyud_mt_mm) reads.

  python -m mtl_jax.tools.prepare_nyudv2 --src=/data/nyuv2_raw --dst=/data/NYUD_MT
  python -m mtl_jax.tools.prepare_nyudv2 --src=RAW --dst=NYUD_MT --splits-mat=splits.mat \
      --edge-source=real --edge-root=/data/nyud_edges --overwrite
  python -m data_builders.build data_builders/nyud_v2 --config=nyud_mt_mm \
      --manual_dir=/data/NYUD_MT --data_dir=DATA_DIR --file_format=array_record

The port of the user fork's `scripts/prepare_nyudv2.py` (both versions; docs/user_fork.md §6).
`--src` holds `image/{train,test}/<id>.png`, `depth/<split>/<id>.png`, `normal/<split>/<id>.npy`
and `seg40/<split>/<id>.png` (every folder with the same ids); `--dst` gets

* `images/<id>.jpg`: the image re-encoded as JPEG quality 95;
* `depth/<id>.npy`: the depth PNG's values as float32, **not scaled** (raw PNG units, e.g.
  millimetres: build with `--config=nyud_mt_mm`, or `nyud_mt` when they are metres);
* `normals/<id>.npy`, `segmentation/<id>.png`: copies of the normal .npy and the seg40 PNG;
* `edge/<id>.npy` (float32 {0, 1}), chosen by `--edge-source`: `real` = the annotations under
  `--edge-root` (`[<split>/]<id>.{png,npy,npz}`, `[<split>/]<id>/*` or `[<split>/]<id>_*`;
  several annotators are fused by majority vote and their stack is kept in `edge_eval/<id>.npz`,
  key gts), `derived` = from seg40 (a pixel is an edge where its left / right / up / down
  neighbour has a different valid label 1..254, both pixels valid; then thinned with
  skimage, `data_builders.manual_data.thin`), `zero` = all-zero placeholders (the first fork
  version), `auto` (default) = real where found, derived otherwise;
* `gt_sets/{train,val,test}.txt`: the ids, one per line. val is the `--val-from` split (default
  test, as the fork: val = test) unless `--splits-mat` has a val list.

`--splits-mat` (keys train* / test* / val*, 1-based frame numbers) chooses the ids instead of the
folder listings; they are zero-padded like the source file names (5 digits when these are not
all numeric names of one width, as the fork). Everything is checked before anything is written,
the output is written into `<dst>.tmp` and renamed at the end, so that a failure leaves no
partial tree; an existing `--dst` is replaced only with `--overwrite`.
"""

import os
import shutil
import sys

import numpy as np

from mtl_jax.tools import tool_args

SOURCES = {'image': '.png', 'depth': '.png', 'normal': '.npy', 'seg40': '.png'}  # folder: ext
SOURCE_SPLITS = ('train', 'test')
EDGE_FORMATS = ('png', 'npy', 'npz')
NUM_CLASSES = 40
_MARKER = '.prepare_nyudv2_incomplete'  # in <dst>.tmp while it is being written


def derive_edge(seg: np.ndarray) -> np.ndarray:
  """Edges of a seg40 map as the fork derives them: uint8 {0, 1}, thinned.

  A pixel is marked when a 4-neighbour differs from it and both have a valid label (1..254),
  so unlike `nyud_v2_dataset_builder.boundaries` the border of unlabelled (0) regions is no edge.
  """
  from data_builders import manual_data  # pylint: disable=g-import-not-at-top
  seg = np.asarray(seg).astype(np.int64)
  if seg.ndim != 2:
    raise tool_args.ToolError(f'expected a single-channel segmentation map, got {seg.shape}')
  valid = (seg > 0) & (seg < 255)
  edge = np.zeros(seg.shape, bool)
  horizontal = valid[:, 1:] & valid[:, :-1] & (seg[:, 1:] != seg[:, :-1])
  vertical = valid[1:] & valid[:-1] & (seg[1:] != seg[:-1])
  edge[:, 1:] |= horizontal
  edge[:, :-1] |= horizontal
  edge[1:] |= vertical
  edge[:-1] |= vertical
  return manual_data.thin(edge)


def fuse_edges(stack: np.ndarray) -> np.ndarray:
  """Majority vote (more than half of the annotators) of an (N, H, W) {0, 1} stack, uint8."""
  return (stack.sum(axis=0) >= stack.shape[0] // 2 + 1).astype(np.uint8)


def _edge_stack(array: np.ndarray, path: str) -> np.ndarray:
  """(N, H, W) float32 {0, 1} of an (H, W), (H, W, 1) or (N, H, W) annotation; 0..255 -> / 255."""
  array = np.asarray(array, np.float32)
  if array.ndim == 3 and array.shape[-1] == 1:
    array = array[..., 0]
  if array.ndim == 2:
    array = array[None]
  if array.ndim != 3 or not array.size:
    raise tool_args.ToolError(f'{path}: expected an (H, W) or (N, H, W) edge map, got '
                              f'{array.shape}; check --edge-root')
  if array.max() > 1 or array.min() < 0:
    array = array / 255.0
  return (array >= 0.5).astype(np.float32)


def _load_edge_file(path: str) -> np.ndarray:
  if path.endswith('.npz'):
    with np.load(path) as data:
      if not data.files:
        raise tool_args.ToolError(f'{path} holds no array; check --edge-root')
      return _edge_stack(data['gts'] if 'gts' in data.files else data[data.files[0]], path)
  if path.endswith('.npy'):
    return _edge_stack(np.load(path), path)
  return _edge_stack(_png(path), path)


def find_real_edges(edge_root: str, split: str, image_id: str, edge_format: str) -> list[str]:
  """Annotation files of `image_id` under edge_root/<split>/ or edge_root/ ([] when none)."""
  exts = EDGE_FORMATS if edge_format == 'auto' else (edge_format,)
  for base in (os.path.join(edge_root, split), edge_root):
    if not os.path.isdir(base):
      continue
    folder = os.path.join(base, image_id)
    if os.path.isdir(folder):
      files = [os.path.join(folder, n) for n in sorted(os.listdir(folder))
               if n.lower().endswith(tuple('.' + e for e in exts))]
      if files:
        return files
    for ext in exts:
      if os.path.isfile(os.path.join(base, f'{image_id}.{ext}')):
        return [os.path.join(base, f'{image_id}.{ext}')]
    names = sorted(os.listdir(base))
    several = [os.path.join(base, n) for n in names
               if n.startswith((image_id + '_', image_id + '-'))
               and n.lower().endswith(tuple('.' + e for e in exts))]
    if several:
      return several
  return []


def _png(path: str) -> np.ndarray:
  from PIL import Image  # pylint: disable=g-import-not-at-top
  with Image.open(path) as image:
    return np.array(image)


def _stems(folder: str, ext: str) -> set[str]:
  return {n[:-len(ext)] for n in os.listdir(folder) if n.endswith(ext)}


def _sample(items, n: int = 5) -> str:
  items = sorted(items)
  return ', '.join(items[:n]) + (f' ... ({len(items)} in all)' if len(items) > n else '')


def _read_splits_mat(path: str) -> dict[str, list[int]]:
  """{'train' | 'test' | 'val': frame numbers} of splits.mat (keys starting with those words)."""
  import scipy.io  # pylint: disable=g-import-not-at-top
  if not os.path.isfile(path):
    raise tool_args.ToolError(f'--splits-mat={path} does not exist; pass the official splits.mat '
                              'or leave it out (ids from the image/<split>/ folders)')
  try:
    mat = scipy.io.loadmat(path)
  except Exception as e:  # pylint: disable=broad-except
    raise tool_args.ToolError(f'cannot read --splits-mat={path} ({type(e).__name__}: {e}); '
                              'pass a MATLAB v5 splits.mat (trainNdxs / testNdxs)') from None
  splits = {}
  for key, value in mat.items():
    for name in ('train', 'test', 'val'):
      if key.lower().startswith(name) and isinstance(value, np.ndarray):
        try:
          splits[name] = [int(i) for i in np.ravel(value)]
        except (TypeError, ValueError):
          raise tool_args.ToolError(f'--splits-mat: {key} does not hold frame numbers') from None
  if 'train' not in splits or 'test' not in splits:
    raise tool_args.ToolError(f'--splits-mat={path} has no train* and test* variables (has '
                              f'{", ".join(k for k in mat if not k.startswith("__"))}); pass '
                              "NYU's splits.mat (trainNdxs, testNdxs)")
  return splits


def plan(src: str, splits_mat: str | None = None, val_from: str = 'test',
         edge_source: str = 'auto', edge_root: str | None = None,
         edge_format: str = 'auto') -> dict:
  """Checks the source tree; returns {'splits': {name: ids}, 'items': {id: (source split,
  real edge files)}}. ToolError (nothing written) on any problem."""
  if not os.path.isdir(src):
    raise tool_args.ToolError(f'--src={src} is not a directory; pass the raw NYUD-v2 root with '
                              'image/, depth/, normal/, seg40/')
  source_splits = list(SOURCE_SPLITS) + (['val'] if os.path.isdir(os.path.join(src, 'image',
                                                                              'val')) else [])
  missing = [f'{folder}/{split}' for split in source_splits for folder in SOURCES
             if not os.path.isdir(os.path.join(src, folder, split))]
  if missing:
    raise tool_args.ToolError(f'--src={src} lacks the folders {", ".join(missing)}; expected '
                              '{image,depth,seg40}/{train,test}/<id>.png and '
                              'normal/{train,test}/<id>.npy (docs/user_fork.md §6)')
  listed = {s: {f: _stems(os.path.join(src, f, s), ext) for f, ext in SOURCES.items()}
            for s in source_splits}
  if edge_source == 'real' and not edge_root:
    raise tool_args.ToolError('--edge-source=real needs --edge-root (the folder of the edge '
                              'annotations)')
  if edge_root and not os.path.isdir(edge_root):
    raise tool_args.ToolError(f'--edge-root={edge_root} is not a directory; pass the folder of '
                              'the edge annotations')
  if splits_mat:
    numbers = _read_splits_mat(splits_mat)
    names = set().union(*(listed[s]['image'] for s in source_splits))
    widths = {len(n) for n in names}
    width = widths.pop() if len(widths) == 1 and all(n.isdigit() for n in names) else 5
    splits = {k: [f'{i:0{width}d}' for i in v] for k, v in numbers.items()}
  else:
    for split in source_splits:
      images = listed[split]['image']
      for folder, ids in listed[split].items():
        if ids != images:
          lacking, extra = images - ids, ids - images
          detail = '; '.join(x for x in (
              f'{folder}/{split} lacks {_sample(lacking)}' if lacking else '',
              f'{folder}/{split} has ids without an image: {_sample(extra)}' if extra else '')
              if x)
          raise tool_args.ToolError(f'mismatched id sets in --src={src}: {detail}; every folder '
                                    'of a split needs the same ids')
      if not images and split in SOURCE_SPLITS:
        raise tool_args.ToolError(f'{os.path.join(src, "image", split)} has no .png image; '
                                  'check --src')
    splits = {s: sorted(listed[s]['image']) for s in source_splits}
  both = set(splits['train']) & set(splits['test'])
  if both:
    raise tool_args.ToolError(f'ids in both train and test: {_sample(both)}; the NYUD_MT layout '
                              'has one file per id (fix the split lists)')
  if 'val' not in splits:
    splits['val'] = list(splits[val_from])
  items, lacking = {}, []
  for name in ('train', 'test', 'val'):
    candidates = {'train': ['train'], 'test': ['test']}.get(name) or (
        ['val'] if 'val' in source_splits else [val_from, *(s for s in SOURCE_SPLITS
                                                            if s != val_from)])
    for image_id in splits[name]:
      if image_id in items:
        continue
      split = next((s for s in candidates if image_id in listed[s]['image']), None)
      if split is None:
        lacking.append(f'{image_id} ({name})')
        continue
      absent = [f'{f}/{split}/{image_id}{ext}' for f, ext in SOURCES.items()
                if image_id not in listed[split][f]]
      if absent:
        lacking += absent
        continue
      real = (find_real_edges(edge_root, split, image_id, edge_format)
              if edge_root and edge_source in ('auto', 'real') else [])
      if edge_source == 'real' and not real:
        raise tool_args.ToolError(f'no edge annotation of {image_id} (split {split}) under '
                                  f'--edge-root={edge_root}; use --edge-source=auto to derive '
                                  'the missing ones from seg40')
      items[image_id] = (split, real)
  if lacking:
    raise tool_args.ToolError(f'{len(lacking)} source file(s) of the split lists are missing '
                              f'under --src={src}: {_sample(lacking)}; fix --splits-mat or the '
                              'source tree')
  return {'splits': splits, 'items': items}


def _write_example(src: str, out: str, image_id: str, split: str, real: list[str],
                   edge_source: str) -> str:
  """Writes one id's five files (and edge_eval/); returns the kind of edge written."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  path = lambda folder: os.path.join(src, folder, split, image_id + SOURCES[folder])
  try:
    with Image.open(path('image')) as image:
      rgb = image.convert('RGB')
    rgb.save(os.path.join(out, 'images', f'{image_id}.jpg'), format='JPEG', quality=95)
    depth = _png(path('depth'))
    if depth.ndim != 2:
      raise tool_args.ToolError(f'{path("depth")} has shape {depth.shape}; expected a '
                                'single-channel (16-bit) depth PNG')
    np.save(os.path.join(out, 'depth', f'{image_id}.npy'), depth.astype(np.float32))
    normals = np.load(path('normal'), mmap_mode='r')
    if normals.ndim != 3 or normals.shape[-1] != 3:
      raise tool_args.ToolError(f'{path("normal")} has shape {normals.shape}; expected (H, W, 3) '
                                'normals')
    shutil.copyfile(path('normal'), os.path.join(out, 'normals', f'{image_id}.npy'))
    seg = _png(path('seg40'))
    if seg.ndim != 2 or seg.max() > NUM_CLASSES:
      raise tool_args.ToolError(f'{path("seg40")}: shape {seg.shape}, values up to {seg.max()}; '
                                'expected a single-channel NYU-40 map (0 unlabelled, 1..40)')
    shutil.copyfile(path('seg40'), os.path.join(out, 'segmentation', f'{image_id}.png'))
    if real:
      stack = np.concatenate([_load_edge_file(p) for p in real])
      edge, kind = fuse_edges(stack), 'real'
      if stack.shape[0] > 1:
        os.makedirs(os.path.join(out, 'edge_eval'), exist_ok=True)
        np.savez_compressed(os.path.join(out, 'edge_eval', f'{image_id}.npz'), gts=stack)
    elif edge_source == 'zero':
      edge, kind = np.zeros((rgb.height, rgb.width), np.uint8), 'zero'
    else:
      edge, kind = derive_edge(seg), 'derived'
    np.save(os.path.join(out, 'edge', f'{image_id}.npy'), edge.astype(np.float32))
  except (tool_args.ToolError, MemoryError):
    raise
  except Exception as e:  # pylint: disable=broad-except  (PIL / numpy decode failures)
    raise tool_args.ToolError(f'cannot convert {image_id} (split {split}): {type(e).__name__}: '
                              f'{e}; check that file of --src') from None
  return kind


def prepare(src: str, dst: str, *, splits_mat=None, val_from='test', edge_source='auto',
            edge_root=None, edge_format='auto', overwrite=False, log_every=100,
            log=print) -> dict:
  """Writes the NYUD_MT tree at `dst`; returns {'splits': {name: count}, 'edges': {kind: n}}."""
  src, dst = os.path.abspath(src), os.path.abspath(dst.rstrip(os.sep) or dst)
  if dst == src or src.startswith(dst + os.sep) or dst.startswith(src + os.sep):
    raise tool_args.ToolError(f'--dst={dst} overlaps --src={src}; write to another directory')
  if os.path.exists(dst) and not overwrite:
    raise tool_args.ToolError(f'--dst={dst} already exists; pass --overwrite to replace it or '
                              'choose another --dst')
  tmp = dst + '.tmp'
  if os.path.exists(tmp) and not os.path.exists(os.path.join(tmp, _MARKER)):
    raise tool_args.ToolError(f'{tmp} exists and was not left by this tool; move it away (the '
                              'output is written there first)')
  todo = plan(src, splits_mat, val_from, edge_source, edge_root, edge_format)
  if os.path.exists(tmp):
    shutil.rmtree(tmp)  # a previous run's leftover
  try:
    os.makedirs(tmp)
    open(os.path.join(tmp, _MARKER), 'w').close()
    for folder in ('images', 'segmentation', 'depth', 'normals', 'edge', 'gt_sets'):
      os.makedirs(os.path.join(tmp, folder))
    edges = {'real': 0, 'derived': 0, 'zero': 0}
    total = len(todo['items'])
    for n, (image_id, (split, real)) in enumerate(todo['items'].items(), 1):
      edges[_write_example(src, tmp, image_id, split, real, edge_source)] += 1
      if log_every and (n % log_every == 0) and n < total:
        log(f'{n}/{total} images')
    for name, ids in todo['splits'].items():
      with open(os.path.join(tmp, 'gt_sets', f'{name}.txt'), 'w') as f:
        f.write(''.join(f'{i}\n' for i in ids))
    os.remove(os.path.join(tmp, _MARKER))
    old = dst + '.old'
    if os.path.exists(dst):  # --overwrite: the old tree goes only once the new one is complete
      if os.path.exists(old):
        shutil.rmtree(old)
      os.replace(dst, old)
    os.replace(tmp, dst)
    if os.path.exists(old):
      shutil.rmtree(old)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  counts = {name: len(ids) for name, ids in todo['splits'].items()}
  log(f'prepared {dst}: {total} images; ' + ', '.join(f'{k} {v}' for k, v in counts.items()) +
      ' ids; edges ' + ', '.join(f'{k} {v}' for k, v in edges.items()) +
      '; depth in raw PNG units (build with --config=nyud_mt_mm for millimetres)')
  return {'splits': counts, 'edges': edges}


def main(argv=None) -> int:
  parser = tool_args.Parser(prog='python -m mtl_jax.tools.prepare_nyudv2',
                            description=__doc__)
  parser.add_argument('--src', required=True, help='raw root: image|depth|normal|seg40/<split>/')
  parser.add_argument('--dst', required=True, help='output root (the NYUD_MT layout)')
  parser.add_argument('--splits-mat', '--splits_mat', dest='splits_mat', default=None,
                      help='splits.mat with train* / test* (/ val*) frame numbers')
  parser.add_argument('--val-from', '--val_from', dest='val_from', choices=SOURCE_SPLITS,
                      default='test', help='split copied to val when there is no val list')
  parser.add_argument('--edge-source', '--edge_source', dest='edge_source', default='auto',
                      choices=('auto', 'real', 'derived', 'zero'), help='edge/ contents')
  parser.add_argument('--edge-root', '--edge_root', dest='edge_root', default=None,
                      help='folder of real edge annotations')
  parser.add_argument('--edge-format', '--edge_format', dest='edge_format', default='auto',
                      choices=('auto', *EDGE_FORMATS), help='file type under --edge-root')
  parser.add_argument('--overwrite', action='store_true', help='replace an existing --dst')
  parser.add_argument('--log-every', '--log_every', dest='log_every', type=int, default=100,
                      help='progress line every N images (0: only the final line)')
  args, code = tool_args.parse(parser, argv)
  if args is None:
    return code
  try:
    prepare(args.src, args.dst, splits_mat=args.splits_mat, val_from=args.val_from,
            edge_source=args.edge_source, edge_root=args.edge_root,
            edge_format=args.edge_format, overwrite=args.overwrite, log_every=args.log_every,
            log=lambda line: print(line, flush=True))
  except tool_args.ToolError as e:
    return tool_args.report(e)
  except OSError as e:
    return tool_args.report(tool_args.ToolError(
        f'cannot write {args.dst}: {e.strerror} ({e.filename}); check the disk and --dst'))
  return 0


def cli():
  """Entry point of the console script (pyproject.toml) and of `python -m`."""
  sys.exit(main())


if __name__ == '__main__':
  cli()
