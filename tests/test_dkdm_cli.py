"Tests of the DKDM CLIs `dkdm_prepare` / `dkdm_train` / `dkdm_baseline`: pool files, modes, fp16, resume, baselines, errors (tiny ADM teacher, T = 20, CPU)."
import json, os, subprocess, sys
from pathlib import Path
import pytest
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path: sys.path.insert(0, str(ROOT))  # works without `pip install -e .`
from distill_nb.adm import ADMUNet, adm_kwargs_from_flags
from distill_nb.dkdm import dkdm_prepare, dkdm_train, dkdm_baseline, load_pool, read_pool_meta
from distill_nb.data.lmdb_dataset import LMDBDataset, write_lmdb
from distill_nb.learner import load_module, list_checkpoints


TINY = dict(image_size=8, num_channels=32, num_res_blocks=1, channel_mult='1,2', attention_resolutions='4', num_head_channels=16,
            learn_sigma=True, dropout=0.0, resblock_updown=True, use_new_attention_order=True, use_scale_shift_norm=True,
            diffusion_steps=20, noise_schedule='cosine', clip_denoised=True)
STUDENT = json.dumps(dict(image_size=8, num_channels=32, num_res_blocks=1, channel_mult='1,2', attention_resolutions='4',
                          num_head_channels=16, dropout=0.0))

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
    args = dict(teacher=str(teacher), out=str(out), rho=0.5, batch_size=4, chunk=16, device='cpu'); args.update(kw)
    return dkdm_prepare(**args)

def train(teacher, out, **kw):
    args = dict(teacher=str(teacher), out=str(out), student_flags=STUDENT, batch_size=4, steps=4, save_every=2, log_every=1,
                device='cpu', lr=1e-3); args.update(kw)
    return dkdm_train(**args)

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
        s = load_module(d/'student.safetensors')
        assert isinstance(s, ADMUNet) and s.out_channels == 6
        assert (d/'student_ema.safetensors').exists() and (d/'metrics.jsonl').exists()
        recs = [json.loads(l) for l in (d/'metrics.jsonl').read_text().splitlines()]
        assert 'student/mse' in recs[-1] and 'student/vb' in recs[-1]
        assert [p.name for p in list_checkpoints(d/'checkpoints')] == ['step-00000002', 'step-00000004']
    cfg = json.loads((tmp_path/'dynamic'/'config.json').read_text())
    assert cfg['config']['method'] == 'dkdm' and cfg['config']['teacher_flags']['diffusion_steps'] == 20

def test_resume_is_exact(teacher, tmp_path):
    prepare(teacher, tmp_path/'pool')
    train(teacher, tmp_path/'a', pool=str(tmp_path/'pool'), steps=6)
    train(teacher, tmp_path/'b', pool=str(tmp_path/'pool'), steps=2)
    train(teacher, tmp_path/'b', pool=str(tmp_path/'pool'), steps=6, resume='latest')
    a, b = load_module(tmp_path/'a'/'student.safetensors'), load_module(tmp_path/'b'/'student.safetensors')
    for (k, u), v in zip(a.state_dict().items(), b.state_dict().values()): assert torch.equal(u, v), k
    ea, eb = load_module(tmp_path/'a'/'student_ema.safetensors'), load_module(tmp_path/'b'/'student_ema.safetensors')
    for u, v in zip(ea.state_dict().values(), eb.state_dict().values()): assert torch.equal(u, v)
    pa = sorted((tmp_path/'a'/'pools').iterdir())[-1]; pb = sorted((tmp_path/'b'/'pools').iterdir())[-1]
    assert pa.name == pb.name == 'step-00000006'

