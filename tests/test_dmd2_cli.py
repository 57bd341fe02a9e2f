"CLI and trainer-level tests of DMD2 (`dmd2_train`): the reference command lines (parse and run), resume, run folders, FID, backward simulation, DDP."
import json, os, shutil, subprocess, sys, textwrap
from dataclasses import replace
from pathlib import Path
import numpy as np
import pytest
import torch

from distill_nb.checkpoints import save_network, read_network_meta, load_network
from distill_nb.callbacks import read_metrics
from distill_nb.config import parse_config
from distill_nb.core import UserError
from distill_nb.learner import list_checkpoints
from distill_nb.dmd2 import (DMD2, DMD2Config, DMD2_ALIASES, DMD2_PRESETS, ToyEDMDenoiser, train_dmd2, dmd2_train, shared_step_index,
                             DMDGenerator, backward_simulate)

ROOT = Path(__file__).resolve().parents[1]


def _env():
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get('PYTHONPATH', ''), OMP_NUM_THREADS='1', WANDB_MODE='disabled')
    env.pop('WORLD_SIZE', None); env.pop('RANK', None)
    return env


@pytest.fixture(scope='module')
def teacher_file(tmp_path_factory):
    d = tmp_path_factory.mktemp('teacher')
    torch.manual_seed(0)
    return save_network(ToyEDMDenoiser(8, 3, 10, 8), d / 'teacher.safetensors')


def _real_lmdb(d: Path, n: int = 16, seed: int = 0) -> Path:
    from distill_nb.data.lmdb_dataset import write_lmdb
    p = d / f'real{seed}.lmdb'
    if not p.exists():
        rng = np.random.default_rng(seed)
        write_lmdb(p, [(rng.integers(0, 256, (3, 8, 8), dtype=np.uint8), i % 10) for i in range(n)])
    return p


def _parse(argv, ws=1):
    return parse_config(DMD2Config, [str(a) for a in argv], DMD2_ALIASES, DMD2_PRESETS, world_size=ws)


def _kw(teacher_file, out, **kw):
    "Tiny in-process settings (field names)."
    return {**dict(teacher=str(teacher_file), run_dir=str(out), batch=2, steps=2, ckpt_every=2, sample_every=2, log_every=1, device='cpu',
                   warmup_step=0, progress=False), **kw}


# ---- the reference command lines ---------------------------------------------------------------------------------------------------
# tianweiy/DMD2 experiments/imagenet/*.sh (7 GPUs) and the CIFAR-10 port's README (rsk672/diffusion-distillation-project, methods/dmd2),
# with the shell variables as placeholders
_IN_COMMON = ('--train_iters 10000000 --output_path {out} --batch_size 40 --initialie_generator --log_iters 500 --resolution 64 '
              '--label_dim 1000 --dataset_name imagenet --seed 10 --model_id {teacher} --wandb_iters 100 --wandb_entity ent '
              '--wandb_project proj --use_fp16 --wandb_name {name} --real_image_path {lmdb} --dfake_gen_update_ratio 5 ')
_GAN = '--cls_loss_weight 1e-2 --gan_classifier --gen_cls_loss_weight 3e-3 --diffusion_gan --diffusion_gan_max_timestep 1000 '
_CIFAR = ('--output_path {out} --batch_size 128 --wandb_name {name} --wandb_entity ent --wandb_project proj --real_image_path {lmdb} '
          '--generator_lr 2e-6 --guidance_lr 2e-6 --dfake_gen_update_ratio 5 --max_checkpoint 200 --initialie_generator '
          '--ref_path {ref} --detector_url {det}')
