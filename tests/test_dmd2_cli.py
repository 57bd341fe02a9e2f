"CLI and trainer-level tests of DMD2 (`dmd2_train`) and DMD v1 (`dmd_train`): flags, resume, FID switch, backward simulation, DDP."
import json, os, subprocess, sys, textwrap
from pathlib import Path
import numpy as np
import pytest
import torch

from distill_nb.checkpoints import save_network, read_network_meta, load_network
from distill_nb.learner import list_checkpoints
from distill_nb.dmd2 import (DMD2, DMD2Config, ToyEDMDenoiser, dmd2_learner, dmd2_train, shared_step_index, DMDGenerator,
                             backward_simulate)

ROOT = Path(__file__).resolve().parents[1]


def _env():
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get('PYTHONPATH', ''), OMP_NUM_THREADS='1')
    env.pop('WORLD_SIZE', None); env.pop('RANK', None)
    return env


@pytest.fixture(scope='module')
def teacher_file(tmp_path_factory):
    d = tmp_path_factory.mktemp('teacher')
    torch.manual_seed(0)
    return save_network(ToyEDMDenoiser(8, 3, 10, 8), d / 'teacher.safetensors')


def _run_cli(args, module='distill_nb.dmd2', fn='dmd2_train', timeout=240, tmp=None):
    "Run a CLI the way its console script does (a tiny `__main__` file importing and calling the entry point)."
    import tempfile
    script = Path(tempfile.mkdtemp()) / f'{fn}.py'
    script.write_text(f'import sys\nfrom {module} import {fn}\nif __name__ == "__main__": sys.exit({fn}())\n')
    return subprocess.run([sys.executable, str(script), *map(str, args)], capture_output=True, text=True, env=_env(), timeout=timeout)


def test_cli_train_resume_and_outputs(teacher_file, tmp_path):
    "Reference flags parse; memory estimate printed before training; FID off message; checkpoints; sampler meta; resume."
    out = tmp_path / 'run'
    base = ['--teacher_model_path', teacher_file, '--output_path', out, '--batch_size', 2, '--log_iters', 2,
            '--initialie_generator', '--dataset_name', 'cifar10', '--device', 'cpu', '--warmup_step', 0, '--seed', 3,
            '--generator_lr', 1e-4, '--guidance_lr', 1e-4, '--dfake_gen_update_ratio', 2, '--num_train_timesteps', 40,
            '--min_step_percent', 0.02, '--max_step_percent', 0.98, '--sigma_max', 80, '--sigma_min', 0.002,
            '--sigma_data', 0.5, '--rho', 7, '--conditioning_sigma', 80, '--max_grad_norm', 10, '--num_workers', 0,
            '--label_dim', 10, '--max_checkpoint', 5, '--wandb_name', 'x']
    r = _run_cli(base + ['--train_iters', 4])
    assert r.returncode == 0, r.stderr[-3000:]
    text = r.stdout
    assert 'FID is off' in text
    mem, first_log = text.index('memory estimate:'), text.index('step=2')
    assert mem < first_log
    cks = list_checkpoints(out / 'checkpoints')
    assert [c.name for c in cks] == ['step-00000002', 'step-00000004']
    meta = read_network_meta(cks[-1] / 'generator.safetensors')
    assert meta['sampler'] == {'kind': 'one_step', 'sigma': 80.0}
    cfg = json.loads((out / 'config.json').read_text())
    assert cfg['config']['num_train_timesteps'] == 40 and 'config_hash' in cfg
    # resume continues from step 4
    r = _run_cli(base + ['--train_iters', 6, '--resume'])
    assert r.returncode == 0, r.stderr[-3000:]
    assert 'resuming from latest' in r.stdout
    assert list_checkpoints(out / 'checkpoints')[-1].name == 'step-00000006'
    # the saved generator samples with DMDGenerator
    g = DMDGenerator(list_checkpoints(out / 'checkpoints')[-1] / 'generator.safetensors', device='cpu')
    assert g.generate_batch([0, 1], 3).shape == (2, 3, 8, 8)


