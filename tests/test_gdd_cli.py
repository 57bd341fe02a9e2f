"Tests of the `gdd_train` command line and `train_gdd` (GDD / GDD-I), on CPU with tiny networks."
import json, os, subprocess, sys
from pathlib import Path
import pytest
import torch
from distill_nb.gdd import train_gdd, tiny_gdd_teacher, gdd_config
from distill_nb.checkpoints import save_network, read_network_meta, load_network
from distill_nb.learner import list_checkpoints

ROOT = Path(__file__).resolve().parents[1]


def _cli(*args, cwd=None):
    cmd = [sys.executable, '-m', 'distill_nb.gdd', *map(str, args)]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=cwd or ROOT, env={**os.environ, 'PYTHONPATH': str(ROOT), 'OMP_NUM_THREADS': '1'})
    return r


def test_cli_trains_resumes_and_saves(tmp_path):
    run = tmp_path / 'run'
    r = _cli('--preset', 'toy', '--run_dir', run, '--steps', 3, '--ckpt_every', 3, '--toy_n', 64, '--batch', 8,
             '--device', 'cpu', '--no_progress', '--log_every', 1)
    assert r.returncode == 0, r.stderr[-3000:]
    meta = read_network_meta(run / 'network-final.safetensors')
    assert meta['sampler'] == {'kind': 'one_step', 'sigma': 80.0}
    cfg = json.loads((run / 'config.json').read_text())['config']
    assert cfg['method_config'] == 'GDDConfig' and cfg['batch'] == 8 and cfg['freeze'] == 1 and cfg['freeze_counts']['frozen'] > 0
    assert [p.name for p in list_checkpoints(run / 'checkpoints')] == ['step-00000003']
    # resume to 5 iterations from the latest checkpoint
    r = _cli('--preset', 'toy', '--run_dir', run, '--steps', 5, '--ckpt_every', 100, '--toy_n', 64, '--batch', 8,
             '--device', 'cpu', '--no_progress', '--resume', 'latest')
    assert r.returncode == 0, r.stderr[-3000:]
    assert [p.name for p in list_checkpoints(run / 'checkpoints')][-1] == 'step-00000005'
    G = load_network(run / 'network-final.safetensors')
    assert type(G).__name__ == 'ConsistencyPrecond' and G.sigma_min == 0.002 and G.amp_dtype is None


def test_cli_bad_preset(tmp_path):
    r = _cli('--preset', 'lsun', '--run_dir', tmp_path / 'r')
    assert r.returncode != 0 and 'lsun' in r.stderr


def test_teacher_file_conditional_gdd(tmp_path):
    t = tiny_gdd_teacher(8, 3, label_dim=4)
    save_network(t, tmp_path / 'teacher.safetensors')
    learn = train_gdd(tmp_path / 'run', preset='toy', teacher=str(tmp_path / 'teacher.safetensors'), toy_n=64, steps=2, device='cpu',
                      progress=False, cond=True, freeze=0, batch=8, diffaug='color,translation,cutout', r1_every=1, r1_gamma=0.1)
    assert learn.update_counts == {'G': 2, 'D': 2, 'R1': 2}
    assert learn.config['freeze_counts']['frozen'] == 0 and learn.unwrapped('D').cls is not None
    # GDD (freeze 0): every generator parameter is in the optimizer
    assert len(learn.steps[0].params) == len(list(learn.unwrapped('G').parameters()))


def test_gddi_optimizer_holds_only_trainable(tmp_path):
    learn = train_gdd(tmp_path / 'run', preset='toy', toy_n=64, steps=1, device='cpu', progress=False, batch=8, freeze=2)
    G = learn.unwrapped('G')
    opt_ids = {id(p) for p in learn.steps[0].params}
    for n, p in G.named_parameters():
        assert (id(p) in opt_ids) == p.requires_grad, n
        if n.split('.')[-2] in ('conv0', 'conv1', 'proj', 'qkv'): assert not p.requires_grad, n
    # D's optimizer has the lazy-R1 correction
    d_opt = learn.steps[1].opt
    assert abs(d_opt.param_groups[0]['lr'] - 1e-3 * 16 / 17) < 1e-15  # float64 arithmetic on a 1e-3 value
    assert abs(d_opt.param_groups[0]['betas'][1] - 0.99 ** (16 / 17)) < 1e-12