SEED_LINES = {
    'imagenet_lr2e-6_scratch': ('--generator_lr 2e-6 --guidance_lr 2e-6 ' + _IN_COMMON + '--delete_ckpts --max_checkpoint 200', 7),
    'imagenet_gan_lr2e-6_scratch': ('--generator_lr 2e-6 --guidance_lr 2e-6 ' + _IN_COMMON + _GAN + '--delete_ckpts --max_checkpoint 500', 7),
    'imagenet_gan_lr5e-7_resume': ('--generator_lr 5e-7 --guidance_lr 5e-7 ' + _IN_COMMON + _GAN + '--delete_ckpts --max_checkpoint 200 '
                                   '--ckpt_only_path {ckpt}', 7),
    'cifar10_edm': ('--model_id {teacher} --dataset_name cifar10-vp ' + _CIFAR, 1),
    'cifar10_edm_gan': ('--model_id {teacher} --dataset_name cifar10-vp ' + _CIFAR + ' --gan_classifier --gen_cls_loss_weight 3e-3 '
                        '--diffusion_gan --diffusion_gan_max_timestep 1000', 1),
    'cifar10_consistency': ('--consistency_model_path {cm} --teacher_model_path {teacher} --dataset_name cifar10 ' + _CIFAR +
                            ' --delete_ckpts --num_train_timesteps 40', 1),
}
_NAMES = dict(teacher='T.pkl', out='OUT', lmdb='R.lmdb', ref='ref.npz', det='inception.pkl', cm='cm.safetensors',
              ckpt='imagenet_lr2e-6_scratch_fid2.61_checkpoint_model_405500')


@pytest.mark.parametrize('name', list(SEED_LINES))
def test_seed_command_line_parses(name):
    "Every seed command line resolves to the intended config: global batch = per-process x processes, cadences, bf16, rotation."
    line, ws = SEED_LINES[name]
    argv = line.format(name=name, **_NAMES).split()
    c = _parse(argv, ws)
    imagenet = name.startswith('imagenet')
    assert c.batch == (40 * 7 if imagenet else 128) and c.local_batch(ws) == (40 if imagenet else 128)
    assert _parse(argv, 2).batch == (80 if imagenet else 256)  # --batch_size is per process under any WORLD_SIZE
    assert (c.dfake_gen_update_ratio, c.initialize_generator, c.wandb_project, c.wandb_entity, c.wandb_name) == (5, True, 'proj', 'ent', name)
    assert c.teacher == 'T.pkl' and c.real_image_path == 'R.lmdb' and c.run_dir == 'OUT'
    if imagenet:
        assert (c.steps, c.ckpt_every, c.sample_every, c.log_every, c.seed) == (10_000_000, 500, 500, 100, 10)
        assert (c.precision, c.max_keep, c.resolution, c.label_dim, c.dataset_name) == ('bf16', 1, 64, 1000, 'imagenet')
        assert c.cache_keep == (500 if 'gan_lr2e-6' in name else 200)  # --max_checkpoint: the --cache_dir copies only, as in DMD2
        assert (c.generator_lr, c.guidance_lr) == ((5e-7, 5e-7) if 'resume' in name else (2e-6, 2e-6))
        assert c.ckpt_only_path == (_NAMES['ckpt'] if 'resume' in name else None)
    else:
        assert (c.steps, c.total_steps(), c.precision, c.fid_ref, c.fid_detector, c.cache_keep) == (None, 1000, 'auto', 'ref.npz', 'inception.pkl', 200)
        assert c.max_keep == (1 if 'consistency' in name else 3) and c.num_train_timesteps == (40 if 'consistency' in name else 1000)
        assert c.consistency_model_path == ('cm.safetensors' if 'consistency' in name else None)
    gan = 'gan' in name
    assert (c.gan_classifier, c.diffusion_gan) == (gan, gan)
    if gan: assert (c.gen_cls_loss_weight, c.diffusion_gan_max_timestep) == (3e-3, 1000) and c.cls_loss_weight == (1e-2 if imagenet else 1.)


def _tiny_song(cls_name, **kw):
    from distill_nb import networks, precond  # register the classes
    from distill_nb.core import REGISTRY
    assert networks.SongUNet and precond.ConsistencyPrecond
    cfg = dict(img_resolution=16, img_channels=3, label_dim=10, model_type='SongUNet', model_channels=16, channel_mult=[1, 2],
               num_blocks=1, attn_resolutions=[], channel_mult_emb=2, dropout=0.1, augment_dim=9)
    return REGISTRY[cls_name](**{**cfg, **kw})


