"Tests of the DKDM CLIs `dkdm_prepare` / `dkdm_train`: pool files, modes, resume, errors (tiny ADM teacher, T = 20, CPU)."
import json, os, subprocess, sys
from pathlib import Path
import pytest
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path: sys.path.insert(0, str(ROOT))  # works without `pip install -e .`
from distill_nb.adm import ADMUNet, adm_kwargs_from_flags
from distill_nb.dkdm import dkdm_prepare, dkdm_train, load_pool, read_pool_meta
from distill_nb.learner import load_module, list_checkpoints

@pytest.fixture(autouse=True)
def one_thread():
    "Tiny networks: one thread avoids OpenMP spin-waiting on busy CI machines."
    n = torch.get_num_threads(); torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)

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
    with pytest.raises(ValueError, match='weights do not match'): prepare(teacher, tmp_path/'p', teacher_flags='{"num_channels": 64}')
    with pytest.raises(ValueError, match='--teacher is required'): dkdm_prepare(out=str(tmp_path/'p'))
    with pytest.raises(ValueError, match='student image'): train(teacher, tmp_path/'x', student='14M', student_flags=None)

def test_help(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get('PYTHONPATH', ''))
    for name in ('dkdm_train', 'dkdm_prepare'):  # as the console script would run it
        script = tmp_path/f'{name}.py'
        script.write_text(f"from distill_nb.dkdm import {name}\n{name}()\n")
        r = subprocess.run([sys.executable, str(script), '--help'], capture_output=True, text=True, env=env, timeout=120)
        assert r.returncode == 0, r.stderr
        assert '--teacher' in r.stdout and '--preset' in r.stdout
