"""The fork's front door: its yacs yamls (configs/fork_yaml.py, mtl_jax/fork_config.py) and its
main.py command line (mtl_jax/tools/fork_main.py), docs/fork_yaml.md.

The yamls are samples in the fork's layout, tests/fixtures/fork_yaml/configs (README there).
"""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from conftest import FIXTURES, ROOT, launch_env
from configs import fork_yaml
from configs import mtlora_nyud  # noqa: F401  (recipes compared below)
from configs import mtlora_pascal  # noqa: F401  (recipes compared below)
from configs import promlora_nyud  # noqa: F401
from configs import promlora_pascal  # noqa: F401
from configs import swin_nyud  # noqa: F401
from mtl_jax import ConfigError
from mtl_jax import fork_config
from mtl_jax import reporting
from mtl_jax import train
from mtl_jax.tools import delta_m
from mtl_jax.tools import fork_main

FORK = os.path.join(FIXTURES, 'fork_yaml', 'configs')
T = 'mtlora/tiny_448/'
# Set by the fork's command line (or its defaults when a yaml is read alone), not by the recipes.
CLI_KEYS = ('batch_size_per_device', 'eval_every_steps', 'checkpoint_every_steps',
            'log_every_steps', 'keep_period', 'fork_log')  # the last two: the fork's outputs


def _yaml(rel: str, args: str = ''):
  return fork_yaml.get_config(f'{args + "," if args else ""}path={os.path.join(FORK, rel)}')


def _recipe(module: str, arg: str):
  return sys.modules[f'configs.{module}'].get_config(arg)


def _flat(config) -> dict:
  out = {}

  def walk(node, prefix):
    for k, v in node.items():
      if isinstance(v, dict):
        walk(v, f'{prefix}{k}.')
      else:
        out[f'{prefix}{k}'] = v
  walk(json.loads(config.to_json_best_effort()), '')
  return out


# The meta-learning trainable set (LoRA only) with FREEZE_TS_LORA.
LORA_ONLY_NO_TS = ['^(?!.*/lora_(shared|tasks)_)', '^backbone/.*/lora_tasks_']
# (yaml, configs/fork_yaml.py args, recipe, recipe arg, values that differ from the recipe)
MAPPED = [
    # The user's six (docs/user_fork.md: README commands A-E, the MAML example, the eval).
    (T + 'mtlora_tiny_448_r64_scale4_pertask.yaml', '', 'mtlora_pascal', '', {}),
    (T + 'mtlora_tiny_448_r64_scale4_pertask_maml.yaml', '', 'mtlora_pascal',
     'method=maml,recipe=lora_only', {}),
    (T + 'mtlora_tiny_448_r64_scale4_pertask_stage2.yaml', '', 'mtlora_pascal',
     'recipe=freeze_ta_lora', {}),
    # The README's path from before the fork moved it into pascal/.
    (T + 'promlora_tiny_448_r32_prom50_scale4_pertask.yaml', '', 'promlora_pascal',
     'rank=32,tokens=50', {}),
    ('mtlora/base_448/pascal/promlora_base_448_r64_prom60_scale4_pertask.yaml', '',
     'promlora_pascal', 'variant=B,rank=64,tokens=60', {}),
    ('swin/tiny_448/nyud/swin_tiny_patch4_window7_448_nyud_alltask_decoder.yaml',
     'freeze_backbone', 'swin_nyud', 'recipe=freeze_backbone,tasks=semseg+normals+depth', {}),
    # Every mapped key family.
    (T + 'nyud/promlora_tiny_448_r64_prom60_scale4_pertask_nyud.yaml', '', 'promlora_nyud',
     'rank=64,tokens=60,tasks=semseg+normals+depth', {'input.crop_size': [448, 576]}),
    (T + 'pascal/promlora_shared_prompt_tiny_448_r64_prom50_scale4_pertask.yaml', '',
     'promlora_pascal', 'rank=64,tokens=50,shared_prompt', {}),
    (T + 'pascal/promlora_dynamic_tiny_448_r64_prom50_multi-pool[12,12,16, 24]_scale4_pertask'
     '.yaml', '', 'promlora_pascal', 'rank=64,tokens=50,dynamic,pools=12+12+16+24', {}),
    (T + 'pascal/vpt_deep_TASK_tiny_448_prom50_scale4_pertask.yaml', '', 'promlora_pascal',
     'rank=0,tokens=50', {}),
    (T + 'mtlora_tiny_448_r64_scale4_pertask_stage1.yaml', '', 'mtlora_pascal',
     'recipe=freeze_ts_lora', {}),
    (T + 'mtlora_tiny_448_r64_onlyta_scale4_pertask.yaml', 'tasks=semseg+sal', 'mtlora_pascal',
     'tasks=semseg+sal', {'model.mtlora.shared_mode': 'lora_only', 'model.mtlora.task_rank': [0]}),
    (T + 'mtlora_tiny_448_r64_scale4_pertask_with_cr.yaml', '', 'mtlora_pascal', '',
     {'conflict.every_steps': 50}),
    (T + 'mtlora_tiny_448_r64_scale4_pertask_maml_freeze_ts.yaml', '', 'mtlora_pascal',
     'method=maml,recipe=lora_only',
     {'maml.inner_lr': 0.0005, 'frozen': LORA_ONLY_NO_TS}),
    (T + 'mtlora_tiny_448_r64_scale4_pertask_metasgd.yaml', '', 'mtlora_pascal',
     'method=metasgd,recipe=lora_only',
     {'frozen': LORA_ONLY_NO_TS}),
    (T + 'mtlora_tiny_448_r64_scale4_pertask_reptile.yaml', '', 'mtlora_pascal',
     'method=reptile,recipe=lora_only', {}),
    (T + 'mtlora_tiny_448_r64_scale4_pertask_taml.yaml', '', 'mtlora_pascal',
     'method=taml,recipe=lora_only',
     {'taml.lam': 0.1, 'frozen': LORA_ONLY_NO_TS}),
]