def test_seed_command_lines_run(teacher_file, tmp_path, capsys):
    "Each seed command line runs two tiny iterations on CPU (the sizes overridden flag by flag, the reference spellings kept)."
    from distill_nb.metrics import save_tiny_detector, compute_ref_stats
    det = save_tiny_detector(tmp_path / 'det.safetensors')
    compute_ref_stats(torch.rand(32, 3, 8, 8) * 2 - 1, dest=tmp_path / 'ref.npz', detector=det)
    torch.manual_seed(0); save_network(_tiny_song('ConsistencyPrecond', sigma_min=0.002, img_resolution=8), tmp_path / 'cm.safetensors')
    files = dict(teacher=teacher_file, lmdb=_real_lmdb(tmp_path), ref=tmp_path / 'ref.npz', det=det, cm=tmp_path / 'cm.safetensors')
    tiny = ('--batch_size 2 --train_iters 2 --log_iters 2 --wandb_iters 1 --resolution 8 --label_dim 10 --device cpu --warmup_step 0 '
            '--cls_hidden_channels 16 --no_progress --total_eval_samples 8').split()
    for name, (line, _) in SEED_LINES.items():
        out = tmp_path / name
        if 'resume' in name:  # --ckpt_only_path: the scratch run's checkpoint under the reference's folder name (step 405500)
            ck = tmp_path / _NAMES['ckpt']; shutil.copytree(list_checkpoints(tmp_path / 'imagenet_lr2e-6_scratch' / 'checkpoints')[-1], ck)
            extra = ['--train_iters', '405502']
        else: ck, extra = None, (['--fid_iters', '2'] if name.startswith('cifar') else [])  # FID on the CIFAR lines (their reference did it)
        argv = line.format(name=name, out=out, ckpt=ck, **files).split() + tiny + extra
        dmd2_train(_parse(argv))
        cks = list_checkpoints(out / 'checkpoints')
        assert [c.name for c in cks] == (['step-00405502'] if ck else ['step-00000002']), name  # --delete_ckpts or --max_keep 3
        assert read_network_meta(out / 'network-final.safetensors')['sampler'] == {'kind': 'one_step', 'sigma': 80.0}
        recs = read_metrics(out)
        assert [r['step'] for r in recs] == ([405501, 405502] if ck else [1, 2]), name
        if name.startswith('cifar'): assert 'fid' in recs[-1], name
    assert 'weights from' in capsys.readouterr().out


def test_defaults_agree_and_presets():
    "No flag = the Python defaults (one dataclass); presets are overridable flag by flag; the reference spelling and the field disagree loudly."
    assert _parse([]) == DMD2Config().check() and DMD2Config().total_steps() == 1000
    c = _parse(['--preset', 'imagenet64-finetune', '--batch_size', '8', '--real_image_path', 'r.lmdb'], ws=4)
    assert (c.batch, c.generator_lr, c.gan_classifier, c.precision, c.steps) == (32, 5e-7, True, 'bf16', 140_000)
    assert _parse(['--preset', 'cifar10', '--ref_path', 'ref.npz']).fid_every == 1000  # as in the CIFAR port: FID every 1000 iterations
    with pytest.raises(UserError, match='--train_iters and --steps disagree'): _parse(['--train_iters', '5', '--steps', '6'])
    with pytest.raises(UserError, match='--batch_size: expected a positive number, got -2'): _parse(['--batch_size', '-2'])
    assert _parse(['--resume']).resume == 'auto' and _parse(['--checkpoint_path', 'x/step-1']).resume == 'x/step-1'
    assert _parse(['--use_fp16']).precision == 'bf16' and _parse(['--delete_ckpts', 'false']).max_keep == 0


# ---- the command line as a process ---------------------------------------------------------------------------------------------------
def _run_cli(args, module='distill_nb.dmd2', fn='dmd2_train', timeout=240):
    "Run a CLI the way its console script does (a tiny `__main__` file importing and calling the entry point)."
    import tempfile
    script = Path(tempfile.mkdtemp()) / f'{fn}.py'
    script.write_text(f'import sys\nfrom {module} import {fn}\nif __name__ == "__main__": sys.exit({fn}())\n')
    return subprocess.run([sys.executable, str(script), *map(str, args)], capture_output=True, text=True, env=_env(), timeout=timeout)