def test_cli_help_and_flag_errors(teacher_file, tmp_path):
    from fastcore.script import anno_parser
    help_text = anno_parser(dmd2_train.__wrapped__, 'dmd2_train').format_help()
    assert '--initialie_generator' in help_text and '--initialize_generator' in help_text
    for flag in ['--teacher_model_path', '--consistency_model_path', '--model_id', '--ckpt_only_path', '--generator_ckpt_path',
                 '--cache_dir', '--cls_loss_weight', '--diffusion_gan_max_timestep', '--ref_path', '--detector_url', '--delete_ckpts']:
        assert flag in help_text, flag
    with pytest.raises(ValueError, match='--initialie_generator'):
        dmd2_train(teacher_model_path=str(teacher_file), output_path=str(tmp_path / 'a'), train_iters=1, device='cpu')
    with pytest.raises(ValueError, match='--dataset_name'):
        dmd2_train(teacher_model_path=str(teacher_file), dataset_name='mnist', initialize_generator=True, device='cpu')
    with pytest.raises(ValueError, match='--label_dim'):
        dmd2_train(teacher_model_path=str(teacher_file), output_path=str(tmp_path / 'b'), label_dim=1000,
                   initialize_generator=True, train_iters=1, device='cpu', dataset_name='cifar10')
    with pytest.raises(ValueError, match='--real_image_path'):
        dmd2_train(teacher_model_path=str(teacher_file), output_path=str(tmp_path / 'c'), gan_classifier=True,
                   initialize_generator=True, train_iters=1, device='cpu', dataset_name='cifar10')


def test_alias_model_id_delete_ckpts_cache_dir_and_ckpt_only(teacher_file, tmp_path):
    "--model_id alias, --initialize_generator alias, --delete_ckpts, --cache_dir rotation, --ckpt_only_path step parsing."
    out, cache = tmp_path / 'run', tmp_path / 'cache'
    kw = dict(model_id=str(teacher_file), output_path=str(out), batch_size=2, log_iters=1, train_iters=3, initialize_generator=True,
              device='cpu', dataset_name='cifar10', warmup_step=0, num_workers=0, delete_ckpts=True, cache_dir=str(cache),
              max_checkpoint=2)
    dmd2_train(**kw)
    assert [c.name for c in list_checkpoints(out / 'checkpoints')] == ['step-00000003']
    assert [c.name for c in list_checkpoints(cache)] == ['step-00000002', 'step-00000003']
    out2 = tmp_path / 'run2'
    dmd2_train(**{**kw, 'output_path': str(out2), 'ckpt_only_path': str(cache / 'step-00000002'), 'train_iters': 4,
                  'cache_dir': None, 'delete_ckpts': False, 'model_id': None, 'teacher_model_path': str(teacher_file)})
    assert [c.name for c in list_checkpoints(out2 / 'checkpoints')] == ['step-00000003', 'step-00000004']
    # --generator_ckpt_path: only the generator is loaded (a .safetensors file or a checkpoint folder); training starts at 0
    out3 = tmp_path / 'run3'
    dmd2_train(**{**kw, 'output_path': str(out3), 'generator_ckpt_path': str(out / 'checkpoints' / 'step-00000003' / 'generator.safetensors'),
                  'train_iters': 1, 'cache_dir': None, 'initialize_generator': False})
    assert [c.name for c in list_checkpoints(out3 / 'checkpoints')] == ['step-00000001']


def test_fid_value_printed(teacher_file, tmp_path, capsys):
    "--ref_path plus --detector_url switch FID on (tiny detector and reference statistics)."
    from distill_nb.metrics import save_tiny_detector, compute_ref_stats
    det = save_tiny_detector(tmp_path / 'det.safetensors')
    compute_ref_stats(torch.rand(32, 3, 8, 8) * 2 - 1, dest=tmp_path / 'ref.npz', detector=det)
    dmd2_train(teacher_model_path=str(teacher_file), output_path=str(tmp_path / 'run'), batch_size=4, log_iters=2, train_iters=2,
               initialize_generator=True, device='cpu', dataset_name='cifar10', warmup_step=0, num_workers=0,
               ref_path=str(tmp_path / 'ref.npz'), detector_url=str(det), fid_samples=16)
    out = capsys.readouterr().out
    assert 'FID is off' not in out and 'step 2: FID' in out


