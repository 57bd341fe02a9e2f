"Tests of the DKDM commands `dkdm_prepare` / `dkdm_train` / `dkdm_baseline` on the run layer: reference command lines, pool files, modes, fp16, exact resume, run folders, baselines, errors (tiny ADM teacher, T = 20, CPU)."
import json, os, subprocess, sys
from pathlib import Path
import pytest
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path: sys.path.insert(0, str(ROOT))  # works without `pip install -e .`
from distill_nb.adm import ADMUNet, adm_kwargs_from_flags
from distill_nb.config import parse_config
from distill_nb.core import UserError
from distill_nb.dkdm import (dkdm_prepare, dkdm_train, dkdm_baseline, load_pool, read_pool_meta, DKDMConfig, DKDMPrepareConfig,
                             DKDMBaselineConfig, DKDM_ALIASES, DKDM_PRESETS, DKDM_PREPARE_ALIASES, DKDM_PREPARE_PRESETS,
                             DKDM_BASELINE_ALIASES, DKDM_BASELINE_PRESETS, FINAL_FILE, sample_ddpm_network)
from distill_nb.data.lmdb_dataset import LMDBDataset, write_lmdb
from distill_nb.learner import load_module, list_checkpoints


TINY = dict(image_size=8, num_channels=32, num_res_blocks=1, channel_mult='1,2', attention_resolutions='4', num_head_channels=16,
            learn_sigma=True, dropout=0.0, resblock_updown=True, use_new_attention_order=True, use_scale_shift_norm=True,
            diffusion_steps=20, noise_schedule='cosine', clip_denoised=True)
STUDENT = dict(student_channels=32, student_res_blocks=1, student_channel_mult='1,2', student_attention='4', student_head_channels=16,
               student_dropout=0.0)  # a tiny student, flag by flag
STUDENT_ARGV = [w for k, v in STUDENT.items() for w in (f'--{k}', str(v))]
QUIET = dict(progress=False, sample_every=0, precision='fp32', device='cpu')

@pytest.fixture(scope='module')
def teacher(tmp_path_factory):
    d = tmp_path_factory.mktemp('teacher')
    torch.manual_seed(0)
    m = ADMUNet(**adm_kwargs_from_flags(**TINY))
    for p in m.parameters(): nn.init.normal_(p, std=0.02)
    torch.save(m.state_dict(), d/'teacher.pt')
    (d/'teacher.json').write_text(json.dumps(TINY))
    return d/'teacher.pt'

def prepare(teacher, out, **kw):
    args = dict(teacher=str(teacher), out=str(out), rho=0.5, batch=4, teacher_batch=16, device='cpu'); args.update(kw)
    return dkdm_prepare(**args)

def train(teacher, out, **kw):
    args = dict(teacher=str(teacher), run_dir=str(out), **STUDENT, **QUIET, batch=4, steps=4, ckpt_every=2, max_keep=0, log_every=1, lr=1e-3)
    args.update(kw)
    return dkdm_train(**args)

def in_process(cli, argv, monkeypatch):
    "Run a console script in this process as the shell would (sys.argv), for the cost of the steps only."
    monkeypatch.setattr(sys, 'argv', [cli.__name__, *map(str, argv)])
    return cli()

# --- the reference command lines (qianlong0502/DKDM guided-diffusion README and YAML keys) ---