def _one_line_error(r, prog='dmd2_train'):
    "Exit status 2, one stderr line `prog: error: ...`, no traceback."
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    assert r.returncode == 2, (r.returncode, r.stdout[-1000:], r.stderr[-3000:])
    assert len(lines) == 1 and lines[0].startswith(f'{prog}: error: ') and 'Traceback' not in r.stderr, r.stderr[-3000:]
    return lines[0]


def _tiny_args(teacher_file, out, *extra):
    return ['--teacher_model_path', teacher_file, '--output_path', out, '--batch_size', 2, '--log_iters', 2, '--wandb_iters', 2,
            '--initialie_generator', '--dataset_name', 'cifar10', '--device', 'cpu', '--warmup_step', 0, '--num_workers', 0,
            '--no_progress', *extra]


def test_cli_train_resume_refuse_overwrite(teacher_file, tmp_path):
    "Memory estimate before training; checkpoints with sampler meta; bare --resume continues; a second run is refused (nothing "
    "changes); --overwrite replaces it; bad flags are one-line errors that write nothing."
    out = tmp_path / 'run'
    r = _run_cli(_tiny_args(teacher_file, out, '--train_iters', 4, '--seed', 3, '--dfake_gen_update_ratio', 2, '--num_train_timesteps', 40))
    assert r.returncode == 0, r.stderr[-3000:]
    assert 'memory estimate:' in r.stdout
    cks = list_checkpoints(out / 'checkpoints')
    assert [c.name for c in cks] == ['step-00000002', 'step-00000004']
    assert read_network_meta(cks[-1] / 'generator.safetensors')['sampler'] == {'kind': 'one_step', 'sigma': 80.0}
    cfg = json.loads((out / 'config.json').read_text())
    assert cfg['config']['num_train_timesteps'] == 40 and cfg['config']['batch'] == 2 and 'config_hash' in cfg
    before = {p: p.read_bytes() for p in out.rglob('*') if p.is_file()}
    msg = _one_line_error(_run_cli(_tiny_args(teacher_file, out, '--train_iters', 6)))
    assert f'{out}: holds a previous run' in msg and 'use --resume to continue it or --overwrite to replace it' in msg
    assert {p: p.read_bytes() for p in out.rglob('*') if p.is_file()} == before
    r = _run_cli(_tiny_args(teacher_file, out, '--train_iters', 6, '--resume', '--seed', 3, '--dfake_gen_update_ratio', 2,
                            '--num_train_timesteps', 40))
    assert r.returncode == 0, r.stderr[-3000:]
    assert list_checkpoints(out / 'checkpoints')[-1].name == 'step-00000006'
    assert [json.loads(l)['step'] for l in (out / 'metrics.jsonl').read_text().splitlines()] == [2, 4, 6]
    r = _run_cli(_tiny_args(teacher_file, out, '--train_iters', 2, '--overwrite')); assert r.returncode == 0, r.stderr[-3000:]
    assert [json.loads(l)['step'] for l in (out / 'metrics.jsonl').read_text().splitlines()] == [2]
    g = DMDGenerator(list_checkpoints(out / 'checkpoints')[-1] / 'generator.safetensors', device='cpu')
    assert g.generate_batch([0, 1], 3).shape == (2, 3, 8, 8)
    msg = _one_line_error(_run_cli(_tiny_args(teacher_file, tmp_path / 'x', '--train_iters', 2, '--dfake_gen_update_ratio', 0)))
    assert msg == 'dmd2_train: error: --dfake_gen_update_ratio: expected a positive number, got 0'
    assert not (tmp_path / 'x').exists()


