r"""One JSON snapshot of a machine's software, accelerator and data, to diff two machines.

  python -m mtl_jax.tools.repro_diagnose --print-summary
  python -m mtl_jax.tools.repro_diagnose --data_dir=~/tensorflow_datasets \
      --dataset=pascal_context/mtlora/1.0.0 --output=reports/a100.json
  python -m mtl_jax.tools.repro_diagnose --data_dir=/data/NYUD_MT --full-hash
  python -m mtl_jax.tools.repro_diagnose --config=configs/mtlora_pascal.py \
      --config.dataset.data_dir=/data/tfds --ids=2008_000002,2008_000003 --print-summary

The port of the user fork's `scripts/repro_diagnose.py` (docs/user_fork.md §7 "Other tools"), for
JAX instead of PyTorch. The report holds:

* `environment`: the variables that change numerics or placement (CUDA_VISIBLE_DEVICES,
  XLA_FLAGS, JAX_*, XLA_*, TF_*, NCCL_*, TPU_*, PYTHONHASHSEED, OMP / MKL / OpenBLAS threads,
  ...); `packages`: the versions of the stack (importlib.metadata, nothing imported) and
  `all_packages` (every installed distribution, the fork's pip freeze); `jax`: version, backend,
  devices, process count and the precision settings (jax_default_matmul_precision,
  jax_enable_x64, the PRNG, ...); `nvidia_smi`; `git` (commit of this checkout); host, python,
  platform;
* `data` with `--data_dir` (+ `--dataset`, a path below it, e.g. a TFDS dataset directory
  `<name>/<config>/<version>`, or a raw root such as NYUD_MT/): the sha256 of every file (of its
  size and first + last MiB unless `--full-hash`; files up to 2 MiB are always hashed whole),
  per-directory and whole-tree digests, the split / id list files (*.txt, *.lst: full sha256 and
  line counts), TFDS split sizes, and with `--ids` each id's files;
* `examples` with `--config` (an ml_collections config, overrides as `--config.x=...`): the
  sha256 of the decoded features (image and labels, as `input_pipeline.open_data_source` returns
  them) of the `--ids` (the dataset's 'id' feature; finding them decodes the split) or of the
  first `--num_examples` examples of each of `--splits` (default: the config's train and eval
  splits). Without `--data_dir` the config's built TFDS directory is hashed as well;
* `findings`: warnings (e.g. float32 matmuls on a GPU at the default precision use TF32, as the
  fork's TF32 warning).

Written atomically to `--output` (default `reports/repro_diag_<host>_<timestamp>.json`); flags
also take the fork's dashed spelling (`--full-hash`, `--print-summary`).
"""

import datetime
import hashlib
import importlib.metadata
import json
import os
import platform
import shutil
import socket
import subprocess
import sys

SCHEMA = 1
_MIB = 1 << 20
_ENV_NAMES = ('CUDA_VISIBLE_DEVICES', 'CUBLAS_WORKSPACE_CONFIG', 'PYTHONHASHSEED',
              'OMP_NUM_THREADS', 'MKL_NUM_THREADS', 'OPENBLAS_NUM_THREADS', 'NUMEXPR_NUM_THREADS',
              'CUDA_DEVICE_ORDER', 'LD_LIBRARY_PATH', 'PYTHONPATH', 'TFDS_DATA_DIR')
_ENV_PREFIXES = ('JAX_', 'XLA_', 'TF_', 'NCCL_', 'TPU_', 'LIBTPU_', 'CUDA_', 'NVIDIA_', 'GRAIN_')
# Not reported (terraform shares the TF_ prefix), nor anything that looks like a secret.
_ENV_SKIP_PREFIXES = ('TF_VAR_', 'TF_TOKEN_', 'TF_CLI_')
_SECRET_WORDS = ('TOKEN', 'SECRET', 'PASSWORD', 'PASSWD', 'CREDENTIAL', 'API_KEY', 'AUTH')
PACKAGES = ('jax', 'jaxlib', 'jax-cuda12-plugin', 'jax-cuda12-pjrt', 'jax-cuda13-plugin',
            'jax-cuda13-pjrt', 'libtpu', 'flax', 'optax', 'orbax-checkpoint', 'chex', 'grain',
            'tensorflow-datasets', 'tensorflow', 'tensorflow-cpu', 'array-record', 'clu',
            'ml-collections', 'etils', 'numpy', 'scipy', 'scikit-image', 'opencv-python-headless',
            'opencv-python', 'pillow', 'h5py', 'safetensors', 'einops', 'absl-py',
            'nvidia-cudnn-cu12', 'nvidia-cublas-cu12', 'nvidia-cuda-runtime-cu12',
            'nvidia-nccl-cu12')