def test_errors(teacher, tmp_path):
    with pytest.raises(ValueError, match="preset 'nope'"): train(teacher, tmp_path/'x', preset='nope')
    with pytest.raises(ValueError, match='--mode'): train(teacher, tmp_path/'x', mode='random')
    with pytest.raises(FileNotFoundError, match='no pool'): train(teacher, tmp_path/'x', pool=str(tmp_path/'missing'))
    with pytest.raises(ValueError, match='student_flags'): train(teacher, tmp_path/'x', student_flags='{oops')
    with pytest.raises(ValueError, match='num_channels=64 in the flags.*num_channels=32'): prepare(teacher, tmp_path/'p', teacher_flags='{"num_channels": 64}')
    with pytest.raises(ValueError, match='--teacher is required'): dkdm_prepare(out=str(tmp_path/'p'))
    with pytest.raises(ValueError, match='student image'): train(teacher, tmp_path/'x', student='14M', student_flags=None)

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
    for h in helps.values(): assert '--preset' in h and '--out' in h
    assert '--real_fraction' in helps['dkdm_baseline'] and '--generate_only' in helps['dkdm_baseline']
    assert 'fp16' in helps['dkdm_train']

def test_train_fp16_resume(teacher, tmp_path):
    "The reference's fp16 student with dynamic loss scaling (on CPU here): the scaler is checkpointed and resume is exact."
    kw = dict(mode='iterative', amp='fp16', save_every=1)  # (float16 kernels are slow on CPU: few steps)
    train(teacher, tmp_path/'a', steps=2, **kw)
    train(teacher, tmp_path/'b', steps=1, **kw)
    train(teacher, tmp_path/'b', steps=2, resume='latest', **kw)
    a, b = load_module(tmp_path/'a'/'student.safetensors'), load_module(tmp_path/'b'/'student.safetensors')
    for (k, u), v in zip(a.state_dict().items(), b.state_dict().values()): assert torch.equal(u, v), k
    st = torch.load(tmp_path/'b'/'checkpoints'/'step-00000002'/'training_state.pt', weights_only=True)
    assert set(st['scalers']) == {'student'} and st['scalers']['student']['scale'] <= 2. ** 20
    cfg = json.loads((tmp_path/'a'/'config.json').read_text())['config']
    assert cfg['amp'] == 'fp16' and cfg['loss_scale']['init_scale'] == 2. ** 20
    recs = [json.loads(l) for l in (tmp_path/'a'/'metrics.jsonl').read_text().splitlines()]
    assert 'student/loss_scale' in recs[-1]
    with pytest.raises(ValueError, match="--amp 'fp8'"): train(teacher, tmp_path/'x', amp='fp8')

def baseline(teacher, out, **kw):
    args = dict(teacher=str(teacher) if teacher else None, out=str(out), student_flags=STUDENT, n_synthetic=6, synthetic_steps='4', gen_batch=4,
                batch_size=4, steps=3, save_every=2, log_every=1, device='cpu', lr=1e-3); args.update(kw)
    return dkdm_baseline(**args)

def real_lmdb(path, n=10, shape=(3, 8, 8)):
    write_lmdb(path, ((torch.full(shape, 200, dtype=torch.uint8).numpy(), 1) for _ in range(n)))
    return path

def test_baseline_data_free(teacher, tmp_path):
    baseline(teacher, tmp_path/'a')
    syn = LMDBDataset(tmp_path/'a'/'synthetic')
    assert len(syn) == 6 and syn.image_shape == (3, 8, 8) and not (tmp_path/'a'/'synthetic.parts').exists()
    s = load_module(tmp_path/'a'/'student.safetensors')
    assert isinstance(s, ADMUNet) and s.out_channels == 6 and (tmp_path/'a'/'student_ema.safetensors').exists()
    assert [p.name for p in list_checkpoints(tmp_path/'a'/'checkpoints')] == ['step-00000002', 'step-00000003']
    recs = [json.loads(l) for l in (tmp_path/'a'/'metrics.jsonl').read_text().splitlines()]
    assert 'student/mse' in recs[-1] and 'student/vb' in recs[-1]
    cfg = json.loads((tmp_path/'a'/'config.json').read_text())['config']
    assert cfg['method'] == 'dkdm_baseline' and cfg['dataset_size'] == 6 and cfg['real_data'] is None
    # resume: the synthetic set is reused (no teacher needed) and the run continues exactly
    baseline(None, tmp_path/'b', synthetic=str(tmp_path/'a'/'synthetic'), steps=2, config=str(teacher.with_suffix('.json')))
    baseline(None, tmp_path/'b', synthetic=str(tmp_path/'a'/'synthetic'), steps=3, resume='latest', config=str(teacher.with_suffix('.json')))
    a, b = load_module(tmp_path/'a'/'student.safetensors'), load_module(tmp_path/'b'/'student.safetensors')
    for (k, u), v in zip(a.state_dict().items(), b.state_dict().values()): assert torch.equal(u, v), k