# ---- in process ----------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize('bad, msg', [
    (dict(steps=-1), '--steps: expected a positive number, got -1'),
    (dict(log_every=0), '--log_every'), (dict(warmup_step=-5), '--warmup_step'), (dict(guidance_lr=0.), '--guidance_lr'),
    (dict(max_step_percent=1.5), '--max_step_percent: expected a fraction in [0, 1], got 1.5'),
    (dict(sigma_min=100.), '--sigma_min 100.0 must be below --sigma_max 80.0'), (dict(num_train_timesteps=0), '--num_train_timesteps'),
    (dict(diffusion_gan_max_timestep=2000), '--diffusion_gan_max_timestep: expected a grid index in [0, 1000], got 2000'),
    (dict(student_sigmas='80,abc'), '--student_sigmas: expected comma-separated numbers'), (dict(cache_keep=0), '--cache_keep'),
    (dict(label_dim=1000), '--label_dim 1000 does not match the teacher'), (dict(resolution=64), '--resolution 64 does not match'),
    (dict(max_grad_norm=-1.), '--max_grad_norm'), (dict(dataset_name='mnist'), '--dataset_name'),
    (dict(gan_classifier=True), '--real_image_path'), (dict(initialize_generator=False), '--initialize_generator false'),
    (dict(ckpt_only_path='nowhere/step-3'), 'nowhere/step-3/generator.safetensors'),
])
def test_flag_checks_in_process(teacher_file, tmp_path, bad, msg):
    with pytest.raises(UserError) as e: dmd2_train(**_kw(teacher_file, tmp_path / 'r', **bad))
    assert msg in str(e.value), str(e.value)
    assert not (tmp_path / 'r').exists()


def test_real_data_that_does_not_fit_the_teacher(teacher_file, tmp_path):
    "An LMDB at another resolution or with more classes than the teacher: the error names both values."
    from distill_nb.data.lmdb_dataset import write_lmdb
    rng = np.random.default_rng(0)
    write_lmdb(tmp_path / 'r16.lmdb', [(rng.integers(0, 256, (3, 16, 16), dtype=np.uint8), i % 10) for i in range(4)])
    write_lmdb(tmp_path / 'c1.lmdb', [(rng.integers(0, 256, (1, 8, 8), dtype=np.uint8), i % 10) for i in range(4)])
    write_lmdb(tmp_path / 'l20.lmdb', [(rng.integers(0, 256, (3, 8, 8), dtype=np.uint8), 19 - i) for i in range(20)])
    for name, msg in [('r16', 'images are 3x16x16, but the teacher makes 3x8x8 images'), ('c1', 'images are 1x8x8, but the teacher makes 3x8x8'),
                      ('l20', 'labels span 20 classes, but the teacher has label_dim 10')]:
        with pytest.raises(UserError, match=msg):
            dmd2_train(**_kw(teacher_file, tmp_path / name, gan_classifier=True, real_image_path=str(tmp_path / f'{name}.lmdb')))


def test_exact_resume_with_gan_and_real_data(teacher_file, tmp_path):
    "4 + 2 iterations (resumed from the step-4 checkpoint, real-data position included) equal 6 uninterrupted ones, bitwise."
    kw = _kw(teacher_file, tmp_path / 'a', steps=4, dfake_gen_update_ratio=2, gan_classifier=True, real_image_path=str(_real_lmdb(tmp_path)),
             cls_hidden_channels=8, gen_cls_loss_weight=1e-2, diffusion_gan=True, diffusion_gan_max_timestep=1000, generator_lr=1e-3,
             guidance_lr=1e-3, log_every=3, seed=4)
    train_dmd2(DMD2Config(**kw))
    res = train_dmd2(DMD2Config(**{**kw, 'steps': 6, 'resume': 'auto'}))
    full = train_dmd2(DMD2Config(**{**kw, 'steps': 6, 'run_dir': str(tmp_path / 'b')}))
    for k in ('generator', 'guidance'):
        assert all(torch.equal(a, b) for a, b in zip(res.models[k].state_dict().values(), full.models[k].state_dict().values())), k