def test_errors(tmp_path):
    with pytest.raises(ValueError, match='--cond'):
        train_gdd(tmp_path / 'a', preset='toy', teacher=tiny_gdd_teacher(8, 3, label_dim=3), toy_n=16, steps=1, device='cpu', progress=False, cond=True)
    with pytest.raises(ValueError, match='--data'):
        train_gdd(tmp_path / 'b', preset='toy', teacher=tiny_gdd_teacher(16, 3), toy_n=16, steps=1, device='cpu', progress=False)
    with pytest.raises(FileNotFoundError, match='--data'):
        train_gdd(tmp_path / 'c', preset='toy', data=str(tmp_path / 'nope.zip'), steps=1, device='cpu', progress=False)
    with pytest.raises(ValueError, match='--freeze'):
        train_gdd(tmp_path / 'd', preset='toy', toy_n=16, steps=1, device='cpu', progress=False, freeze=7)


def test_presets():
    for name in ('cifar10-uncond', 'cifar10-cond', 'afhqv2-64', 'ffhq-64', 'imagenet-64'):
        c = gdd_config(name)
        assert c.freeze == 1 and c.r1_every == 16 and c.sigma_g == 80 and c.feature_size == 224 and c.ema == 500 * (100 if name == 'imagenet-64' else 1)
    assert gdd_config('imagenet-64').batch == 512 and gdd_config('imagenet-64').g_lr == 8e-6
    assert gdd_config('afhqv2-64', d_lr=1e-5).d_lr == 1e-5


def test_ddp_two_processes_with_r1(tmp_path):
    "torchrun, 2 CPU processes (gloo): G, D and R1 steps (double backward through the DDP-wrapped heads) run and agree."
    import socket
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0)); port = s.getsockname()[1]
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node', '2', '--master_port', str(port), '-m', 'distill_nb.gdd',
           '--preset', 'toy', '--run_dir', str(tmp_path / 'run'), '--steps', '2', '--r1_every', '1', '--r1_gamma', '0.1',
           '--toy_n', '64', '--batch', '8', '--device', 'cpu', '--no_progress', '--ckpt_every', '2']
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env={**os.environ, 'PYTHONPATH': str(ROOT), 'OMP_NUM_THREADS': '1'})
    assert r.returncode == 0, r.stderr[-4000:]
    cfg = json.loads((tmp_path / 'run' / 'config.json').read_text())
    assert cfg['world_size'] == 2 and cfg['config']['batch'] == 8
    assert (tmp_path / 'run' / 'network-final.safetensors').exists()


def test_fid_during_training(tmp_path):
    "FID of the EMA generator through the metrics module (tiny detector, reference stats of the toy data)."
    from distill_nb.metrics import save_tiny_detector, compute_ref_stats
    from distill_nb.gdd import gdd_dataset
    det = save_tiny_detector(tmp_path / 'det.safetensors', dim=16, resolution=8)
    ds = gdd_dataset('toy', 8, 64)
    compute_ref_stats(torch.stack([ds[i][0] for i in range(64)]), tmp_path / 'ref.npz', detector=det)
    train_gdd(tmp_path / 'run', preset='toy', toy_n=64, steps=2, device='cpu', progress=False, batch=8,
                      fid_ref=str(tmp_path / 'ref.npz'), fid_detector=str(det), fid_every=1, fid_n=32)
    fids = [json.loads(l).get('fid') for l in (tmp_path / 'run' / 'metrics.jsonl').read_text().splitlines()]
    fids = [f for f in fids if f is not None]
    assert fids and all(f > 0 for f in fids)


# --- user errors: one line `gdd_train: error: ...`, exit status 2, no traceback (issue 15, sections 2 and 5) ---

