"CLI tests of f-distill (`fdistill_train`, `python -m distill_nb.fdistill`): help, presets, FastGen's spellings, a 2-step run, one-line errors."
import json, os, subprocess, sys
from pathlib import Path
import numpy as np
import pytest
import torch

from distill_nb.checkpoints import save_network, read_network_meta
from distill_nb.callbacks import read_metrics
from distill_nb.config import parse_config
from distill_nb.core import UserError
from distill_nb.dmd2 import ToyEDMDenoiser
from distill_nb.fdistill import FDistillConfig, FDISTILL_ALIASES, FDISTILL_PRESETS

ROOT = Path(__file__).resolve().parents[1]


def _env():
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get('PYTHONPATH', ''), OMP_NUM_THREADS='1', WANDB_MODE='disabled')
    env.pop('WORLD_SIZE', None); env.pop('RANK', None)
    return env


def _run(*args):
    return subprocess.run([sys.executable, '-m', 'distill_nb.fdistill', *map(str, args)], capture_output=True, text=True, env=_env(),
                          cwd=ROOT, timeout=300)


def _one_line_error(r):
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith('fdistill_train: error: ') and 'Traceback' not in r.stderr, r.stderr
    return lines[0]


@pytest.fixture(scope='module')
def files(tmp_path_factory):
    from distill_nb.data.lmdb_dataset import write_lmdb
    d = tmp_path_factory.mktemp('fd')
    torch.manual_seed(0)
    teacher = save_network(ToyEDMDenoiser(8, 3, 10, 8), d / 'teacher.safetensors')
    rng = np.random.default_rng(0)
    write_lmdb(d / 'real.lmdb', [(rng.integers(0, 256, (3, 8, 8), dtype=np.uint8), i % 10) for i in range(16)])
    return teacher, d / 'real.lmdb'


def _parse(argv, ws=1):
    return parse_config(FDistillConfig, [str(a) for a in argv], FDISTILL_ALIASES, FDISTILL_PRESETS, world_size=ws)


def test_help():
    r = _run('--help')
    assert r.returncode == 0, r.stderr[-2000:]
    for flag in ('--f_div', '--ratio_lower', '--ratio_upper', '--ratio_normalization', '--bin_num', '--ratio_ema_rate', '--dm_eps',
                 '--preset', '--student_update_freq', '--gan_loss_weight_gen', '--teacher'):
        assert flag in r.stdout, flag
    assert 'f-divergence distribution matching' in ' '.join(r.stdout.split())  # the description, however argparse wraps it


@pytest.mark.parametrize('preset, want', [('cifar10-cond', dict(f_div='kl', batch=2048, steps=80_000, generator_lr=1e-4, gen_cls_loss_weight=1e-3,
                                                                 ratio_ema_rate=0., dfake_gen_update_ratio=4, label_dim=10, ema=11356.)),
                                          ('imagenet64', dict(f_div='js', batch=512, steps=480_000, generator_lr=2e-6, gen_cls_loss_weight=3e-3,
                                                              ratio_ema_rate=0.5, dfake_gen_update_ratio=4, label_dim=1000, ema=2839.))])
def test_print_config_preset(preset, want):
    r = _run('--print_config', '--preset', preset, '--real_image_path', 'R.lmdb', '--teacher', 'T.pkl')
    assert r.returncode == 0, r.stderr[-2000:]
    c = json.loads(r.stdout)
    assert {k: c[k] for k in want} == want
    assert (c['gan_classifier'], c['diffusion_gan'], c['diffusion_gan_max_timestep'], c['max_grad_norm'], c['warmup_step']) == (True, True, 1000, 10., 0)
    assert (c['min_step_percent'], c['max_step_percent'], c['conditioning_sigma'], c['precision']) == (0.002, 0.998, 80., 'fp32')


def test_fastgen_spellings_and_world_size():
    "FastGen's per-GPU batch x processes = the global --batch; student_update_freq N = N - 1 critic updates per generator update."
    c = _parse(['--preset', 'imagenet64', '--batch_size', 32, '--student_update_freq', 5, '--gan_loss_weight_gen', 3e-3, '--grad_norm', 10,
                '--real_image_path', 'R'], ws=16)
    assert (c.batch, c.local_batch(16), c.dfake_gen_update_ratio, c.gen_cls_loss_weight, c.max_grad_norm) == (512, 32, 4, 3e-3, 10.)
    assert _parse(['--batch_size_global', 2048, '--real_image_path', 'R'], ws=8).batch == 2048
    with pytest.raises(UserError, match='--student_update_freq: expected an integer >= 2'): _parse(['--student_update_freq', 1, '--real_image_path', 'R'])
    with pytest.raises(UserError, match='--f_div kl needs the discriminator'): _parse(['--f_div', 'kl', '--gan_classifier', 'false'])
    with pytest.raises(UserError, match='--f_div'): _parse(['--f_div', 'tv', '--real_image_path', 'R'])