def test_gan_grad_norm_only_on_logging_steps(teacher_file, tmp_path, monkeypatch):
    "Issue 13: the extra backward for grad_norm_x_gan runs on logging iterations only (every generator update with --gan_grad_ratio); "
    "training is unchanged by it (bitwise), and each metrics window still reports it."
    calls, grad = [], torch.autograd.grad
    monkeypatch.setattr(torch.autograd, 'grad', lambda *a, **k: calls.append(1) or grad(*a, **k))
    kw = _kw(teacher_file, tmp_path / 'a', steps=6, dfake_gen_update_ratio=1, gan_classifier=True, real_image_path=str(_real_lmdb(tmp_path)),
             cls_hidden_channels=8, gen_cls_loss_weight=1e-2, ckpt_every=0, sample_every=0, log_every=3, generator_lr=1e-3)
    a = train_dmd2(DMD2Config(**kw))
    assert len(calls) == 2  # generator updates at iterations 0..5, measured at 0 and 3 (before this fix: 6)
    assert [('grad_norm_x_gan' in r) for r in read_metrics(tmp_path / 'a')] == [True, True]
    calls.clear(); b = train_dmd2(DMD2Config(**{**kw, 'run_dir': str(tmp_path / 'b'), 'log_every': 1}))
    assert len(calls) == 6
    assert all(torch.equal(p, q) for p, q in zip(a.models['generator'].parameters(), b.models['generator'].parameters()))
    calls.clear(); train_dmd2(DMD2Config(**{**kw, 'run_dir': str(tmp_path / 'c'), 'gan_grad_ratio': 0.5}))
    assert len(calls) == 6  # the ratio needs the norm at every generator update


def test_full_disk_during_checkpoint_and_truncated_resume(teacher_file, tmp_path, monkeypatch):
    "ENOSPC while writing a DMD2 checkpoint names it and the surviving one; a truncated newest checkpoint is skipped on --resume."
    import errno
    out = tmp_path / 'run'
    kw = _kw(teacher_file, out, steps=4, max_keep=5)
    train_dmd2(DMD2Config(**kw))
    save = torch.save
    def full_disk(obj, f, *a, **k):
        if 'step-00000006' in str(f): raise OSError(errno.ENOSPC, 'No space left on device')
        return save(obj, f, *a, **k)
    monkeypatch.setattr(torch, 'save', full_disk)
    with pytest.raises(UserError) as e: train_dmd2(DMD2Config(**{**kw, 'steps': 6, 'resume': 'auto'}))
    ck = out / 'checkpoints'
    assert str(e.value) == (f"{ck / 'step-00000006'}: could not write the checkpoint (No space left on device); "
                            f"the previous checkpoint {ck / 'step-00000004'} is intact")
    monkeypatch.setattr(torch, 'save', save)
    assert [p.name for p in ck.iterdir() if p.name.startswith('.')] == []  # no partial folder
    ts = ck / 'step-00000004' / 'training_state.pt'; ts.write_bytes(ts.read_bytes()[:64])
    with pytest.warns(UserWarning, match='step-00000004/training_state.pt: unreadable'):
        train_dmd2(DMD2Config(**{**kw, 'steps': 6, 'resume': 'auto'}))
    from distill_nb.learner import read_checkpoint
    assert [read_checkpoint(c)['step'] for c in list_checkpoints(ck)] == [2, 4, 6]  # resumed from 2; step 4 written again, whole


def test_cache_dir_ckpt_only_and_generator_ckpt(teacher_file, tmp_path):
    "--cache_dir copies (atomic, leftovers cleaned, --cache_keep rotation), --delete_ckpts, --ckpt_only_path step parsing, "
    "--generator_ckpt_path (generator only, from step 0)."
    out, cache = tmp_path / 'run', tmp_path / 'cache'
    (cache / '.tmp-step-00000002-dead').mkdir(parents=True); (cache / '.del-step-00000001').mkdir()
    dmd2_train(**_kw(teacher_file, out, steps=3, ckpt_every=1, max_keep=1, cache_dir=str(cache), cache_keep=2))
    assert [c.name for c in list_checkpoints(out / 'checkpoints')] == ['step-00000003']
    assert sorted(p.name for p in cache.iterdir()) == ['step-00000002', 'step-00000003']
    dmd2_train(**_kw(teacher_file, tmp_path / 'run2', ckpt_only_path=str(cache / 'step-00000002'), steps=4, ckpt_every=1))
    assert [c.name for c in list_checkpoints(tmp_path / 'run2' / 'checkpoints')] == ['step-00000003', 'step-00000004']
    g = out / 'checkpoints' / 'step-00000003' / 'generator.safetensors'
    learn = train_dmd2(DMD2Config(**_kw(teacher_file, tmp_path / 'run3', generator_ckpt_path=str(g), initialize_generator=False,
                                        steps=1, generator_lr=1e-30, guidance_lr=1e-30)))
    assert [c.name for c in list_checkpoints(tmp_path / 'run3' / 'checkpoints')] == ['step-00000001']
    assert torch.equal(learn.dmd2.generator.state_dict()['out.bias'], load_network(g).state_dict()['out.bias'])  # no step yet: ratio 5