def test_baseline_data_limited(teacher, tmp_path):
    real = real_lmdb(tmp_path/'real')
    baseline(teacher, tmp_path/'mix', n_synthetic=8, real_data=str(real), real_fraction=0.3, amp='bf16')
    cfg = json.loads((tmp_path/'mix'/'config.json').read_text())['config']
    assert cfg['dataset_size'] == 10 and cfg['real_fraction'] == 0.3 and cfg['amp'] == 'bf16'  # 3 real + 7 synthetic, as in the reference
    baseline(None, tmp_path/'real-only', real_data=str(real), real_fraction=1.0, steps=1)  # data-based: no teacher, no synthetic set
    assert (tmp_path/'real-only'/'student.safetensors').exists() and not (tmp_path/'real-only'/'synthetic').exists()
    with pytest.raises(ValueError, match='needs --real_data'): baseline(teacher, tmp_path/'x', real_fraction=0.2)
    with pytest.raises(FileNotFoundError, match='--real_data'): baseline(teacher, tmp_path/'x', real_data=str(tmp_path/'nope'), real_fraction=0.2)
    with pytest.raises(ValueError, match='synthetic set has 8 images; 9 needed'):
        baseline(teacher, tmp_path/'mix', n_synthetic=8, real_data=str(real), real_fraction=0.1)
    small = real_lmdb(tmp_path/'small', shape=(3, 4, 4))
    with pytest.raises(ValueError, match='student expects 3x8x8'): baseline(None, tmp_path/'y', real_data=str(small), real_fraction=1.0)
    with pytest.raises(ValueError, match='--teacher is required'): baseline(None, tmp_path/'z')

def test_baseline_two_ranks(teacher, tmp_path):
    "torchrun with 2 CPU processes (gloo): generation is sharded over ranks and gives the same images as one process; DDP fp16 training runs."
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get('PYTHONPATH', ''), OMP_NUM_THREADS='1')
    script = tmp_path/'run.py'
    script.write_text("from distill_nb.dkdm import dkdm_baseline\ndkdm_baseline()\n")
    args = ['--teacher', str(teacher), '--out', str(tmp_path/'w2'), '--student_flags', STUDENT, '--n_synthetic', '6', '--synthetic_steps', '4',
            '--gen_batch', '2', '--batch_size', '4', '--steps', '2', '--save_every', '2', '--log_every', '1', '--device', 'cpu',
            '--amp', 'fp16']  # DDP with the loss scaler
    p = subprocess.Popen([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '2', str(script), *args],
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    baseline(teacher, tmp_path/'w1', gen_batch=2, generate_only=True)  # meanwhile, the same set in this process
    out, _ = p.communicate(timeout=240)
    assert p.returncode == 0, out
    a, b = LMDBDataset(tmp_path/'w1'/'synthetic'), LMDBDataset(tmp_path/'w2'/'synthetic')
    assert len(a) == len(b) == 6
    for i in range(6): assert (a.raw(i)[0] == b.raw(i)[0]).all()
    assert json.loads((tmp_path/'w2'/'config.json').read_text())['world_size'] == 2
    st = torch.load(tmp_path/'w2'/'checkpoints'/'step-00000002'/'training_state.pt', weights_only=True)
    assert len(st['rng']) == 2 and 'student' in st['scalers']
    assert (tmp_path/'w2'/'student.safetensors').exists() and not (tmp_path/'w1'/'checkpoints').exists()


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
    ('dkdm_train', ['--batch_size', '0'], '--batch_size'),
    ('dkdm_train', ['--ema', '1.5'], '--ema'),
    ('dkdm_prepare', ['--rho', '-1'], '--rho'),
    ('dkdm_baseline', ['--real_fraction', '2', '--real_data', 'x'], '--real_fraction')])