JAX_SETTINGS = ('jax_default_matmul_precision', 'jax_enable_x64', 'jax_default_prng_impl',
                'jax_threefry_partitionable', 'jax_numpy_rank_promotion',
                'jax_numpy_dtype_promotion', 'jax_default_dtype_bits', 'jax_platforms',
                'jax_enable_compilation_cache', 'jax_compilation_cache_dir',
                'jax_use_shardy_partitioner', 'jax_softmax_custom_jvp', 'jax_debug_nans',
                'jax_disable_jit')
_LIST_SUFFIXES = ('.txt', '.lst')


class ReproError(ValueError):
  """Bad input: printed as one `error:` line."""


# ------------------------------------------------------------------------------------------------
# Machine.


def _run(cmd: list[str], timeout: float = 20.0) -> dict:
  try:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
  except (OSError, subprocess.SubprocessError) as e:
    return {'cmd': ' '.join(cmd), 'error': f'{type(e).__name__}: {e}'}
  return {'cmd': ' '.join(cmd), 'returncode': proc.returncode, 'stdout': proc.stdout.rstrip(),
          'stderr': proc.stderr.strip()[-2000:]}


def environment() -> dict[str, str]:
  """The reproducibility-relevant environment variables that are set (none holding secrets)."""
  return {k: v for k, v in sorted(os.environ.items())
          if (k in _ENV_NAMES or k.startswith(_ENV_PREFIXES))
          and not k.startswith(_ENV_SKIP_PREFIXES) and not any(w in k for w in _SECRET_WORDS)}