def test_fid_during_training(teacher_file, tmp_path):
    "--ref_path/--detector_url/--fid_iters (the CIFAR port's spellings) give FID in metrics.jsonl (tiny detector and statistics)."
    from distill_nb.metrics import save_tiny_detector, compute_ref_stats
    det = save_tiny_detector(tmp_path / 'det.safetensors')
    compute_ref_stats(torch.rand(32, 3, 8, 8) * 2 - 1, dest=tmp_path / 'ref.npz', detector=det)
    c = _parse(['--teacher_model_path', teacher_file, '--output_path', tmp_path / 'run', '--batch_size', 4, '--train_iters', 2,
                '--log_iters', 2, '--wandb_iters', 2, '--device', 'cpu', '--warmup_step', 0, '--ref_path', tmp_path / 'ref.npz',
                '--detector_url', det, '--fid_iters', 2, '--total_eval_samples', 16, '--no_progress'])
    dmd2_train(c)
    assert np.isfinite(read_metrics(tmp_path / 'run')[-1]['fid'])


def test_backward_simulation_invariants(tmp_path):
    "Student inputs never depend on real data; one grad call per generator update, at the shared index; k=0 is pure noise."
    def run(real_seed):
        torch.manual_seed(0)
        model = DMD2(ToyEDMDenoiser(8, 3, 10, 8), gan_classifier=True, cls_hidden_channels=8, gen_cls_loss_weight=1., student_sigmas=[80., 10., 1.])
        rec = []
        model.generator.register_forward_pre_hook(lambda m, a: rec.append((torch.is_grad_enabled(), a[0].detach().clone(), a[1][0].item())))
        cfg = DMD2Config(run_dir=str(tmp_path / f'r{real_seed}'), batch=2, steps=6, ckpt_every=0, sample_every=0, dfake_gen_update_ratio=1,
                         warmup_step=0, device='cpu', gan_classifier=True, real_image_path=str(_real_lmdb(tmp_path, 8, real_seed)), seed=5,
                         student_sigmas=[80., 10., 1.], progress=False)
        train_dmd2(cfg, model=model)
        return rec
    rec1, rec2 = run(1), run(2)
    ks = [shared_step_index(3, 5, s) for s in range(6)]
    n0 = ks[0] + 1  # generator calls of iteration 0's generator turn: k rollout calls + 1 trained call
    assert len(rec1) >= n0 and all(torch.equal(a[1], b[1]) for a, b in zip(rec1[:n0], rec2[:n0]))
    sig = [80., 10., 1.]
    grad_calls = [r for r in rec1 if r[0]]
    assert [r[2] for r in grad_calls] == [sig[k] for k in ks]
    i = 0
    for k in ks:
        while not rec1[i][0]: i += 1
        assert [r[2] for r in rec1[i - k:i]] == sig[:k] and all(not r[0] for r in rec1[i - k:i])
        i += 1
    z = torch.randn(64, 3, 8, 8)
    x, s = backward_simulate(lambda *a: None, z, None, sig, 0)
    assert torch.equal(x, 80 * z) and s[0].item() == 80.


DDP_SCRIPT = textwrap.dedent('''
    import sys, torch, torch.distributed as dist
    from distill_nb import dmd2
    cfg = dmd2.DMD2Config(teacher=sys.argv[1], run_dir=sys.argv[2], batch=4, steps=4, ckpt_every=2, sample_every=2, device='cpu',
                          warmup_step=0, dfake_gen_update_ratio=2, student_sigmas=[80., 2.], generator_lr=1e-3, guidance_lr=1e-3, progress=False)
    learn = dmd2.train_dmd2(cfg)
    w = torch.cat([p.detach().flatten() for p in learn.models['generator'].parameters()])
    g = [torch.zeros_like(w) for _ in range(dist.get_world_size())]
    dist.all_gather(g, w)
    assert torch.equal(g[0], g[1]), 'ranks diverged'
    print('RANK_OK', dist.get_rank(), learn.update_counts)
''')