def _assert_user_error(r, *needles):
    assert r.returncode == 2, (r.returncode, r.stderr[-3000:])
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith('gdd_train: error: '), r.stderr[-3000:]
    assert 'Traceback' not in r.stderr
    for n in needles: assert n in lines[0], lines[0]


@pytest.mark.parametrize('flags, needle', [(['--batch', '-2'], '--batch'), (['--steps', '-2'], '--steps'), (['--ema', '-1'], '--ema'),
                                           (['--resolution', '0'], '--resolution')])
def test_cli_bad_flags(tmp_path, flags, needle):
    r = _cli('--preset', 'toy', '--run_dir', tmp_path / 'r', '--device', 'cpu', '--no_progress', *flags)
    _assert_user_error(r, needle)
    assert not (tmp_path / 'r').exists()  # nothing written


def test_cli_teacher_does_not_fit_data(tmp_path):
    save_network(tiny_gdd_teacher(16, 3), tmp_path / 't16.safetensors')
    r = _cli('--preset', 'toy', '--run_dir', tmp_path / 'r', '--teacher', tmp_path / 't16.safetensors', '--resolution', '8', '--toy_n', '16',
             '--steps', '1', '--device', 'cpu', '--no_progress')
    _assert_user_error(r, '3x8x8', '3x16x16')


@pytest.mark.parametrize('kw, needle', [(dict(batch=0), '--batch'), (dict(batch=-2), '--batch'), (dict(g_lr=0.), '--g_lr'),
                                        (dict(d_lr=-1e-4), '--d_lr'), (dict(kimg=0.), '--kimg'), (dict(ema_mimg=-1.), '--ema'),
                                        (dict(r1_every=0), '--r1_every'), (dict(r1_gamma=-1.), '--r1_gamma'), (dict(sigma_g=0.), '--sigma_g'),
                                        (dict(freeze=5), '--freeze'), (dict(feature_size=0), '--feature_size'), (dict(toy_n=0), '--toy_n'),
                                        (dict(ckpt_every=-1), '--ckpt_every'), (dict(log_every=0), '--log_every'), (dict(fid_n=-5), '--fid_samples'),
                                        (dict(max_keep=-1), '--max_keep'), (dict(num_workers=-1), '--workers'), (dict(mimg=0.), '--kimg')])
def test_bad_settings(tmp_path, kw, needle):
    from distill_nb.core import UserError
    args = dict(toy_n=16, steps=1, device='cpu', progress=False); args.update(kw)
    with pytest.raises(UserError, match=needle): train_gdd(tmp_path / 'r', preset='toy', **args)
    assert not (tmp_path / 'r').exists()


def test_batch_not_divisible_by_world_size(tmp_path, monkeypatch):
    from types import SimpleNamespace
    import distill_nb.run as run_mod
    from distill_nb.core import UserError
    monkeypatch.setattr(run_mod, 'init_distributed', lambda device=None: SimpleNamespace(world_size=3, rank=0, device=torch.device('cpu'), is_main=True))
    with pytest.raises(UserError, match=r'--batch: 8 is not divisible by the number of processes \(3\)'):
        train_gdd(tmp_path / 'r', preset='toy', toy_n=16, steps=1, device='cpu', progress=False, batch=8)


def test_teacher_label_dim_does_not_fit(tmp_path):
    from distill_nb.core import UserError
    with pytest.raises(UserError, match='label_dim=3 but the dataset has 4 classes'):
        train_gdd(tmp_path / 'a', preset='toy', teacher=tiny_gdd_teacher(8, 3, label_dim=3), toy_n=16, steps=1, device='cpu', progress=False, cond=True)
    with pytest.raises(UserError, match='--uncond: the teacher is class-conditional'):
        train_gdd(tmp_path / 'b', preset='toy', teacher=tiny_gdd_teacher(8, 3, label_dim=4), toy_n=16, steps=1, device='cpu', progress=False, cond=False)


def test_presets_adam_eps_is_the_references(tmp_path):
    "The trainer's optimisers use ε = 1e-8 / (batch / 4 reference GPUs) (see the notebook's Adam test)."
    learn = train_gdd(tmp_path / 'run', preset='toy', toy_n=16, steps=1, device='cpu', progress=False, batch=16)
    assert {s.opt.param_groups[0]['eps'] for s in learn.steps} == {1e-8 / 4}
    assert learn.config['adam_eps'] == 1e-8 / 4