def package_versions() -> tuple[dict[str, str | None], dict[str, str]]:
  """({package of the stack: version or None}, {every installed distribution: version})."""
  wanted = {}
  for name in PACKAGES:
    try:
      wanted[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      wanted[name] = None
  everything = {}
  for dist in importlib.metadata.distributions():
    name = dist.metadata['Name']
    if name:
      everything[name.lower()] = dist.version
  return wanted, dict(sorted(everything.items()))


def jax_info() -> dict:
  """Version, backend, devices, processes and precision settings of JAX (initialises it)."""
  try:
    import jax  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    return {'error': f'ImportError: {e}'}
  out = {'version': jax.__version__}
  settings = {}
  for name in JAX_SETTINGS:
    try:
      value = getattr(jax.config, name)
    except AttributeError:
      continue
    settings[name] = value if isinstance(value, (bool, int, float, str, type(None))) else str(
        value)
  out['settings'] = settings
  try:
    devices = jax.devices()
    out.update(
        backend=jax.default_backend(), process_count=jax.process_count(),
        process_index=jax.process_index(), device_count=jax.device_count(),
        local_device_count=jax.local_device_count(),
        devices=[{'id': d.id, 'platform': d.platform, 'device_kind': d.device_kind,
                  'process_index': d.process_index} for d in devices])
  except Exception as e:  # pylint: disable=broad-except  (no backend, bad JAX_PLATFORMS, ...)
    out['error'] = f'{type(e).__name__}: {e}'
  return out


def git_info() -> dict:
  """Commit and local changes of the mtl_jax checkout (None outside a git checkout)."""
  root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  if not shutil.which('git') or not os.path.exists(os.path.join(root, '.git')):
    return {'commit': None}
  commit = _run(['git', '-C', root, 'rev-parse', 'HEAD'])
  status = _run(['git', '-C', root, 'status', '--porcelain', '--untracked-files=no'])
  changed = status.get('stdout', '').splitlines()
  return {'commit': commit.get('stdout') or None, 'modified_files': len(changed),
          'modified': changed[:50]}


def nvidia_smi() -> dict | None:
  if not shutil.which('nvidia-smi'):
    return None
  return _run(['nvidia-smi', '--query-gpu=index,name,driver_version,memory.total,compute_cap',
               '--format=csv,noheader'])


# ------------------------------------------------------------------------------------------------
# Files.


def file_digest(path: str, full: bool) -> dict:
  """{'size', 'sha256', 'hashed'}: the whole file, or (unless `full`, for files > 2 MiB) its size
  and first and last MiB."""
  size = os.path.getsize(path)
  h = hashlib.sha256()
  with open(path, 'rb') as f:
    if full or size <= 2 * _MIB:
      for chunk in iter(lambda: f.read(_MIB), b''):
        h.update(chunk)
      hashed = 'all'
    else:
      h.update(f'size={size}\n'.encode())
      h.update(f.read(_MIB))
      f.seek(size - _MIB)
      h.update(f.read(_MIB))
      hashed = 'size+first+last MiB'
  return {'size': size, 'sha256': h.hexdigest(), 'hashed': hashed}


def _digest_lines(entries) -> str:
  h = hashlib.sha256()
  for rel, d in entries:
    h.update(f'{rel}\t{d["size"]}\t{d["sha256"]}\n'.encode())
  return h.hexdigest()


def hash_tree(root: str, full: bool = False, ids=(), max_listed: int = 5000) -> dict:
  """Digests of every file under `root` (relative paths, sorted), per directory and in all."""
  if not os.path.isdir(root):
    raise ReproError(f'data directory {root} does not exist; pass an existing --data_dir '
                     '(and --dataset below it)')
  rels = []
  for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
    dirnames.sort()
    rels += [os.path.relpath(os.path.join(dirpath, n), root) for n in sorted(filenames)]
  rels.sort()
  files = {rel: file_digest(os.path.join(root, rel), full) for rel in rels}
  dirs = {}
  for rel in rels:
    dirs.setdefault(os.path.dirname(rel) or '.', []).append(rel)
  out = {
      'root': os.path.abspath(root), 'full_hash': full, 'file_count': len(rels),
      'total_bytes': sum(d['size'] for d in files.values()),
      'tree_sha256': _digest_lines((rel, files[rel]) for rel in rels),
      'directories': {d: {'files': len(r), 'bytes': sum(files[x]['size'] for x in r),
                          'sha256': _digest_lines((x, files[x]) for x in r)}
                      for d, r in sorted(dirs.items())},
      'split_files': {},
  }
  for rel in rels:
    if rel.endswith(_LIST_SUFFIXES):
      path = os.path.join(root, rel)
      digest = file_digest(path, full=True)
      with open(path, errors='replace') as f:
        lines = [line.strip() for line in f if line.strip()]
      out['split_files'][rel] = {**digest, 'lines': len(lines), 'first': lines[:1]}
  info = os.path.join(root, 'dataset_info.json')
  if os.path.isfile(info):
    out['tfds'] = _tfds_info(info)
  if ids:
    out['ids'] = {}
    for image_id in ids:
      match = [r for r in rels if os.path.splitext(os.path.basename(r))[0] == image_id]
      out['ids'][image_id] = {r: file_digest(os.path.join(root, r), True)['sha256']
                              for r in match}
  if len(rels) <= max_listed:
    out['files'] = files
  else:
    out['files_omitted'] = (f'{len(rels)} files > {max_listed}: per-directory digests only '
                            '(raise --max_listed_files to list them)')
  return out


def _tfds_info(path: str) -> dict:
  try:
    with open(path) as f:
      info = json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    return {'error': f'{type(e).__name__}: {e}'}
  splits = {}
  for split in info.get('splits', []):
    splits[split.get('name')] = sum(int(n) for n in split.get('shardLengths', []))
  return {'name': info.get('name'), 'version': info.get('version'),
          'config': info.get('configName'), 'file_format': info.get('fileFormat'),
          'splits': splits}


# ------------------------------------------------------------------------------------------------
# Decoded examples.


def _array_digest(value) -> dict:
  import numpy as np  # pylint: disable=g-import-not-at-top
  if isinstance(value, bytes):
    return {'value': value.decode('utf-8', 'replace')}
  array = np.ascontiguousarray(value)
  h = hashlib.sha256(f'{array.dtype.str}{array.shape}'.encode())
  h.update(array.tobytes())
  return {'shape': list(array.shape), 'dtype': str(array.dtype), 'sha256': h.hexdigest()}


def _example_id(example) -> str | None:
  value = example.get('id') if hasattr(example, 'get') else None
  if value is None:
    return None
  return value.decode('utf-8', 'replace') if isinstance(value, bytes) else str(value)


def hash_examples(dataset_cfg, splits: list[str], ids=(), num_examples: int = 8) -> dict:
  """{split: {'size', 'examples': [{'index', 'id', 'features': {name: digest}}], 'missing'}}."""
  import ml_collections  # pylint: disable=g-import-not-at-top
  from mtl_jax import input_pipeline  # pylint: disable=g-import-not-at-top
  dataset_cfg = ml_collections.ConfigDict(dataset_cfg.to_dict())
  dataset_cfg.build_if_missing = False  # a diagnosis reads what is there, it builds nothing
  out = {}
  for split in splits:
    source = input_pipeline.open_data_source(dataset_cfg, split)
    picked, missing = [], []
    if ids:
      wanted = set(ids)
      found = {}
      for i in range(len(source)):
        example_id = _example_id(source[i])
        if example_id in wanted:
          found[example_id] = i
          if len(found) == len(wanted):
            break
      picked = [found[i] for i in ids if i in found]
      missing = [i for i in ids if i not in found]
    else:
      picked = list(range(min(num_examples, len(source))))
    examples = []
    for index in picked:
      example = source[index]
      examples.append({'index': index, 'id': _example_id(example),
                       'features': {k: _array_digest(v) for k, v in sorted(example.items())}})
    out[split] = {'size': len(source), 'examples': examples, 'missing_ids': missing}
  return out


# ------------------------------------------------------------------------------------------------
# Report.


def findings(report: dict) -> list[str]:
  """Warnings and notes about `report` (the fork's quick findings)."""
  out = []
  jax = report.get('jax', {})
  if 'error' in jax:
    out.append(f'[FAIL] JAX could not list its devices: {jax["error"]}')
  backend = jax.get('backend')
  precision = jax.get('settings', {}).get('jax_default_matmul_precision')
  if backend == 'gpu' and precision in (None, 'default', 'fastest', 'bfloat16', 'tensorfloat32',
                                        'bfloat16_3x'):
    out.append(f'[WARN] jax_default_matmul_precision={precision}: float32 matmuls and '
               'convolutions on this GPU may use TF32 (set JAX_DEFAULT_MATMUL_PRECISION=highest '
               'for strict reproducibility)')
  xla_flags = report.get('environment', {}).get('XLA_FLAGS', '')
  if backend == 'gpu' and 'deterministic_ops' not in xla_flags:
    out.append('[WARN] XLA_FLAGS has no --xla_gpu_deterministic_ops=true: GPU scatter / '
               'reductions may differ from run to run')
  if backend is not None:
    kinds = sorted({d['device_kind'] for d in jax.get('devices', [])})
    out.append(f'[INFO] jax {jax.get("version")} backend={backend} '
               f'devices={jax.get("device_count")} ({", ".join(kinds)}) '
               f'processes={jax.get("process_count")}')
  git = report.get('git', {})
  if git.get('modified_files'):
    out.append(f'[WARN] the mtl_jax checkout has {git["modified_files"]} modified tracked files '
               f'(commit {git.get("commit")})')
  data = report.get('data')
  if data:
    out.append(f'[INFO] data {data["root"]}: {data["file_count"]} files, {data["total_bytes"]} '
               f'bytes, tree sha256 {data["tree_sha256"][:16]}...'
               + ('' if data['full_hash'] else ' (head/tail hashes; --full-hash for content)'))
    empty = [rel for rel, d in data.get('ids', {}).items() if not d]
    if empty:
      out.append(f'[WARN] no file named after ids {", ".join(empty[:10])} under {data["root"]}')
  for split, s in (report.get('examples') or {}).items():
    if s['missing_ids']:
      out.append(f'[WARN] split {split}: ids not found: {", ".join(s["missing_ids"][:10])}')
  return out


def build_report(dataset_cfg=None, *, data_root: str | None = None, full_hash: bool = False,
                 ids=(), splits=(), num_examples: int = 8, max_listed: int = 5000) -> dict:
  """The whole report (the machine, and the data when given)."""
  wanted, everything = package_versions()
  now = datetime.datetime.now().astimezone()
  report = {
      'tool': 'mtl_jax.tools.repro_diagnose', 'schema': SCHEMA,
      'timestamp': now.isoformat(timespec='seconds'), 'host': socket.gethostname(),
      'python': sys.version, 'python_executable': sys.executable,
      'platform': platform.platform(), 'machine': platform.machine(),
      'cpu_count': os.cpu_count(), 'environment': environment(), 'packages': wanted,
      'all_packages': everything, 'jax': jax_info(), 'nvidia_smi': nvidia_smi(),
      'git': git_info(), 'ids': list(ids),
  }
  if dataset_cfg is not None:
    report['dataset_config'] = {'name': dataset_cfg.name, 'data_dir': dataset_cfg.get('data_dir')}
    report['examples'] = hash_examples(dataset_cfg, list(splits), ids, num_examples)
    if data_root is None:
      data_root = _tfds_dir(dataset_cfg)
  if data_root is not None:
    report['data'] = hash_tree(data_root, full_hash, ids, max_listed)
  report['how_to_compare'] = (
      'Run on both machines and diff the JSON files: environment, packages, jax (settings, '
      'devices), data.tree_sha256 then data.directories / data.files, data.split_files, '
      'examples (decoded features). A data or examples difference means the inputs differ.')
  report['findings'] = findings(report)
  return report


def _tfds_dir(dataset_cfg) -> str:
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  data_dir = dataset_cfg.get('data_dir') or tfds.core.constants.get_default_data_dir()
  return str(tfds.builder(dataset_cfg.name, data_dir=data_dir).data_dir)


def _read_ids(text: str) -> list[str]:
  """Comma list, or a file with one id per line ('#' comments)."""
  if text and os.path.isfile(text):
    with open(text) as f:
      return [line.strip() for line in f if line.strip() and not line.startswith('#')]
  return [i.strip() for i in (text or '').split(',') if i.strip()]


def default_output(host: str | None = None) -> str:
  host = (host or socket.gethostname()).replace(os.sep, '_')
  stamp = datetime.datetime.now().strftime('%Y%m%d_%H%M%S')
  return os.path.join('reports', f'repro_diag_{host}_{stamp}.json')


def _summary(report: dict, output: str) -> str:
  lines = [f'host {report["host"]}, python {report["python"].split()[0]}, '
           f'{report["platform"]}']
  jax = report['jax']
  lines.append(f'jax {jax.get("version")}, jaxlib {report["packages"].get("jaxlib")}, flax '
               f'{report["packages"].get("flax")}, backend {jax.get("backend")}')
  for split, s in (report.get('examples') or {}).items():
    lines.append(f'examples {split}: {len(s["examples"])} of {s["size"]} hashed')
  lines += [f'  {f}' for f in report['findings']]
  lines.append(f'report: {output}')
  return '\n'.join(lines)


def _normalise_argv(argv: list[str]) -> list[str]:
  """--full-hash -> --full_hash (the fork's spelling); --config.* overrides untouched."""
  out = []
  for arg in argv:
    if arg.startswith('--') and not arg.startswith('--config.'):
      name, eq, value = arg.partition('=')
      arg = '--' + name[2:].replace('-', '_') + eq + value
    out.append(arg)
  return out


def _define(fv, argv):
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  config_flags.DEFINE_config_file('config', None, 'Optional config file (configs/*.py[:args]): '
                                  'hash decoded examples of config.dataset.', flag_values=fv,
                                  lock_config=True, sys_argv=argv)
  flags.DEFINE_string('data_dir', None, 'Directory to hash (a TFDS data dir, or a raw dataset '
                      'root).', flag_values=fv)
  flags.DEFINE_string('dataset', None, 'Path below --data_dir to hash, e.g. '
                      'pascal_context/mtlora/1.0.0.', flag_values=fv)
  flags.DEFINE_string('ids', '', 'Example ids: a comma list or a file with one id per line.',
                      flag_values=fv)
  flags.DEFINE_integer('num_examples', 8, 'Without --ids: examples hashed per split (--config).',
                       lower_bound=0, flag_values=fv)
  flags.DEFINE_list('splits', None, 'Splits of --config to hash (default: its train and eval '
                    'splits).', flag_values=fv)
  flags.DEFINE_bool('full_hash', False, 'Hash whole files (default: size + first and last MiB of '
                    'files over 2 MiB).', flag_values=fv)
  flags.DEFINE_integer('max_listed_files', 5000, 'List per-file digests up to this many files.',
                       lower_bound=0, flag_values=fv)
  flags.DEFINE_string('output', None, 'Report path (default: reports/repro_diag_<host>_'
                      '<timestamp>.json).', flag_values=fv)
  flags.DEFINE_bool('print_summary', False, 'Print the findings.', flag_values=fv)


def main(argv=None) -> int:
  from absl import flags  # pylint: disable=g-import-not-at-top
  from mtl_jax.tools import tool_args  # pylint: disable=g-import-not-at-top
  argv = _normalise_argv(list(sys.argv[1:] if argv is None else argv))
  full_argv = ['repro_diagnose', *argv]
  fv = flags.FlagValues()
  _define(fv, full_argv)
  if any(a in ('-h', '--help', '--helpshort', '--helpfull') for a in argv):
    print(__doc__.strip() + '\n\nflags:\n' + fv.get_help(include_special_flags=False))
    return 0
  if not flags.FLAGS.is_parsed():  # absl-flag readers (grain) outside absl.app.run
    flags.FLAGS.mark_as_parsed()
  try:
    extra = fv(full_argv)[1:]
    if extra:
      raise ReproError(f'unexpected arguments {extra}; every option is a --flag (see --help)')
    config = fv.config
    if fv.dataset and not fv.data_dir:
      raise ReproError('--dataset is a path below --data_dir; give --data_dir too')
    data_root = None
    if fv.data_dir:
      data_root = os.path.expanduser(fv.data_dir)
      data_root = os.path.join(data_root, fv.dataset) if fv.dataset else data_root
      if not os.path.isdir(data_root):
        raise ReproError(f'{data_root} is not a directory; pass an existing --data_dir (and '
                         '--dataset below it)')
    ids = _read_ids(fv.ids)
    splits = fv.splits
    if config is not None and not splits:
      splits = list(dict.fromkeys([config.dataset.train_split, config.dataset.eval_split]))
    output = fv.output or default_output()
    report = build_report(config.dataset if config is not None else None, data_root=data_root,
                          full_hash=fv.full_hash, ids=ids, splits=splits or (),
                          num_examples=fv.num_examples, max_listed=fv.max_listed_files)
  except flags.Error as e:
    return tool_args.report(ReproError(f'{e} (see --help)'))
  except (ReproError, ValueError, OSError) as e:  # ConfigError / DatasetNotBuiltError included
    return tool_args.report(e)
  text = json.dumps(report, indent=2, ensure_ascii=False, default=str) + '\n'
  try:
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    tool_args.write_atomic(output, text)
  except OSError as e:
    return tool_args.report(ReproError(f'cannot write {output} ({e.strerror}); choose another '
                                       '--output'))
  if fv.print_summary:
    print(_summary(report, output))
  else:
    print(f'wrote {output}')
  return 0


def cli():
  """Entry point of the console script (pyproject.toml) and of `python -m`."""
  sys.exit(main())


if __name__ == '__main__':
  cli()