def _few_step_learner(tmp_path, real_scale, seed=0):
    "A few-step GAN DMD2 learner whose generator records its inputs."
    from distill_nb.data.lmdb_dataset import LMDBDataset, write_lmdb
    rng = np.random.default_rng(real_scale)
    p = tmp_path / f'real{real_scale}.lmdb'
    if not p.exists(): write_lmdb(p, [(rng.integers(0, 256, (3, 8, 8), dtype=np.uint8), i % 10) for i in range(8)])
    torch.manual_seed(seed)
    model = DMD2(ToyEDMDenoiser(8, 3, 10, 8), gan_classifier=True, cls_hidden_channels=8, gen_cls_loss_weight=1.,
                 student_sigmas=[80., 10., 1.])
    rec = []
    model.generator.register_forward_pre_hook(lambda m, a: rec.append((torch.is_grad_enabled(), a[0].detach().clone(), a[1][0].item())))
    cfg = DMD2Config(output_path=str(tmp_path / f'r{real_scale}'), batch_size=2, log_iters=10 ** 9, dfake_gen_update_ratio=1,
                     warmup_step=0, device='cpu', gan_classifier=True, seed=5, num_workers=0, student_sigmas=[80., 10., 1.])
    learn = dmd2_learner(model, cfg, LMDBDataset(p), log_fn=lambda s: None)
    return learn, rec


def test_backward_simulation_invariants(tmp_path):
    "Student inputs never depend on real data; one grad call per generator update, at the shared index; k=0 is pure noise."
    l1, rec1 = _few_step_learner(tmp_path, 1); l1.fit(6)
    l2, rec2 = _few_step_learner(tmp_path, 2); l2.fit(6)
    # the training runs see different real images but identical student inputs (GAN changes weights only later: compare
    # the first iteration's rollout, which precedes any update)
    ks = [shared_step_index(3, 5, s) for s in range(6)]
    n0 = ks[0] + 1  # generator calls of iteration 0's generator turn: k rollout calls + 1 trained call
    assert len(rec1) >= n0 and all(torch.equal(a[1], b[1]) for a, b in zip(rec1[:n0], rec2[:n0]))
    # in each generator turn exactly one call has grad enabled, at σ_k; the rollout calls before it run at σ_0..σ_{k-1}
    sig = [80., 10., 1.]
    grad_calls = [r for r in rec1 if r[0]]
    assert [r[2] for r in grad_calls] == [sig[k] for k in ks]
    i = 0
    for k in ks:
        while not rec1[i][0]: i += 1
        assert [r[2] for r in rec1[i - k:i]] == sig[:k] and all(not r[0] for r in rec1[i - k:i])
        i += 1
    # k = 0 input is σ_0·z: pure noise (std ≈ 80)
    z = torch.randn(64, 3, 8, 8)
    x, s = backward_simulate(lambda *a: None, z, None, sig, 0)
    assert torch.equal(x, 80 * z) and s[0].item() == 80.


DDP_SCRIPT = textwrap.dedent('''
    import sys, torch, torch.distributed as dist
    from distill_nb.dmd2 import dmd2_train
    learn = None
    from distill_nb import dmd2
    out = sys.argv[2]
    cfg = dmd2.DMD2Config(teacher_model_path=sys.argv[1], output_path=out, batch_size=2, train_iters=4, log_iters=2,
                          device='cpu', warmup_step=0, num_workers=0, dfake_gen_update_ratio=2, student_sigmas=[80., 2.],
                          generator_lr=1e-3, guidance_lr=1e-3)
    learn = dmd2.train_dmd2(cfg, log_fn=print)
    w = torch.cat([p.detach().flatten() for p in learn.models['generator'].parameters()])
    g = [torch.zeros_like(w) for _ in range(dist.get_world_size())]
    dist.all_gather(g, w)
    assert torch.equal(g[0], g[1]), 'ranks diverged'
    print('RANK_OK', dist.get_rank(), learn.update_counts)
''')


def test_torchrun_two_processes_gloo(teacher_file, tmp_path):
    "DDP on CPU (gloo): two ranks train a few-step generator, stay identical, rank 0 writes checkpoints."
    import socket
    script = tmp_path / 'ddp.py'; script.write_text(DDP_SCRIPT)
    with socket.socket() as s: s.bind(('127.0.0.1', 0)); port = s.getsockname()[1]
    r = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node', '2', '--master_addr', '127.0.0.1',
                        '--master_port', str(port),
                        str(script), str(teacher_file), str(tmp_path / 'ddp')], capture_output=True, text=True, env=_env(), timeout=300)
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-4000:])
    assert r.stdout.count('RANK_OK') == 2
    assert list_checkpoints(tmp_path / 'ddp' / 'checkpoints')[-1].name == 'step-00000004'