def test_existing_run_is_not_overwritten(tmp_path):
    "A second run into the same folder is refused (one line, exit 2) unless --resume or --overwrite."
    base = ('--preset', 'toy', '--run_dir', tmp_path / 'run', '--steps', 2, '--toy_n', 16, '--batch', 8, '--device', 'cpu', '--no_progress',
            '--log_every', 1)
    assert _cli(*base).returncode == 0
    before = (tmp_path / 'run' / 'network-final.safetensors').stat().st_mtime_ns
    _assert_user_error(_cli(*base), str(tmp_path / 'run'), '--overwrite')
    assert (tmp_path / 'run' / 'network-final.safetensors').stat().st_mtime_ns == before  # untouched
    r = _cli(*base, '--overwrite')
    assert r.returncode == 0, r.stderr[-3000:]
    steps = [json.loads(l)['step'] for l in (tmp_path / 'run' / 'metrics.jsonl').read_text().splitlines()]
    assert len(steps) == 2 and steps == sorted(set(steps))  # one step sequence, not two


# --- the run layer (issue 14): the reference's command lines parse to the intended config and run; exact resume ---

def _train_sh_lines():
    "The 10 command lines of Zyriix/GDD's train.sh (GDD and GDD-I), as (name, argv) with --ema in Mimg spelled --ema_mimg."
    common = ['--workers=4', '--dropout=0', '--fp16=True', "--loss-type=ns", '--r1-gamma=1e-4', '--diffaug=False', "--r1-type=r1",
              '--ada-target=0', '--use-gp=True', "--d-type=xl", '--seed=42', '--precond=gdd', '--loss=gdd']
    runs = {'cifar10-uncond': ['--backbone=1', '--ema_mimg=0.5', '--batch=256', '--dlr=1e-4', '--lr=1e-4', '--cond=0', '--arch=ncsnpp', '--duration=5'],
            'cifar10-cond': ['--backbone=1', '--ema_mimg=0.5', '--batch=256', '--dlr=1e-4', '--lr=1e-4', '--cond=1', '--arch=ncsnpp', '--duration=5'],
            'afhqv2-64': ['--backbone=0', '--ema_mimg=0.5', '--batch=256', '--dlr=4e-5', '--lr=2e-5', '--cond=0', '--arch=ncsnpp', '--duration=10', '--cres=1,2,2,2'],
            'ffhq-64': ['--backbone=0', '--ema_mimg=0.5', '--batch=256', '--dlr=4e-5', '--lr=2e-5', '--cond=0', '--arch=ncsnpp', '--duration=10', '--cres=1,2,2,2'],
            'imagenet-64': ['--backbone=0', '--ema_mimg=50', '--batch=512', '--dlr=4e-5', '--lr=8e-6', '--cond=1', '--arch=adm', '--duration=10']}
    out = []
    for freeze in (0, 1):
        for name, flags in runs.items():
            extra = ['--augment=0'] if freeze == 0 else []  # the GDD (not -I) lines also pass --augment=0
            out.append((name, freeze, [f'--freeze={freeze}', *flags, f'--outdir=runs/{name}-{freeze}', f'--transfer=pretrained/{name}.pkl',
                                       f'--data=datasets/{name}.zip', *common, *extra]))
    return out


@pytest.mark.parametrize('name, freeze, argv', _train_sh_lines())
def test_reference_command_lines_parse(name, freeze, argv):
    from distill_nb.config import parse_config
    from distill_nb.gdd import GDDConfig, GDD_ALIASES, GDD_PRESETS
    c = parse_config(GDDConfig, argv, GDD_ALIASES, GDD_PRESETS, world_size=2)
    p = gdd_config(name)
    for k in ('backbones', 'ema', 'batch', 'g_lr', 'd_lr', 'cond', 'kimg', 'seed', 'r1_gamma_ref', 'diffaug', 'fp16'): assert getattr(c, k) == getattr(p, k), k
    assert (c.freeze, c.run_dir, c.teacher, c.data, c.workers, c.dropout, c.use_gp) == (freeze, f'runs/{name}-{freeze}', f'pretrained/{name}.pkl',
                                                                                        f'datasets/{name}.zip', 4, 0., True)
    assert c.local_batch(2) == c.batch // 2  # the reference's --batch is global: no conversion under WORLD_SIZE=2
    assert c.total_steps() == round(c.kimg * 1000 / c.batch)