@pytest.mark.parametrize('rel, args, module, arg, differ', MAPPED,
                         ids=[os.path.basename(m[0]) for m in MAPPED])
def test_fork_yaml_maps_onto_the_recipe(rel, args, module, arg, differ):
  """Every key of the imported config equals the recipe's, except the documented ones the fork's
  command line sets; with the fork's defaults those are per device batch 128 and an eval and a
  checkpoint every epoch."""
  got, want = _flat(_yaml(rel, args)), _flat(_recipe(module, arg))
  for key, value in differ.items():
    assert got[key] == value, key
  assert set(got) == set(want)
  wrong = {k: (got[k], want[k]) for k in got
           if got[k] != want[k] and k not in CLI_KEYS and k not in differ}
  assert not wrong
  config = _yaml(rel, args)
  assert config.batch_size_per_device == 128 and config.log_every_steps == 10
  resolved = train.resolve_batch_size(config, 2)
  steps_per_epoch = {'pascal_context': 4998, 'nyud_v2': 795}[config.dataset.name] // 256
  assert resolved.batch_size == 256 and resolved.batch_size_per_device == 0
  assert resolved.eval_every_steps == resolved.checkpoint_every_steps == steps_per_epoch
  assert resolved.keep_period == resolved.checkpoint_every_steps  # every checkpoint kept
  assert config.fork_log == fork_config.load(os.path.join(FORK, rel))['MODEL']['NAME']
  assert resolved.total_steps == 300 * steps_per_epoch
  np.testing.assert_allclose(resolved.optimizer.learning_rate, 256 * 5e-4 / 512)