def test_reference_command_lines_parse(tmp_path):
    "`scripts/image_kd.py --config <yaml>` etc.: the YAML is a preset of the same name; the scripts' flags and YAML keys are aliases."
    argv = ['--preset', 'CIFAR10-14M-Dynamic-0.4', '--exp_dir', 'experiments/kd', '--model_path', 'model/32x32_diffusion_cifar10.pt',
            '--tempfile', 'experiments/cache/CIFAR10-Dynamic-0.4', '--iter_choice', 'dynamic_iterative_distillation', '--BATCH', '0.4',
            '--batch_size', '128', '--save_interval', '10000', '--log_interval', '10', '--ema_rate', '0.9999', '--use_fp16', 'true',
            '--resume_checkpoint', 'experiments/kd/x/checkpoints/step-00010000']
    for ws in (1, 4):  # the reference's batch_size is global (image_kd.py divides it by the world size): no conversion
        c = parse_config(DKDMConfig, argv, DKDM_ALIASES, DKDM_PRESETS, world_size=ws)
        assert (c.batch, c.local_batch(ws), c.rho, c.mode, c.student, c.teacher_arch) == (128, 128 // ws, 0.4, 'dynamic', '14M', 'cifar10')
        assert (c.run_dir, c.teacher, c.pool, c.ckpt_every, c.log_every) == ('experiments/kd', 'model/32x32_diffusion_cifar10.pt',
                                                                              'experiments/cache/CIFAR10-Dynamic-0.4', 10000, 10)
        assert (c.ema_rate, c.ema, c.precision, c.lr, c.weight_decay) == (0.9999, 0., 'fp16', 1e-4, 0.)
        assert c.resume == 'experiments/kd/x/checkpoints/step-00010000'
    c = parse_config(DKDMConfig, ['--preset', 'CelebA64-57M-Dynamic-0.4', '--teacher', 't.pt'], DKDM_ALIASES, DKDM_PRESETS, world_size=4)
    assert (c.batch, c.local_batch(4), c.student, c.teacher_arch, c.teacher_batch) == (256, 64, '57M-CelebA', 'celeba64', 256)  # 4 A100 x 64
    for name, mode in [('iterative_distillation', 'iterative'), ('shffled_iterative_distillation', 'shuffled')]:
        assert parse_config(DKDMConfig, ['--teacher', 't', '--iter_choice', name], DKDM_ALIASES, DKDM_PRESETS, world_size=1).mode == mode
    # a preset is overridable flag by flag, and the former spellings still parse
    c = parse_config(DKDMConfig, ['--preset', 'imagenet32', '--teacher', 't', '--student', '24M', '--student_channels', '80', '--batch', '64',
                                  '--amp', 'bf16', '--teacher_amp', 'none', '--save_every', '7', '--out', 'r'], DKDM_ALIASES, DKDM_PRESETS, world_size=1)
    assert (c.student, c.student_channels, c.batch, c.precision, c.teacher_precision, c.ckpt_every, c.run_dir, c.teacher_arch) == \
           ('24M', 80, 64, 'bf16', 'fp32', 7, 'r', 'imagenet32')
    # scripts/dynamic_prepare.py --config <yaml>
    p = parse_config(DKDMPrepareConfig, ['--preset', 'cifar10', '--model_path', 't.pt', '--tempfile', 'cache/c10', '--BATCH', '0.4'],
                     DKDM_PREPARE_ALIASES, DKDM_PREPARE_PRESETS, world_size=1)
    assert (p.teacher, p.out, p.rho, p.batch, p.teacher_batch) == ('t.pt', 'cache/c10', 0.4, 128, 3072)
    # scripts/image_train.py --data_dir <dir> --config <yaml>: trains on the folder it is given
    b = parse_config(DKDMBaselineConfig, ['--preset', 'CIFAR10-14M-Baseline', '--data_dir', str(tmp_path), '--exp_dir', 'e', '--no_hflip', 'true'],
                     DKDM_BASELINE_ALIASES, DKDM_BASELINE_PRESETS, world_size=1)
    assert (b.real_data, b.fraction(), b.synthetic_path(), b.run_dir, b.hflip, b.batch, b.n_synthetic) == (str(tmp_path), 1., None, 'e', False, 128, 50000)
    b = parse_config(DKDMBaselineConfig, ['--preset', 'CIFAR10-14M-Baseline-0.1', '--real_data', str(tmp_path), '--exp_dir', 'e'],
                     DKDM_BASELINE_ALIASES, DKDM_BASELINE_PRESETS, world_size=1)
    assert (b.fraction(), b.synthetic_path()) == (0.1, Path('e')/'synthetic')
    with pytest.raises(UserError, match='--iter_choice'): parse_config(DKDMConfig, ['--iter_choice', 'random'], DKDM_ALIASES, DKDM_PRESETS, world_size=1)
    with pytest.raises(UserError, match='--ema .*--ema_rate'): parse_config(DKDMConfig, ['--teacher', 't', '--ema', '500', '--ema_rate', '0.999'], DKDM_ALIASES, DKDM_PRESETS, world_size=1)

def test_reference_command_lines_run(teacher, tmp_path, monkeypatch):
    "The same spellings, as typed in a shell, for a few tiny steps: prepare, distil, sample the final student from its metadata."
    in_process(dkdm_prepare, ['--preset', 'cifar10', '--model_path', teacher, '--tempfile', tmp_path/'cache', '--BATCH', '0.5',
                              '--batch_size', '4', '--chunk', '16', '--device', 'cpu'], monkeypatch)
    in_process(dkdm_train, ['--preset', 'CIFAR10-14M-Dynamic-0.4', '--model_path', teacher, '--tempfile', tmp_path/'cache', '--exp_dir', tmp_path/'kd',
                            '--batch_size', '4', '--steps', '2', '--use_fp16', 'false', '--device', 'cpu', '--no_progress', 'true', '--sample_every', '0',
                            *STUDENT_ARGV], monkeypatch)
    net = load_module(tmp_path/'kd'/FINAL_FILE)
    meta = net.distill_meta['sampler']
    assert meta['kind'] == 'ddpm' and meta['diffusion']['diffusion_steps'] == 20 and meta['diffusion']['learn_sigma'] and meta['steps'] == '50'
    x = sample_ddpm_network(net, 2, steps='4')
    assert x.shape == (2, 3, 8, 8) and torch.isfinite(x).all() and x.abs().max() <= 1
    assert torch.equal(sample_ddpm_network(net, 1, seed=1, steps='4'), x[1:])  # an image depends on its seed only, as in distill_generate
    cfg = json.loads((tmp_path/'kd'/'config.json').read_text())['config']
    assert (cfg['method_config'], cfg['batch'], cfg['ema_rate'], cfg['mode'], cfg['teacher_flags']['diffusion_steps']) == ('DKDMConfig', 4, 0.9999, 'dynamic', 20)
    from distill_nb import samplers
    if 'ddpm' in samplers.SAMPLERS:  # distill_generate reads the same metadata (sampler kind 'ddpm', nbs/04_samplers)
        in_process(__import__('distill_nb.generate', fromlist=['x']).distill_generate,
                   ['--network', tmp_path/'kd'/FINAL_FILE, '--outdir', tmp_path/'png', '--seeds', '0-1', '--steps', '4', '--device', 'cpu'], monkeypatch)
        assert sorted(p.name for p in (tmp_path/'png').iterdir()) == ['000000.png', '000001.png']

# --- pools, modes, resume ---

def test_prepare_pool_files(teacher, tmp_path):
    prepare(teacher, tmp_path/'pool', shards=2)
    files = sorted((tmp_path/'pool').glob('*.safetensors'))
    assert [f.name for f in files] == ['pool-00000-of-00002.safetensors', 'pool-00001-of-00002.safetensors']
    meta = read_pool_meta(files[0])
    assert meta['total'] == 40 and meta['T'] == 20 and meta['rho'] == 0.5 and meta['batch_size'] == 4  # P = round(0.5*20)*4
    for W in (1, 2, 4):  # no state lost or duplicated across ranks
        parts = [load_pool(tmp_path/'pool', r, W) for r in range(W)]
        assert sorted(torch.cat([p['id'] for p in parts]).tolist()) == list(range(40))
        assert all(p['x'].shape[1:] == (3, 8, 8) for p in parts)
    allp = load_pool(tmp_path/'pool')
    assert allp['t'].min() >= 1 and allp['t'].max() <= 19 and torch.isfinite(allp['x']).all()
    # the file is plain safetensors: no pickle anywhere
    assert not any(f.suffix in ('.pkl', '.pt', '.cache') for f in (tmp_path/'pool').iterdir())

def test_train_modes(teacher, tmp_path):
    prepare(teacher, tmp_path/'pool')
    for mode in ('dynamic', 'shuffled'):
        train(teacher, tmp_path/mode, mode=mode, pool=str(tmp_path/'pool'))
    train(teacher, tmp_path/'iterative', mode='iterative')
    train(teacher, tmp_path/'inmem', mode='dynamic', rho=0.2)  # pool prepared in memory
    for mode in ('dynamic', 'shuffled', 'iterative', 'inmem'):
        d = tmp_path/mode
        s = load_module(d/FINAL_FILE)
        assert isinstance(s, ADMUNet) and s.out_channels == 6 and s.distill_meta['sampler']['kind'] == 'ddpm'
        recs = [json.loads(l) for l in (d/'metrics.jsonl').read_text().splitlines()]
        assert 'student/mse' in recs[-1] and 'student/vb' in recs[-1]
        assert [p.name for p in list_checkpoints(d/'checkpoints')] == ['step-00000002', 'step-00000004']
        assert (d/'checkpoints'/'step-00000004'/'ema_student_0.9999.safetensors').exists()  # the reference's EMA, per step
    cfg = json.loads((tmp_path/'dynamic'/'config.json').read_text())['config']
    assert cfg['method_config'] == 'DKDMConfig' and cfg['teacher_flags']['diffusion_steps'] == 20 and cfg['pool_states_per_process'] == 40

def _same_weights(fa, fb):
    a, b = load_module(fa), load_module(fb)
    for (k, u), v in zip(a.state_dict().items(), b.state_dict().values()): assert torch.equal(u, v), k

def test_resume_is_exact(teacher, tmp_path):
    prepare(teacher, tmp_path/'pool')
    train(teacher, tmp_path/'a', pool=str(tmp_path/'pool'), steps=6)
    train(teacher, tmp_path/'b', pool=str(tmp_path/'pool'), steps=2)
    train(teacher, tmp_path/'b', pool=str(tmp_path/'pool'), steps=6, resume='latest')
    _same_weights(tmp_path/'a'/FINAL_FILE, tmp_path/'b'/FINAL_FILE)  # the EMA student
    _same_weights(tmp_path/'a'/'checkpoints'/'step-00000006'/'student.safetensors', tmp_path/'b'/'checkpoints'/'step-00000006'/'student.safetensors')
    pa = sorted((tmp_path/'a'/'pools').iterdir())[-1]; pb = sorted((tmp_path/'b'/'pools').iterdir())[-1]
    assert pa.name == pb.name == 'step-00000006'

def test_seeds_are_seed_plus_rank(teacher, tmp_path):
    "Every random stream (student init, pool, teacher noise) derives from --seed: the same seed repeats a run, another seed changes it."
    for d, s in (('a', 0), ('b', 0), ('c', 1)): train(teacher, tmp_path/d, mode='iterative', steps=1, seed=s, ckpt_every=0, ema_rate=0.)
    _same_weights(tmp_path/'a'/FINAL_FILE, tmp_path/'b'/FINAL_FILE)
    with pytest.raises(AssertionError): _same_weights(tmp_path/'a'/FINAL_FILE, tmp_path/'c'/FINAL_FILE)

def test_errors(teacher, tmp_path):
    with pytest.raises(UserError, match='--mode'): train(teacher, tmp_path/'x', mode='random')
    with pytest.raises(FileNotFoundError, match='no pool'): train(teacher, tmp_path/'x', pool=str(tmp_path/'missing'))
    with pytest.raises(UserError, match='--teacher is required'): dkdm_prepare(out=str(tmp_path/'p'))
    with pytest.raises(UserError, match='--out is required'): dkdm_prepare(teacher=str(teacher))
    with pytest.raises(UserError, match='--teacher is required'): dkdm_train(run_dir=str(tmp_path/'x'))
    with pytest.raises(UserError, match='--student'): train(teacher, tmp_path/'x', student='99M')
    with pytest.raises(UserError, match='unknown setting'): train(teacher, tmp_path/'x', student_flags='{}')  # the JSON flags are gone
    with pytest.raises(UserError, match='num_channels=64 in the flags.*num_channels=32'):
        (tmp_path/'f.json').write_text(json.dumps({**TINY, 'num_channels': 64})); prepare(teacher, tmp_path/'p', teacher_config=str(tmp_path/'f.json'))
    assert not (tmp_path/'x').exists()

def test_help(tmp_path):
    "Every CLI parses `--help` as its console script would (one subprocess: the import dominates)."
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get('PYTHONPATH', ''))
    script = tmp_path/'helps.py'
    script.write_text("from distill_nb.dkdm import dkdm_train, dkdm_prepare, dkdm_baseline\n"
                      "for f in (dkdm_train, dkdm_prepare, dkdm_baseline):\n"
                      "    print('=== ' + f.__name__, flush=True)\n"
                      "    try: f()\n"
                      "    except SystemExit as e: assert not e.code, e.code\n")
    r = subprocess.run([sys.executable, str(script), '--help'], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    helps = dict(h.split('\n', 1) for h in r.stdout.split('=== ')[1:])
    assert set(helps) == {'dkdm_train', 'dkdm_prepare', 'dkdm_baseline'}
    for h in helps.values(): assert '--preset' in h and '--out' in h and '--batch_size' in h
    assert '--real_fraction' in helps['dkdm_baseline'] and '--generate_only' in helps['dkdm_baseline'] and '--data_dir' in helps['dkdm_baseline']
    assert 'fp16' in helps['dkdm_train'] and '--iter_choice' in helps['dkdm_train'] and '--ema_rate' in helps['dkdm_train']

def test_train_fp16_resume(teacher, tmp_path):
    "The reference's fp16 student with dynamic loss scaling (on CPU here): the scaler is checkpointed and resume is exact."
    kw = dict(mode='iterative', precision='fp16', ckpt_every=1)  # (float16 kernels are slow on CPU: few steps)
    train(teacher, tmp_path/'a', steps=2, **kw)
    train(teacher, tmp_path/'b', steps=1, **kw)
    train(teacher, tmp_path/'b', steps=2, resume='latest', **kw)
    _same_weights(tmp_path/'a'/FINAL_FILE, tmp_path/'b'/FINAL_FILE)
    st = torch.load(tmp_path/'b'/'checkpoints'/'step-00000002'/'training_state.pt', weights_only=True)
    assert set(st['scalers']) == {'student'} and st['scalers']['student']['scale'] <= 2. ** 20
    recs = [json.loads(l) for l in (tmp_path/'a'/'metrics.jsonl').read_text().splitlines()]
    assert 'student/loss_scale' in recs[-1]
    with pytest.raises(UserError, match='--precision'): train(teacher, tmp_path/'x', precision='fp8')

# --- baselines ---

def baseline(teacher, out, **kw):
    args = dict(teacher=str(teacher) if teacher else None, run_dir=str(out), **STUDENT, **QUIET, n_synthetic=6, synthetic_steps='4', teacher_batch=4,
                batch=4, steps=3, ckpt_every=2, max_keep=0, log_every=1, lr=1e-3); args.update(kw)
    return dkdm_baseline(**args)

def real_lmdb(path, n=10, shape=(3, 8, 8)):
    write_lmdb(path, ((torch.full(shape, 200, dtype=torch.uint8).numpy(), 1) for _ in range(n)))
    return path

def test_baseline_data_free(teacher, tmp_path):
    baseline(teacher, tmp_path/'a')
    syn = LMDBDataset(tmp_path/'a'/'synthetic')
    assert len(syn) == 6 and syn.image_shape == (3, 8, 8) and not (tmp_path/'a'/'synthetic.parts').exists()
    s = load_module(tmp_path/'a'/FINAL_FILE)
    assert isinstance(s, ADMUNet) and s.out_channels == 6 and s.distill_meta['sampler']['diffusion']['diffusion_steps'] == 20
    assert [p.name for p in list_checkpoints(tmp_path/'a'/'checkpoints')] == ['step-00000002', 'step-00000003']
    recs = [json.loads(l) for l in (tmp_path/'a'/'metrics.jsonl').read_text().splitlines()]
    assert 'student/mse' in recs[-1] and 'student/vb' in recs[-1]
    cfg = json.loads((tmp_path/'a'/'config.json').read_text())['config']
    assert cfg['method_config'] == 'DKDMBaselineConfig' and cfg['dataset_size'] == 6 and cfg['real_data'] is None
    # resume: the synthetic set is reused (no teacher needed) and the run continues exactly
    kw = dict(synthetic=str(tmp_path/'a'/'synthetic'), teacher_config=str(teacher.with_suffix('.json')))
    baseline(None, tmp_path/'b', steps=2, **kw)
    baseline(None, tmp_path/'b', steps=3, resume='latest', **kw)
    _same_weights(tmp_path/'a'/FINAL_FILE, tmp_path/'b'/FINAL_FILE)

def test_baseline_data_limited(teacher, tmp_path, monkeypatch):
    real = real_lmdb(tmp_path/'real')
    baseline(teacher, tmp_path/'mix', n_synthetic=8, real_data=str(real), real_fraction=0.3, precision='bf16')
    cfg = json.loads((tmp_path/'mix'/'config.json').read_text())['config']
    assert cfg['dataset_size'] == 10 and cfg['real_fraction'] == 0.3 and cfg['precision'] == 'bf16'  # 3 real + 7 synthetic, as in the reference
    # data-based, as the reference's image_train.py --data_dir: no teacher, no synthetic set
    in_process(dkdm_baseline, ['--data_dir', real, '--exp_dir', tmp_path/'real-only', '--batch_size', '4', '--steps', '1', '--device', 'cpu',
                               '--precision', 'fp32', '--sample_every', '0', '--no_progress', 'true', '--teacher_config', teacher.with_suffix('.json'),
                               *STUDENT_ARGV], monkeypatch)
    assert (tmp_path/'real-only'/FINAL_FILE).exists() and not (tmp_path/'real-only'/'synthetic').exists()
    with pytest.raises(UserError, match='needs --real_data'): baseline(teacher, tmp_path/'x', real_fraction=0.2)
    with pytest.raises(FileNotFoundError, match='--real_data'): baseline(teacher, tmp_path/'x', real_data=str(tmp_path/'nope'), real_fraction=0.2)
    with pytest.raises(UserError, match='synthetic set has 8 images; 9 needed'):
        baseline(teacher, tmp_path/'mix', n_synthetic=8, real_data=str(real), real_fraction=0.1, overwrite=True)
    with pytest.raises(UserError, match='--teacher is required'): baseline(None, tmp_path/'z')

def test_baseline_two_ranks(teacher, tmp_path):
    "torchrun with 2 CPU processes (gloo): generation is sharded over ranks and gives the same images as one process; DDP fp16 training runs."
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get('PYTHONPATH', ''), OMP_NUM_THREADS='1')
    script = tmp_path/'run.py'
    script.write_text("from distill_nb.dkdm import dkdm_baseline\ndkdm_baseline()\n")
    args = ['--teacher', str(teacher), '--out', str(tmp_path/'w2'), *STUDENT_ARGV, '--n_synthetic', '6', '--synthetic_steps', '4',
            '--gen_batch', '2', '--batch_size', '4', '--steps', '2', '--ckpt_every', '2', '--log_every', '1', '--device', 'cpu',
            '--precision', 'fp16', '--sample_every', '0', '--progress', 'false']  # DDP with the loss scaler
    p = subprocess.Popen([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '2', str(script), *args],
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    baseline(teacher, tmp_path/'w1', teacher_batch=2, generate_only=True)  # meanwhile, the same set in this process
    out, _ = p.communicate(timeout=240)
    assert p.returncode == 0, out
    assert 'batch 4 = 2 processes x 2' in out
    a, b = LMDBDataset(tmp_path/'w1'/'synthetic'), LMDBDataset(tmp_path/'w2'/'synthetic')
    assert len(a) == len(b) == 6
    for i in range(6): assert (a.raw(i)[0] == b.raw(i)[0]).all()
    assert json.loads((tmp_path/'w2'/'config.json').read_text())['config']['world_size'] == 2
    st = torch.load(tmp_path/'w2'/'checkpoints'/'step-00000002'/'training_state.pt', weights_only=True)
    assert len(st['rng']) == 2 and 'student' in st['scalers']
    assert (tmp_path/'w2'/FINAL_FILE).exists() and not (tmp_path/'w1'/'checkpoints').exists()


# --- user errors: one line `prog: error: ...`, exit status 2, no traceback, nothing written (issue 15, sections 2 and 5) ---

def _run_cli(prog, *args, tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get('PYTHONPATH', ''), OMP_NUM_THREADS='1')
    code = f"from distill_nb.dkdm import {prog}; {prog}()"
    return subprocess.run([sys.executable, '-c', code, *map(str, args)], capture_output=True, text=True, env=env, timeout=120, cwd=tmp_path)

def _assert_user_error(r, prog, *needles):
    assert r.returncode == 2, (r.returncode, r.stderr[-3000:])
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f'{prog}: error: '), r.stderr[-3000:]
    assert 'Traceback' not in r.stderr
    for n in needles: assert n in lines[0], lines[0]