def test_dmd_train_hyphenated_cli(tmp_path, teacher_file, capsys):
    "dmd_train accepts the reference's hyphenated flags through the console entry point."
    from distill_nb.data.pairs import write_pairs
    from distill_nb.samplers import edm_sampler
    t = load_network(teacher_file)
    write_pairs(tmp_path / 'pairs.hdf5', t, list(range(8)), [i % 10 for i in range(8)],
                sample_fn=lambda n, z, y: edm_sampler(n, z, y, num_steps=3).float(), batch_size=8)
    from distill_nb.dmd import dmd_train_main
    dmd_train_main(list(map(str, ['--model-path', teacher_file, '--data-path', tmp_path / 'pairs.hdf5', '--output-dir', tmp_path / 'out',
                                  '--epochs', 2, '--batch-size', 4, '--log-iters', 2, '--device', 'cpu', '--num-workers', 0])))
    out = capsys.readouterr().out
    assert 'regression loss: L2' in out or 'regression loss: LPIPS' in out
    assert list_checkpoints(tmp_path / 'out' / 'checkpoints')[-1].name == 'step-00000004'  # 2 epochs x 8/4


def _tiny_song(cls_name, **kw):
    from distill_nb import networks, precond  # register the classes
    from distill_nb.core import REGISTRY
    assert networks.SongUNet and precond.ConsistencyPrecond
    cfg = dict(img_resolution=16, img_channels=3, label_dim=10, model_type='SongUNet', model_channels=16, channel_mult=[1, 2],
               num_blocks=1, attn_resolutions=[], channel_mult_emb=2, dropout=0.1, augment_dim=9)
    return REGISTRY[cls_name](**cfg, **kw)


def test_consistency_generator_and_distill_generate(tmp_path):
    "--consistency_model_path: a ConsistencyPrecond generator (σ_min boundary) on an EDMPrecond(SongUNet) teacher; the saved "
    "generator runs with distill_generate --steps 1; a few-step generator runs with its stored σ list."
    torch.manual_seed(0)
    teacher, cm = _tiny_song('EDMPrecond'), _tiny_song('ConsistencyPrecond', sigma_min=0.002)
    x = torch.randn(2, 3, 16, 16)
    # boundary condition f(x, σ_min) = x: c_skip = 1 and c_out = 0 there; x ~ N(0, 1) is O(1), so atol 1e-5 is ~100 float32 spacings
    assert torch.allclose(cm(x, torch.full((2,), 0.002), torch.eye(10)[:2]), x, atol=1e-5)
    save_network(teacher, tmp_path / 't.safetensors'); save_network(cm, tmp_path / 'cm.safetensors')
    dmd2_train(teacher_model_path=str(tmp_path / 't.safetensors'), consistency_model_path=str(tmp_path / 'cm.safetensors'),
               output_path=str(tmp_path / 'run'), batch_size=2, train_iters=2, log_iters=2, device='cpu', dataset_name='cifar10',
               warmup_step=0, num_workers=0, gan_classifier=False)
    gfile = list_checkpoints(tmp_path / 'run' / 'checkpoints')[-1] / 'generator.safetensors'
    meta = read_network_meta(gfile)
    assert meta['config']['class_name'] == 'ConsistencyPrecond' and meta['sampler'] == {'kind': 'one_step', 'sigma': 80.0}
    g = load_network(gfile)
    assert all(m.dropout == 0 for m in g.modules() if isinstance(getattr(m, 'dropout', None), float))  # dropout off
    from distill_nb.generate import distill_generate
    distill_generate(network=str(gfile), outdir=str(tmp_path / 'img'), seeds='0-3', steps=1, device='cpu')
    assert len(list((tmp_path / 'img').glob('*.png'))) == 4
    # few-step (backward simulation) generator: stored as a multistep schedule that distill_generate follows
    dmd2_train(teacher_model_path=str(tmp_path / 't.safetensors'), output_path=str(tmp_path / 'few'), batch_size=2, train_iters=2,
               log_iters=2, device='cpu', dataset_name='cifar10', warmup_step=0, num_workers=0, initialize_generator=True,
               student_sigmas='80,2.5')
    gfile = list_checkpoints(tmp_path / 'few' / 'checkpoints')[-1] / 'generator.safetensors'
    assert read_network_meta(gfile)['sampler'] == {'kind': 'consistency', 'sigmas': [80.0, 2.5]}
    assert DMDGenerator(gfile, device='cpu').sigmas == [80.0, 2.5]
    distill_generate(network=str(gfile), outdir=str(tmp_path / 'img2'), seeds='0-1', device='cpu')
    assert len(list((tmp_path / 'img2').glob('*.png'))) == 2