def test_yaml_reading_follows_yacs():
  cfg = fork_config.load(os.path.join(FORK, T, 'mtlora_tiny_448_r64_scale4_pertask_maml.yaml'))
  assert cfg['TRAIN']['BASE_LR'] == 5e-4  # YAML 1.1 reads `5e-4` as a string; yacs decodes it
  assert cfg['DATA']['IMG_SIZE'] == [448, 448]
  # BASE: the base file first, then the file's own keys.
  cfg = fork_config.load(os.path.join(FORK, T, 'pascal/unipora_prune_stage1_base_p10.yaml'))
  assert cfg['MODEL']['PROMPT']['NUM_TOKENS'] == 60 and cfg['TAG'] == 'unipora_ta_prompt_pruning'
  assert [os.path.basename(f) for f in cfg['__files__']] == [
      'promlora_tiny_448_r64_prom60_scale4_pertask.yaml', 'unipora_prune_stage1_base_p10.yaml']
  # Both locations of a PASCAL config (before and after the fork's pascal/ move).
  old = fork_config.load(os.path.join(FORK, T, 'pascal',
                                      'mtlora_tiny_448_r64_scale4_pertask_maml.yaml'))
  assert old['MODEL']['MTLORA']['MAML_MODE']


UNIMPLEMENTED = [
    ('dora_tiny_448_start96_to64.yaml', 'MODEL.MTLORA.ADAPTIVE=True'),
    ('mtlora_tiny_448_r64_scale4_pertask_reinforce.yaml', 'RL.ENABLED=True'),
    ('mtlora_tiny_448_r64_scale4_pertask_conv_adapter.yaml', 'MODEL.CONV_ADAPTER.ENABLED=True'),
    ('mtlora_tiny_448_r64_scale4_pertask_cotodrop.yaml', 'COTODROP.ENABLED=True'),
    ('mtlora_tiny_448_r64_scale4_pertask_dynamic.yaml', 'MODEL.MTLORA.DYNAMIC_TS_LORA=True'),
    ('mtlora_tiny_448_r64_scale4_pertask_adalora.yaml', 'MODEL.MTLORA.ADALORA.ENABLED=True'),
    ('mtlora_tiny_448_r64_scale4_pertask_r4_blockmask.yaml', 'MODEL.MTLORA.TASK_LORA_BLOCKS='),
    ('mtlora_tiny_448_r64_scale4_taskvector.yaml', "MODEL.MTLORA.SHARED_MODE='task_vector'"),
    ('mtlora_tiny_448_r64_scale4_pertask_stage2_tsadapter.yaml', 'MODEL.MTLORA.TS_ADAPTER=True'),
    ('mtlora_vpt_tiny_448_r64_scale4_pertask.yaml', "SHARED_MODE='matrix' with MODEL.PROMPT"),
    ('pascal/mtlora_tiny_448_r64_scale4_pertask_constrained_sal.yaml',
     'TRAIN.CONSTRAINED_MTL.ENABLED=True'),
    ('pascal/ema_gated_mtlora_tiny_448_r64_ts4_stage_last_shared_bias.yaml',
     'MODEL.MTLORA.EMA_GATE.ENABLED=True'),
    ('pascal/mtlora_tiny_448_r64_scale4_pertask_with_pa_col_LAMBDA_1e-1.yaml',
     'MODEL.MTLORA.ENABLE_PRINCIPAL_ANGLE_REG=True'),
    ('pascal/mtlora_tiny_448_r64_scale4_pertask_with_ts_shared_complement.yaml',
     'MODEL.MTLORA.ENABLE_TS_SHARED_COMPLEMENT=True'),
    ('pascal/mtlora_tiny_448_r64_scale4_pertask_ours.yaml', 'MODEL.MTLORA.USE_OURS=True'),
    ('pascal/unipora_prune_stage1_base_p10.yaml', 'PRUNING.ENABLED=True'),
]


@pytest.mark.parametrize('rel, key', UNIMPLEMENTED, ids=[u[0] for u in UNIMPLEMENTED])
def test_unimplemented_settings_are_one_line_errors_unless_allowed(rel, key):
  with pytest.raises(ConfigError) as e:
    _yaml(T + rel)
  message = str(e.value)
  assert key in message and '--allow_unimplemented' in message and '\n' not in message
  assert _yaml(T + rel, 'allow_unimplemented').model.name in ('mtlora', 'promlora')