def test_torchrun_two_processes_gloo(teacher_file, tmp_path):
    "DDP on CPU (gloo): two ranks train a few-step generator (global batch 4 = 2 x 2), stay identical, rank 0 writes checkpoints."
    import socket
    script = tmp_path / 'ddp.py'; script.write_text(DDP_SCRIPT)
    with socket.socket() as s: s.bind(('127.0.0.1', 0)); port = s.getsockname()[1]
    r = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node', '2', '--master_addr', '127.0.0.1',
                        '--master_port', str(port), str(script), str(teacher_file), str(tmp_path / 'ddp')],
                       capture_output=True, text=True, env=_env(), timeout=300)
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-4000:])
    assert r.stdout.count('RANK_OK') == 2 and 'batch 4 = 2 processes x 2' in r.stdout
    assert list_checkpoints(tmp_path / 'ddp' / 'checkpoints')[-1].name == 'step-00000004'
    assert json.loads((tmp_path / 'ddp' / 'config.json').read_text())['config']['local_batch'] == 2


def test_consistency_generator_and_distill_generate(tmp_path):
    "--consistency_model_path: a ConsistencyPrecond generator (σ_min boundary) on an EDMPrecond(SongUNet) teacher; the saved "
    "generator runs with distill_generate --steps 1; a few-step generator runs with its stored σ list."
    torch.manual_seed(0)
    teacher, cm = _tiny_song('EDMPrecond'), _tiny_song('ConsistencyPrecond', sigma_min=0.002)
    x = torch.randn(2, 3, 16, 16)
    # boundary condition f(x, σ_min) = x: c_skip = 1 and c_out = 0 there; x ~ N(0, 1) is O(1), so atol 1e-5 is ~100 float32 spacings
    assert torch.allclose(cm(x, torch.full((2,), 0.002), torch.eye(10)[:2]), x, atol=1e-5)
    save_network(teacher, tmp_path / 't.safetensors'); save_network(cm, tmp_path / 'cm.safetensors')
    kw = dict(teacher=str(tmp_path / 't.safetensors'), batch=2, steps=2, ckpt_every=2, sample_every=0, device='cpu', warmup_step=0, progress=False)
    dmd2_train(**kw, consistency_model_path=str(tmp_path / 'cm.safetensors'), run_dir=str(tmp_path / 'run'))
    gfile = list_checkpoints(tmp_path / 'run' / 'checkpoints')[-1] / 'generator.safetensors'
    meta = read_network_meta(gfile)
    assert meta['config']['class_name'] == 'ConsistencyPrecond' and meta['sampler'] == {'kind': 'one_step', 'sigma': 80.0}
    g = load_network(gfile)
    assert all(m.dropout == 0 for m in g.modules() if isinstance(getattr(m, 'dropout', None), float))  # dropout off
    from distill_nb.generate import distill_generate
    distill_generate(network=str(gfile), outdir=str(tmp_path / 'img'), seeds='0-3', steps=1, device='cpu')
    assert len(list((tmp_path / 'img').glob('*.png'))) == 4
    # few-step (backward simulation) generator: stored as a multistep schedule that distill_generate follows
    dmd2_train(**kw, student_sigmas='80,2.5', run_dir=str(tmp_path / 'few'))
    for gfile in (list_checkpoints(tmp_path / 'few' / 'checkpoints')[-1] / 'generator.safetensors', tmp_path / 'few' / 'network-final.safetensors'):
        assert read_network_meta(gfile)['sampler'] == {'kind': 'consistency', 'sigmas': [80.0, 2.5]}
    assert DMDGenerator(gfile, device='cpu').sigmas == [80.0, 2.5]
    distill_generate(network=str(gfile), outdir=str(tmp_path / 'img2'), seeds='0-1', device='cpu')
    assert len(list((tmp_path / 'img2').glob('*.png'))) == 2