def _one_line_error(r, prog='dmd2_train'):
    "Exit status 2, one stderr line `prog: error: ...`, no traceback."
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    assert r.returncode == 2, (r.returncode, r.stdout[-1000:], r.stderr[-3000:])
    assert len(lines) == 1 and lines[0].startswith(f'{prog}: error: ') and 'Traceback' not in r.stderr, r.stderr[-3000:]
    return lines[0]


def _tiny_args(teacher_file, out, *extra):
    return ['--teacher_model_path', teacher_file, '--output_path', out, '--batch_size', 2, '--log_iters', 2, '--initialize_generator',
            '--dataset_name', 'cifar10', '--device', 'cpu', '--warmup_step', 0, '--num_workers', 0, *extra]


def test_cli_second_run_refused_overwrite_and_bad_flags(teacher_file, tmp_path):
    "A second run into --output_path is refused (it used to overwrite the checkpoints and append to metrics.jsonl); --overwrite "
    "replaces it; --dfake_gen_update_ratio 0 (a ZeroDivisionError) and --batch_size -2 ('negative dimension') are one-line errors."
    out = tmp_path / 'run'
    r = _run_cli(_tiny_args(teacher_file, out, '--train_iters', 2)); assert r.returncode == 0, r.stderr[-3000:]
    before = {p: p.read_bytes() for p in out.rglob('*') if p.is_file()}
    msg = _one_line_error(_run_cli(_tiny_args(teacher_file, out, '--train_iters', 2)))
    assert f'{out}: holds a previous run' in msg and 'use --resume to continue it or --overwrite to replace it' in msg
    assert {p: p.read_bytes() for p in out.rglob('*') if p.is_file()} == before
    r = _run_cli(_tiny_args(teacher_file, out, '--train_iters', 4, '--overwrite')); assert r.returncode == 0, r.stderr[-3000:]
    assert [json.loads(l)['step'] for l in (out / 'metrics.jsonl').read_text().splitlines()] == [2, 4]
    msg = _one_line_error(_run_cli(_tiny_args(teacher_file, tmp_path / 'x', '--train_iters', 2, '--dfake_gen_update_ratio', 0)))
    assert msg == 'dmd2_train: error: --dfake_gen_update_ratio: expected a positive number, got 0'
    msg = _one_line_error(_run_cli(_tiny_args(teacher_file, tmp_path / 'x', '--train_iters', 2, '--batch_size', -2)))
    assert msg == 'dmd2_train: error: --batch_size: expected a positive number, got -2'
    assert not (tmp_path / 'x').exists()


def _kw(teacher_file, out, **kw):
    return {**dict(teacher_model_path=str(teacher_file), output_path=str(out), batch_size=2, log_iters=2, train_iters=2,
                   initialize_generator=True, device='cpu', dataset_name='cifar10', warmup_step=0, num_workers=0), **kw}


@pytest.mark.parametrize('bad, msg', [
    (dict(train_iters=-1), '--train_iters: expected a positive number, got -1'),
    (dict(log_iters=0), '--log_iters'), (dict(warmup_step=-5), '--warmup_step'), (dict(guidance_lr=0.), '--guidance_lr'),
    (dict(max_step_percent=1.5), '--max_step_percent: expected a fraction in [0, 1], got 1.5'),
    (dict(sigma_min=100.), '--sigma_min 100.0 must be below --sigma_max 80.0'), (dict(num_train_timesteps=0), '--num_train_timesteps'),
    (dict(diffusion_gan_max_timestep=2000), '--diffusion_gan_max_timestep: expected a grid index in [0, 1000], got 2000'),
    (dict(student_sigmas='80,abc'), '--student_sigmas: expected comma-separated numbers'), (dict(max_checkpoint=0), '--max_checkpoint'),
    (dict(label_dim=1000), '--label_dim 1000 does not match the teacher'), (dict(max_grad_norm=-1.), '--max_grad_norm'),
])
def test_flag_checks_in_process(teacher_file, tmp_path, bad, msg):
    from distill_nb.core import UserError
    with pytest.raises(UserError) as e: dmd2_train(**_kw(teacher_file, tmp_path / 'r', **bad))
    assert msg in str(e.value), str(e.value)
    assert not (tmp_path / 'r').exists()