@pytest.mark.parametrize('rel, match', [
    ('bad/unknown_key.yaml', "unknown key 'MODEL.MTLORA.RANK_PER_STAGE'"),
    ('bad/wrong_type.yaml', "TRAIN.EPOCHS='three hundred' has the wrong type"),
    ('bad/not_yaml.yaml', 'not valid YAML'),
    ('bad/missing.yaml', 'not found'),
])
def test_bad_yaml_is_a_one_line_error(rel, match):
  with pytest.raises(ConfigError, match=match) as e:
    _yaml(rel)
  assert '\n' not in str(e.value)


def test_launch_reads_a_fork_yaml_and_rejects_bad_ones(tmp_path):
  """`launch.py --config=X.yaml`: one `error:` line, exit 1, nothing written."""
  for rel, match in (('bad/unknown_key.yaml', 'RANK_PER_STAGE'),
                     (T + 'dora_tiny_448_start96_to64.yaml', 'MODEL.MTLORA.ADAPTIVE=True')):
    result = subprocess.run(
        [sys.executable, os.path.join(ROOT, 'launch.py'), f'--config={os.path.join(FORK, rel)}',
         f'--workdir={tmp_path / "run"}'], capture_output=True, text=True, env=launch_env(),
        check=False)
    assert result.returncode == 1, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith('error:') and match in last, result.stderr
    assert not (tmp_path / 'run').exists()


# -- main.py's command line ------------------------------------------------------------------------

def _readme(command: str, tmp_path) -> list[str]:
  """A command of the fork's README with its program replaced and the paths made local."""
  argv = command.split()
  argv = argv[argv.index('torch.distributed.launch') + 1:]
  out = []
  for a in argv:
    if a.startswith('configs/') or a.startswith('--cfg='):
      a = os.path.join(FORK, a[len('configs/'):])
    out.append(a)
  return out


@pytest.fixture
def run_dirs(tmp_path):
  """Stand-ins for the README's checkpoint paths: directories that exist."""
  for d in ('ckpt_maml', 'ckpt_base', 'backbone_t', 'backbone_b', 'mtlora_weights'):
    (tmp_path / d).mkdir()
  return tmp_path