@pytest.mark.parametrize('prog, flags, needle', [
    ('dkdm_train', ['--batch_size', '0'], '--batch'),
    ('dkdm_train', ['--ema_rate', '1.5'], '--ema_rate'),
    ('dkdm_prepare', ['--rho', '-1'], '--rho'),
    ('dkdm_baseline', ['--real_fraction', '2', '--real_data', 'x'], '--real_fraction')])
def test_cli_bad_flags(teacher, tmp_path, prog, flags, needle):
    r = _run_cli(prog, '--teacher', teacher, '--out', tmp_path/'out', '--device', 'cpu', *flags, tmp_path=tmp_path)
    _assert_user_error(r, prog, needle)
    assert not (tmp_path/'out').exists()

@pytest.mark.parametrize('kw, needle', [
    (dict(batch=-2), '--batch'), (dict(steps=0), '--steps'), (dict(steps=-2), '--steps'), (dict(lr=0.), '--lr'),
    (dict(weight_decay=-0.1), '--weight_decay'), (dict(ema_rate=-1.), '--ema_rate'), (dict(ema_rate=1.01), '--ema_rate'), (dict(ckpt_every=-1), '--ckpt_every'),
    (dict(log_every=0), '--log_every'), (dict(input_perturb=-0.1), '--input_perturb'), (dict(rho=0.), '--rho'), (dict(student_channels=0), '--student_channels'),
    (dict(teacher_precision='fp8', mode='iterative'), "fp8"), (dict(mode='random'), '--mode'), (dict(student='99M'), "--student")])