def test_real_data_that_does_not_fit_the_teacher(teacher_file, tmp_path):
    "An LMDB at another resolution or with more classes than the teacher: the error names both values."
    from distill_nb.core import UserError
    from distill_nb.data.lmdb_dataset import write_lmdb
    rng = np.random.default_rng(0)
    write_lmdb(tmp_path / 'r16.lmdb', [(rng.integers(0, 256, (3, 16, 16), dtype=np.uint8), i % 10) for i in range(4)])
    write_lmdb(tmp_path / 'c1.lmdb', [(rng.integers(0, 256, (1, 8, 8), dtype=np.uint8), i % 10) for i in range(4)])
    write_lmdb(tmp_path / 'l20.lmdb', [(rng.integers(0, 256, (3, 8, 8), dtype=np.uint8), 19 - i) for i in range(20)])
    for name, msg in [('r16', 'images are 3x16x16, but the teacher makes 3x8x8 images'), ('c1', 'images are 1x8x8, but the teacher makes 3x8x8'),
                      ('l20', 'labels span 20 classes, but the teacher has label_dim 10')]:
        with pytest.raises(UserError, match=msg):
            dmd2_train(**_kw(teacher_file, tmp_path / name, gan_classifier=True, real_image_path=str(tmp_path / f'{name}.lmdb')))


def test_full_disk_during_checkpoint_and_truncated_resume(teacher_file, tmp_path, monkeypatch):
    "ENOSPC while writing a DMD2 checkpoint names it and the surviving one; a truncated newest checkpoint is skipped on --resume."
    import errno
    from distill_nb.core import UserError
    out = tmp_path / 'run'
    dmd2_train(**_kw(teacher_file, out, train_iters=4, max_checkpoint=5))
    save = torch.save
    def full_disk(obj, f, *a, **k):
        if 'step-00000006' in str(f): raise OSError(errno.ENOSPC, 'No space left on device')
        return save(obj, f, *a, **k)
    monkeypatch.setattr(torch, 'save', full_disk)
    with pytest.raises(UserError) as e: dmd2_train(**_kw(teacher_file, out, train_iters=6, max_checkpoint=5, resume=True))
    ck = out / 'checkpoints'
    assert str(e.value) == (f"{ck / 'step-00000006'}: could not write the checkpoint (No space left on device); "
                            f"the previous checkpoint {ck / 'step-00000004'} is intact")
    monkeypatch.setattr(torch, 'save', save)
    assert [p.name for p in ck.iterdir() if p.name.startswith('.')] == []  # no partial folder
    ts = ck / 'step-00000004' / 'training_state.pt'; ts.write_bytes(ts.read_bytes()[:64])
    with pytest.warns(UserWarning, match='step-00000004/training_state.pt: unreadable'):
        dmd2_train(**_kw(teacher_file, out, train_iters=6, max_checkpoint=5, resume=True))
    from distill_nb.learner import read_checkpoint
    assert [read_checkpoint(c)['step'] for c in list_checkpoints(ck)] == [2, 4, 6]  # resumed from 2; step 4 written again, whole


def test_cache_dir_copy_is_atomic_and_leftovers_cleaned(teacher_file, tmp_path):
    out, cache = tmp_path / 'run', tmp_path / 'cache'
    (cache / '.tmp-step-00000002-dead').mkdir(parents=True); (cache / '.del-step-00000001').mkdir()
    dmd2_train(**_kw(teacher_file, out, train_iters=6, cache_dir=str(cache), max_checkpoint=2))
    assert sorted(p.name for p in cache.iterdir()) == ['step-00000004', 'step-00000006']