README = {
    'A': ('python -m torch.distributed.launch --nproc_per_node 2 --master_port 29502 main.py '
          '--cfg configs/mtlora/tiny_448/mtlora_tiny_448_r64_scale4_pertask_stage2.yaml '
          '--pascal PASCAL_MT --tasks semseg,normals,sal,human_parts --batch-size 32 '
          '--resume {d}/ckpt_maml --eval'),
    'B': ('python -m torch.distributed.launch --nproc_per_node 2 --master_port 29501 main.py '
          '--cfg configs/mtlora/tiny_448/promlora_tiny_448_r32_prom50_scale4_pertask.yaml '
          '--pascal PASCAL_MT --tasks semseg,normals,sal,human_parts --batch-size 12 '
          '--ckpt-freq=20 --eval-freq=5 --epochs=300 --resume-backbone {d}/backbone_t'),
    'C': ('python -m torch.distributed.launch --nproc_per_node 1 --master_port 29501 main.py '
          '--cfg configs/mtlora/base_448/pascal/promlora_base_448_r64_prom60_scale4_pertask.yaml '
          '--pascal PASCAL_MT --tasks semseg,normals,sal,human_parts --batch-size 8 '
          '--ckpt-freq=20 --eval-freq=5 --epochs=100 --resume {d}/ckpt_base'),
    'D': ('python -m torch.distributed.launch --nproc_per_node 1 --master_port 29501 main.py '
          '--cfg configs/swin/tiny_448/nyud/swin_tiny_patch4_window7_448_nyud_alltask_decoder.yaml '
          '--freeze-backbone --nyud NYUV2 --tasks semseg,normals,depth --batch-size 32 '
          '--ckpt-freq=20 --eval-freq=5 --epochs=300 --resume-backbone {d}/backbone_t'),
    'E': ('python -m torch.distributed.launch --nproc_per_node 1 --master_port 29501 main.py '
          '--cfg configs/mtlora/base_448/pascal/promlora_base_448_r64_prom60_scale4_pertask.yaml '
          '--pascal PASCAL_MT --tasks semseg,normals,sal,human_parts --batch-size 16 '
          '--ckpt-freq=20 --eval-freq=5 --epochs=300 --resume-backbone {d}/backbone_b'),
    'maml': ('python -m torch.distributed.launch --nproc_per_node 1 --master_port 29511 main.py '
             '--cfg configs/mtlora/tiny_448/mtlora_tiny_448_r64_scale4_pertask_maml.yaml '
             '--pascal PASCAL_MT --tasks semseg,normals,sal,human_parts --batch-size 8 '
             '--epochs 300 --resume-backbone {d}/backbone_t'),
    'eval': ('python -m torch.distributed.launch --nproc_per_node 1 --master_port 29502 main.py '
             '--cfg configs/mtlora/tiny_448/mtlora_tiny_448_r64_scale4_pertask.yaml '
             '--pascal PASCAL_MT --tasks semseg,normals,sal,human_parts --batch-size 32 '
             '--resume {d}/mtlora_weights --eval'),
}
PASCAL4 = 'semseg,normals,sal,human_parts'
# command: (recipe, recipe arg, devices, per-device batch, epochs, eval / checkpoint every N
#           epochs, mode, init source, weights to evaluate, run directory name)
EXPECTED = {
    'A': ('mtlora_pascal', 'recipe=freeze_ta_lora', 2, 32, 300, 5, 5, 'eval', None, 'ckpt_maml',
          'mtlora_tiny_448_r64_scale4_pertask_stage2'),
    'B': ('promlora_pascal', 'rank=32,tokens=50', 2, 12, 300, 5, 20, 'train', 'backbone_t', None,
          'promlora_tiny_448_r32_prom50_scale4_pertask'),
    'C': ('promlora_pascal', 'variant=B,rank=64,tokens=60,epochs=100', 1, 8, 100, 5, 20, 'train',
          'ckpt_base', None, 'promlora_base_448_r64_prom60_scale4_pertask'),
    'D': ('swin_nyud', 'recipe=freeze_backbone,tasks=semseg+normals+depth', 1, 32, 300, 5, 20,
          'train', 'backbone_t', None, 'swin_tiny_patch4_window7_448_nyud_alltask_decoder'),
    'E': ('promlora_pascal', 'variant=B,rank=64,tokens=60', 1, 16, 300, 5, 20, 'train',
          'backbone_b', None, 'promlora_base_448_r64_prom60_scale4_pertask'),
    'maml': ('mtlora_pascal', 'method=maml,recipe=lora_only', 1, 8, 300, 5, 5, 'train',
             'backbone_t', None, 'mtlora_tiny_448_r64_scale4_pertask-maml'),
    'eval': ('mtlora_pascal', '', 1, 32, 300, 5, 5, 'eval', None, 'mtlora_weights',
             'mtlora_tiny_448_r64_scale4_pertask'),
}


@pytest.mark.parametrize('name', list(README))
def test_readme_command_resolves_to_the_recipe(name, run_dirs, monkeypatch):
  """Each command of the fork's README, with `main.py`'s launcher kept and only the program
  name changed: the resolved config equals the recipe's with the command's batch, epochs,
  intervals and init / resume source."""
  monkeypatch.chdir(run_dirs)
  module, arg, devices, batch, epochs, eval_every, ckpt_every, mode, init, weights, name_dir = (
      EXPECTED[name])
  config, workdir, got_mode, got_weights = fork_main.resolve(
      _readme(README[name].format(d=run_dirs), run_dirs))
  assert got_mode == mode and workdir == os.path.join('output', name_dir, 'default')
  assert got_weights == (str(run_dirs / weights) if weights else None)
  assert config.init_from == (str(run_dirs / init) if init else '')
  assert config.init_opt_state == (name == 'C') and config.init_schedule == 'restart'
  want = _recipe(module, arg)
  assert config.dataset.data_dir == str(run_dirs / ('NYUV2' if name == 'D' else 'PASCAL_MT'))
  resolved = train.resolve_batch_size(config, devices)
  global_batch = batch * devices
  steps_per_epoch = {'pascal_context': 4998, 'nyud_v2': 795}[want.dataset.name] // global_batch
  assert resolved.batch_size == global_batch
  assert resolved.total_steps == epochs * steps_per_epoch
  assert resolved.eval_every_steps == eval_every * steps_per_epoch
  assert resolved.checkpoint_every_steps == ckpt_every * steps_per_epoch
  assert resolved.schedule.warmup_steps == 20 * steps_per_epoch
  np.testing.assert_allclose(resolved.optimizer.learning_rate, global_batch * 5e-4 / 512)
  want.batch_size = global_batch
  got, expect = _flat(resolved), _flat(want)
  ignore = CLI_KEYS + ('total_steps', 'init_from', 'init_opt_state', 'dataset.data_dir')
  wrong = {k: (got[k], expect[k]) for k in got if got[k] != expect[k] and k not in ignore}
  assert not wrong
  assert resolved.tasks == (PASCAL4 if name != 'D' else 'semseg,normals,depth')