def test_train_bad_flags(teacher, tmp_path, kw, needle):
    with pytest.raises(UserError, match=needle): train(teacher, tmp_path/'x', **kw)
    assert not (tmp_path/'x').exists()

@pytest.mark.parametrize('kw, needle', [(dict(batch=0), '--batch'), (dict(rho=-0.5), '--rho'), (dict(teacher_batch=0), '--teacher_batch'),
                                        (dict(shards=0), '--shards'), (dict(shards=3), '--shards: a pool of 40 states')])
def test_prepare_bad_flags(teacher, tmp_path, kw, needle):
    with pytest.raises(UserError, match=needle): prepare(teacher, tmp_path/'p', **kw)
    assert not (tmp_path/'p').exists()

@pytest.mark.parametrize('kw, needle', [(dict(n_synthetic=0), '--n_synthetic'), (dict(teacher_batch=-1), '--teacher_batch'), (dict(batch=0), '--batch'),
                                        (dict(ema_rate=2.), '--ema_rate'), (dict(real_fraction=-0.5), '--real_fraction'), (dict(steps=0), '--steps')])
def test_baseline_bad_flags(teacher, tmp_path, kw, needle):
    with pytest.raises(UserError, match=needle): baseline(teacher, tmp_path/'b', **kw)
    assert not (tmp_path/'b').exists()