def test_reference_command_line_runs_tiny_steps(tmp_path):
    "train.sh's GDD-I CIFAR-10 line on the toy data, a tiny teacher and the tiny backbone: 2 iterations with an R1 step, through the CLI."
    flags = ['--workers=0', '--freeze=1', '--ema_mimg=0.5', '--dropout=0', '--batch=8', '--dlr=1e-4', '--lr=1e-4', '--cond=0',
             '--duration=0.000016', f'--outdir={tmp_path / "run"}', '--fp16=True', '--loss-type=ns', '--r1-gamma=1e-4', '--diffaug=False',
             '--r1-type=r1', '--ada-target=0', '--use-gp=True', '--d-type=xl', '--seed=42', '--precond=gdd', '--loss=gdd',
             '--r1_every=2', '--toy_n=16', '--device=cpu', '--no_progress', '--log_every=1']
    r = _cli(*flags)
    assert r.returncode == 0, r.stderr[-3000:]
    cfg = json.loads((tmp_path / 'run' / 'config.json').read_text())['config']
    assert (cfg['n_steps'], cfg['ema'], cfg['g_lr'], cfg['freeze'], cfg['method']) == (2, 500., 1e-4, 1, 'gdd-i')
    recs = [json.loads(l) for l in (tmp_path / 'run' / 'metrics.jsonl').read_text().splitlines()]
    assert [r['step'] for r in recs] == [1, 2] and 'R1/r1' in recs[1]


def test_exact_resume_bitwise(tmp_path):
    "4 iterations in one go equal 2 + a resume to 4: generator, EMA and discriminator heads bitwise, same losses."
    kw = dict(preset='toy', toy_n=16, batch=4, device='cpu', progress=False, ckpt_every=2, r1_every=2, sample_every=0, log_every=1)
    full = train_gdd(tmp_path / 'a', steps=4, **kw)
    train_gdd(tmp_path / 'b', steps=2, **kw)
    res = train_gdd(tmp_path / 'b', steps=4, resume='latest', **kw)
    for m in ('G', 'D'):
        for p, q in zip(full.unwrapped(m).parameters(), res.unwrapped(m).parameters()): assert torch.equal(p, q), m
    for p, q in zip(full.ema.module().parameters(), res.ema.module().parameters()): assert torch.equal(p, q)
    la, lb = [[json.loads(l) for l in (tmp_path / d / 'metrics.jsonl').read_text().splitlines()] for d in 'ab']
    assert [r.get('G/gan') for r in la] == [r.get('G/gan') for r in lb]


def test_teacher_module_and_arch_check(tmp_path):
    "A module teacher from Python (`teacher_net=`); --arch/--cres check it."
    from distill_nb.core import UserError
    t = tiny_gdd_teacher(8, 3)
    learn = train_gdd(gdd_config('toy', run_dir=tmp_path / 'a', toy_n=16, steps=1, device='cpu', progress=False, arch='ncsnpp'), teacher_net=t)
    assert learn.config['teacher'] == 'EDMPrecond'
    with pytest.raises(UserError, match='--arch adm: the teacher is a SongUNet'):
        train_gdd(tmp_path / 'b', teacher=t, toy_n=16, steps=1, device='cpu', progress=False, arch='adm')
    with pytest.raises(UserError, match=r'--cres 1,2,2,2: the teacher has channel_mult \[1, 2\]'):
        train_gdd(tmp_path / 'c', teacher=t, toy_n=16, steps=1, device='cpu', progress=False, cres='1,2,2,2')