def test_two_step_run(files, tmp_path):
    teacher, lmdb = files
    out = tmp_path / 'run'
    r = _run('--teacher', teacher, '--real_image_path', lmdb, '--run_dir', out, '--batch', 2, '--steps', 2, '--device', 'cpu',
             '--f_div', 'kl', '--cls_hidden_channels', 256, '--num_train_timesteps', 40, '--diffusion_gan_max_timestep', 40,
             '--student_update_freq', 2, '--log_every', 1, '--ckpt_every', 2, '--sample_every', 2, '--no_progress')
    assert r.returncode == 0, r.stderr[-3000:]
    recs = read_metrics(out)
    assert [x['step'] for x in recs] == [1, 2] and 'f_weight_max' in recs[0] and 'f_weight_max' in recs[1]  # ratio 1: a generator turn each
    assert all(np.isfinite(v) for x in recs for v in x.values() if isinstance(v, float))
    assert read_network_meta(out / 'network-final.safetensors')['sampler'] == {'kind': 'one_step', 'sigma': 80.0}
    cfg = json.loads((out / 'config.json').read_text())['config']
    assert cfg['method_config'] == 'FDistillConfig' and cfg['method'] == 'f-distill' and cfg['f_div'] == 'kl'


def test_missing_teacher_is_one_line_error(files, tmp_path):
    _, lmdb = files
    msg = _one_line_error(_run('--teacher', tmp_path / 'nope.pkl', '--real_image_path', lmdb, '--run_dir', tmp_path / 'a', '--device', 'cpu'))
    assert str(tmp_path / 'nope.pkl') in msg and 'no such file' in msg
    msg = _one_line_error(_run('--real_image_path', lmdb, '--run_dir', tmp_path / 'b', '--device', 'cpu'))
    assert '--teacher' in msg and 'is required' in msg
    assert not (tmp_path / 'a').exists() and not (tmp_path / 'b').exists()  # nothing written


DDP_SCRIPT = '''
import sys, torch, torch.distributed as dist
from distill_nb import fdistill
cfg = fdistill.FDistillConfig(teacher=sys.argv[1], real_image_path=sys.argv[2], run_dir=sys.argv[3], batch=4, steps=4, ckpt_every=2,
                              sample_every=0, device='cpu', f_div='kl', ratio_ema_rate=0.5, dfake_gen_update_ratio=2, num_train_timesteps=40,
                              diffusion_gan_max_timestep=40, cls_hidden_channels=256, generator_lr=1e-3, guidance_lr=1e-3, progress=False)
learn = fdistill.train_fdistill(cfg)
for name in ('generator', 'guidance'):  # the guidance state holds the ratio bins (all-reduced, so equal on every rank)
    w = torch.cat([v.detach().double().flatten() for v in learn.unwrapped(name).state_dict().values()])
    g = [torch.zeros_like(w) for _ in range(dist.get_world_size())]
    dist.all_gather(g, w)
    assert torch.equal(g[0], g[1]), f'ranks diverged: {name}'
assert not torch.equal(learn.fdistill.ratio_bins.bins, torch.ones(10, dtype=torch.float64))
print('RANK_OK', dist.get_rank())
'''


def test_torchrun_two_processes_gloo(files, tmp_path):
    "DDP on CPU (gloo): two ranks (global batch 4 = 2 x 2) stay identical, ratio bins included; rank 0 writes the checkpoints."
    import socket
    from distill_nb.learner import list_checkpoints
    teacher, lmdb = files
    script = tmp_path / 'ddp.py'; script.write_text(DDP_SCRIPT)
    with socket.socket() as s: s.bind(('127.0.0.1', 0)); port = s.getsockname()[1]
    r = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node', '2', '--master_addr', '127.0.0.1',
                        '--master_port', str(port), str(script), str(teacher), str(lmdb), str(tmp_path / 'ddp')],
                       capture_output=True, text=True, env=_env(), timeout=300)
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-4000:])
    assert r.stdout.count('RANK_OK') == 2
    assert list_checkpoints(tmp_path / 'ddp' / 'checkpoints')[-1].name == 'step-00000004'
    assert json.loads((tmp_path / 'ddp' / 'config.json').read_text())['config']['local_batch'] == 2