def test_batch_not_divisible_by_world_size(teacher, tmp_path, monkeypatch):
    from types import SimpleNamespace
    import distill_nb.run as run
    monkeypatch.setattr(run, 'init_distributed', lambda device=None: SimpleNamespace(world_size=3, rank=0, device=torch.device('cpu'), is_main=True))
    for f in (train, baseline):
        with pytest.raises(UserError, match=r'--batch: 4 is not divisible by the number of processes \(3\)'): f(teacher, tmp_path/'x')

def test_teacher_does_not_fit_pool_or_data(teacher, tmp_path):
    "A pool from another teacher, and real data of another size than the teacher's samples: both values are named."
    d = tmp_path/'t16'; d.mkdir()
    m = ADMUNet(**adm_kwargs_from_flags(**{**TINY, 'image_size': 16}))
    torch.save(m.state_dict(), d/'teacher.pt'); (d/'teacher.json').write_text(json.dumps({**TINY, 'image_size': 16}))
    prepare(d/'teacher.pt', tmp_path/'pool16', rho=0.1)
    with pytest.raises(UserError, match='has 3x16x16 images but the teacher makes 3x8x8'):
        train(teacher, tmp_path/'x', pool=str(tmp_path/'pool16'))
    small = real_lmdb(tmp_path/'small', shape=(3, 4, 4))
    with pytest.raises(UserError, match="--real_data images are 3x4x4 but the synthetic ones \\(the teacher's\\) are 3x8x8"):
        baseline(teacher, tmp_path/'y', n_synthetic=8, real_data=str(small), real_fraction=0.5)