@pytest.mark.parametrize('argv, match', [
    (['--pascal', 'P'], 'the following arguments are required: --cfg'),
    (['--cfg', 'x.yaml', '--pascal', 'P', '--nyud', 'N'], 'one of --pascal and --nyud'),
    (['--cfg', 'x.yaml', '--tasks', 'shared,semseg'], "'shared' is a reserved task name"),
    (['--cfg', os.path.join(FORK, T, 'mtlora_tiny_448_r64_scale4_pertask.yaml'),
      '--opts', 'TRAIN.EPOCHS'], 'KEY VALUE pairs'),
    (['--cfg', os.path.join(FORK, T, 'mtlora_tiny_448_r64_scale4_pertask.yaml'),
      '--opts', 'TRAIN.EPOCH', '3'], "unknown key 'TRAIN.EPOCH'"),
    (['--cfg', os.path.join(FORK, T, 'mtlora_tiny_448_r64_scale4_pertask.yaml'), '--eval'],
     '--eval evaluates --resume'),
    (['--cfg', os.path.join(FORK, T, 'mtlora_tiny_448_r64_scale4_pertask.yaml'),
      '--resume', 'missing.pth'], 'missing.pth not found'),
    (['--cfg', os.path.join(FORK, T, 'mtlora_tiny_448_r64_scale4_pertask.yaml'),
      '--accumulation-steps', '2'], 'TRAIN.ACCUMULATION_STEPS=2'),
    (['--cfg', os.path.join(FORK, T, 'mtlora_tiny_448_r64_scale4_pertask.yaml'),
      '--freeze-backbone'], 'MTLORA.ENABLED False'),
])
def test_fork_main_bad_input_is_one_error_line(argv, match, tmp_path, capsys, monkeypatch):
  monkeypatch.chdir(tmp_path)
  with pytest.raises(SystemExit) as e:
    sys.exit(fork_main.main(argv))
  assert e.value.code in (1, 2)
  err = capsys.readouterr().err.strip().splitlines()
  assert match in err[-1] and 'error' in err[-1], err
  assert not any(tmp_path.iterdir()), 'bad input writes nothing'