def test_cli_bad_flags(teacher, tmp_path, prog, flags, needle):
    r = _run_cli(prog, '--teacher', teacher, '--out', tmp_path/'out', '--device', 'cpu', *flags, tmp_path=tmp_path)
    _assert_user_error(r, prog, needle)
    assert not (tmp_path/'out').exists()

@pytest.mark.parametrize('kw, needle', [
    (dict(batch_size=-2), '--batch_size'), (dict(steps=0), '--steps'), (dict(steps=-2), '--steps'), (dict(lr=0.), '--lr'),
    (dict(weight_decay=-0.1), '--weight_decay'), (dict(ema=-1.), '--ema'), (dict(ema=1.01), '--ema'), (dict(save_every=0), '--save_every'),
    (dict(log_every=0), '--log_every'), (dict(input_perturb=-0.1), '--input_perturb'), (dict(rho=0.), '--rho'),
    (dict(teacher_amp='fp8', mode='iterative'), "fp8"), (dict(mode='random'), '--mode'), (dict(student='99M', student_flags=None), "student '99M'")])
def test_train_bad_flags(teacher, tmp_path, kw, needle):
    from distill_nb.core import UserError
    with pytest.raises(UserError, match=needle): train(teacher, tmp_path/'x', **kw)
    assert not (tmp_path/'x').exists()

@pytest.mark.parametrize('kw, needle', [(dict(batch_size=0), '--batch_size'), (dict(rho=-0.5), '--rho'), (dict(chunk=0), '--chunk'),
                                        (dict(shards=0), '--shards'), (dict(shards=3), '--shards: a pool of 40 states')])
def test_prepare_bad_flags(teacher, tmp_path, kw, needle):
    from distill_nb.core import UserError
    with pytest.raises(UserError, match=needle): prepare(teacher, tmp_path/'p', **kw)
    assert not (tmp_path/'p').exists()

@pytest.mark.parametrize('kw, needle', [(dict(n_synthetic=0), '--n_synthetic'), (dict(gen_batch=-1), '--gen_batch'), (dict(batch_size=0), '--batch_size'),
                                        (dict(ema=2.), '--ema'), (dict(real_fraction=-0.5), '--real_fraction'), (dict(steps=0), '--steps')])
def test_baseline_bad_flags(teacher, tmp_path, kw, needle):
    from distill_nb.core import UserError
    with pytest.raises(UserError, match=needle): baseline(teacher, tmp_path/'b', **kw)
    assert not (tmp_path/'b').exists()

def test_batch_not_divisible_by_world_size(teacher, tmp_path, monkeypatch):
    from types import SimpleNamespace
    import distill_nb.dkdm as dk
    from distill_nb.core import UserError
    monkeypatch.setattr(dk, 'init_distributed', lambda device=None: SimpleNamespace(world_size=3, rank=0, device=torch.device('cpu'), is_main=True))
    for f in (train, baseline):
        with pytest.raises(UserError, match=r'--batch_size: 4 is not divisible by the world size \(3\)'): f(teacher, tmp_path/'x')

def test_teacher_does_not_fit_pool_or_data(teacher, tmp_path):
    "A pool from another teacher, and real data of another size than the teacher's samples: both values are named."
    from distill_nb.core import UserError
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
    from distill_nb.core import UserError
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
    r = _run_cli('dkdm_train', '--teacher', teacher, '--out', tmp_path/'run', '--student_flags', STUDENT, '--mode', 'iterative',
                 '--batch_size', '4', '--steps', '2', '--device', 'cpu', tmp_path=tmp_path)
    _assert_user_error(r, 'dkdm_train', str(tmp_path/'run'), '--overwrite')
    baseline(teacher, tmp_path/'b', steps=1)
    with pytest.raises(UserError, match='--overwrite'): baseline(teacher, tmp_path/'b', steps=1)
    baseline(teacher, tmp_path/'b', steps=1, overwrite=True)  # the synthetic set is kept and reused
    assert (tmp_path/'b'/'synthetic'/'data.mdb').exists()