def test_existing_run_or_pool_is_not_overwritten(teacher, tmp_path):
    "A second run into the same folder is refused unless --resume or --overwrite; --overwrite gives one clean step sequence."
    prepare(teacher, tmp_path/'pool')
    with pytest.raises(UserError, match='holds a pool already'): prepare(teacher, tmp_path/'pool')
    prepare(teacher, tmp_path/'pool', shards=2, overwrite=True)
    assert sorted(f.name for f in (tmp_path/'pool').iterdir()) == ['pool-00000-of-00002.safetensors', 'pool-00001-of-00002.safetensors']
    train(teacher, tmp_path/'run', mode='iterative', steps=2)
    with pytest.raises(UserError, match='use --resume to continue it or --overwrite to replace it'):
        train(teacher, tmp_path/'run', mode='iterative', steps=2)
    train(teacher, tmp_path/'run', mode='iterative', steps=2, overwrite=True)
    steps = [json.loads(l)['step'] for l in (tmp_path/'run'/'metrics.jsonl').read_text().splitlines()]
    assert steps == sorted(set(steps)) and steps[-1] == 2
    r = _run_cli('dkdm_train', '--teacher', teacher, '--out', tmp_path/'run', *STUDENT_ARGV, '--mode', 'iterative',
                 '--batch_size', '4', '--steps', '2', '--device', 'cpu', tmp_path=tmp_path)
    _assert_user_error(r, 'dkdm_train', str(tmp_path/'run'), '--overwrite')
    baseline(teacher, tmp_path/'b', steps=1)
    with pytest.raises(UserError, match='--overwrite'): baseline(teacher, tmp_path/'b', steps=1)
    baseline(teacher, tmp_path/'b', steps=1, overwrite=True)  # the synthetic set is kept and reused
    assert (tmp_path/'b'/'synthetic'/'data.mdb').exists()