def test_opts_set_fork_keys_as_yacs_does(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  config, _, _, _ = fork_main.resolve([
      '--cfg', os.path.join(FORK, T, 'mtlora_tiny_448_r64_scale4_pertask.yaml'), '--pascal', 'P',
      '--tasks', 'semseg, sal', '--opts', 'MODEL.MTLORA.R_PER_TASK.shared', '[16]',
      'TRAIN.BASE_LR', '1e-3', 'DATA.IMG_SIZE', '224', '--seed', '3',
      '--skip_initial_validation', '--disable_amp',
      '--tag', 'x', '--name', 'y', '--local-rank', '0'])
  assert config.model.mtlora.rank == (16,) and config.tasks == 'semseg,sal'
  assert config.input.crop_size == (224, 224) and config.seed == 3
  assert not config.eval_at_start and config.model.dtype == 'float32'
  np.testing.assert_allclose(train.resolve_batch_size(config, 1).optimizer.learning_rate,
                             128 * 1e-3 / 512)


@pytest.mark.slow
def test_fork_main_trains_from_a_backbone_pth_then_evaluates(tfds_dir, tmp_path, monkeypatch):
  """The MAML example's flags (yaml, --pascal, --tasks, --batch-size, --epochs,
  --resume-backbone FILE.pth) with --smoke: the .pth (an ImageNet Swin of the smoke model's
  shapes) is converted once into output/converted and trains; then `--resume RUN --eval`
  evaluates the run's weights into the eval run's directory."""
  from mtl_jax.convert import mtlora as mtlora_convert  # pylint: disable=g-import-not-at-top
  from mtl_jax.convert import keys  # pylint: disable=g-import-not-at-top
  from test_convert import save_pth  # pylint: disable=g-import-not-at-top
  monkeypatch.chdir(tmp_path)
  cfg = os.path.join(FORK, T, 'mtlora_tiny_448_r64_scale4_pertask.yaml')
  base = ['--cfg', cfg, '--pascal', tfds_dir, '--tasks', 'semseg,normals', '--smoke']
  config, _, _, _ = fork_main.resolve(base)
  rng = np.random.default_rng(0)
  params, stats = jax.tree.map(lambda a: rng.normal(0, 0.02, a.shape).astype(np.float32),
                               keys.abstract_weights(config))
  weights = {'params': params, 'batch_stats': stats}
  state_dict = mtlora_convert.imagenet_to_torch(weights, config)
  save_pth(tmp_path / 'swin_smoke.pth', {'model': state_dict})

  def fork_main_cli(*args):  # the console command, on 2 simulated devices
    subprocess.run([sys.executable, '-m', 'mtl_jax.tools.fork_main', *base, *args],
                   check=True, capture_output=True, cwd=tmp_path, env=dict(
                       launch_env(), PYTHONPATH=ROOT))

  fork_main_cli('--batch-size', '2', '--epochs', '300', '--resume-backbone', 'swin_smoke.pth')
  run = tmp_path / 'output' / 'mtlora_tiny_448_r64_scale4_pertask' / 'default'
  converted = list((tmp_path / 'output' / 'converted').iterdir())
  assert [c.name.split('-')[0] for c in converted] == ['swin_smoke']
  assert max(l['step'] for l in reporting.read_metrics(run)) == 6
  # log_rank0.txt, read by the fork's compute_delta_m parser, has metrics.jsonl's evals (at the
  # fork's printed precision): the initial validation, then one after each 3-step epoch.
  evals = [l for l in reporting.read_metrics(run) if 'eval/semseg/miou' in l]
  records = delta_m.read_fork_log(str(run / 'log_rank0.txt'))
  assert [epoch for epoch, _ in records] == [None, 0, 1]
  assert [m for _, m in records] == [{'semseg': round(e['eval/semseg/miou'], 4),
                                      'normals': round(e['eval/normals/mean'], 4)} for e in evals]

  fork_main_cli('--resume', str(run), '--eval', '--tag', 'eval')
  with open(run.parent / 'eval' / reporting.EVAL_METRICS_FILE) as f:
    evaluated = [json.loads(line) for line in f]
  final = [l for l in reporting.read_metrics(run) if 'eval/semseg/miou' in l][-1]
  assert evaluated[-1]['eval/semseg/miou'] == final['eval/semseg/miou']


def test_fork_yaml_argv_rewrites_only_yaml_configs():
  from configs.fork_yaml import FORK_YAML, launch_argv as fork_yaml_argv  # pylint: disable=g-import-not-at-top
  argv = ['launch.py', '--config=a/b,c [1, 2].yaml', '--allow_unimplemented', '--workdir=w']
  assert fork_yaml_argv(argv)[1] == (
      f'--config={FORK_YAML}:allow_unimplemented,path=a/b,c [1, 2].yaml')
  assert fork_yaml_argv(['x', '--config=configs/demo.py:smoke']) == [
      'x', '--config=configs/demo.py:smoke']


def test_resume_from_a_fork_pth_takes_its_adamw_moments_by_parameter_order(tfds_dir, tmp_path,
                                                                           monkeypatch):
  """A fork `ckpt_epoch_N.pth` with an `optimizer` entry: the AdamW state indices follow the
  fork's groups (decayed = not 1-D and not `.bias`, then the rest, each in state-dict order);
  frozen parameters have no entry. After `--resume`, every trainable leaf's mu / nu are the
  converted exp_avg / exp_avg_sq (here 0.5 W + 1 and W², which commute with the layout changes),
  zero where the fork had no entry, Adam's count is the fork's step and the schedule restarts."""
  from mtl_jax.convert import mtlora as mtlora_convert  # pylint: disable=g-import-not-at-top
  from mtl_jax.convert import keys  # pylint: disable=g-import-not-at-top
  from test_convert import save_pth  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  monkeypatch.chdir(tmp_path)
  base = ['--cfg', os.path.join(FORK, T, 'mtlora_tiny_448_r64_scale4_pertask.yaml'), '--pascal',
          tfds_dir, '--tasks', 'semseg,normals', '--smoke']
  config, _, _, _ = fork_main.resolve(base)
  rng = np.random.default_rng(0)
  params, stats = jax.tree.map(lambda a: rng.normal(0, 0.02, a.shape).astype(np.float32),
                               keys.abstract_weights(config))
  sd = mtlora_convert.to_torch({'params': params, 'batch_stats': stats}, config)
  buffers = ('relative_position_index', 'attn_mask', 'running_mean', 'running_var',
             'num_batches_tracked')
  names = [k for k in sd if k.rsplit('.', 1)[-1] not in buffers]
  decayed = [k for k in names if sd[k].ndim > 1 and not k.endswith('.bias')]
  order = decayed + [k for k in names if k not in decayed]
  with_state = [i for i, k in enumerate(order) if 'lora_' in k or 'decoders' in k]
  state = {i: {'step': np.array(7.0, np.float32), 'exp_avg': 0.5 * sd[order[i]] + 1,
               'exp_avg_sq': np.square(sd[order[i]])} for i in with_state}
  groups = [{'params': list(range(len(decayed))), 'weight_decay': 0.05},
            {'params': list(range(len(decayed), len(order))), 'weight_decay': 0.0}]
  save_pth(tmp_path / 'ckpt_epoch_3.pth', {'model': sd, 'epoch': 3, 'optimizer': {
      'state': state, 'param_groups': groups}})

  config, workdir, _, _ = fork_main.resolve(base + ['--resume', 'ckpt_epoch_3.pth'])
  assert config.init_opt_state and config.init_schedule == 'restart'
  trainer = train.Trainer(config, workdir, jax.devices()[:1])
  loaded = trainer.load_optimizer_state(trainer.init_state(), config.init_from)
  adam = [s for s in jax.tree.leaves(loaded.opt_state,
                                     is_leaf=lambda x: isinstance(x, optax.ScaleByAdamState))
          if isinstance(s, optax.ScaleByAdamState)]
  assert len(adam) == 1 and int(adam[0].count) == 7 and int(loaded.step) == 0
  weights = keys.flatten(jax.device_get(loaded.params))
  mu, nu = keys.flatten(jax.device_get(adam[0].mu)), keys.flatten(jax.device_get(adam[0].nu))
  moved = {p for p in weights if 'lora_' in p or p.startswith('heads/')}  # torch decoders.*
  assert moved and set(mu) == set(weights)
  for p, w in weights.items():
    if p in moved:
      np.testing.assert_allclose(mu[p], 0.5 * w + 1, rtol=1e-6, err_msg=p)
      np.testing.assert_allclose(nu[p], np.square(w), rtol=1e-6, err_msg=p)
    else:
      assert not np.any(mu[p]) and not np.any(nu[p]), p
  # An optimizer state of another layout (one parameter short): the weights only (a warning).
  groups[1]['params'].pop()
  save_pth(tmp_path / 'other.pth', {'model': sd, 'optimizer': {'state': state,
                                                                 'param_groups': groups}})
  config, _, _, _ = fork_main.resolve(base + ['--resume', 'other.pth'])
  assert config.init_from and not config.init_opt_state
  assert not os.path.exists(os.path.join(config.init_from, 'adamw.npz'))
