"The `distill_demo` CLI (shrunk), its errors and --help, torchrun, and the shipped demo teacher."
import json, os, shutil, subprocess, sys
from pathlib import Path
import pytest

ROOT = Path(__file__).resolve().parents[1]
SHRUNK = ['--iters', '60', '--batch', '32', '--n_eval', '256', '--no_progress']


def _env(tmp_path):
    return {**os.environ, 'OMP_NUM_THREADS': '1', 'WANDB_MODE': 'disabled',
            'PYTHONPATH': os.pathsep.join([str(ROOT)] + [p for p in os.environ.get('PYTHONPATH', '').split(os.pathsep) if p])}


def _cli(module, args, tmp_path, check=True, timeout=240):
    r = subprocess.run([sys.executable, '-m', module, *map(str, args)], env=_env(tmp_path), capture_output=True, text=True,
                       timeout=timeout, cwd=tmp_path)
    if check: assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-4000:]
    return r


def test_help_documents_every_flag(tmp_path):
    out = _cli('distill_nb.demo', ['--help'], tmp_path).stdout
    for flag in ('--outdir', '--method', '--iters', '--batch', '--lr', '--n_eval', '--eval_batch', '--seed', '--device',
                 '--teacher', '--no_progress', '--threads'):
        assert flag in out, flag
    assert 'distill_demo_out' in out and 'dmd2' in out
    out = _cli('distill_nb.demo_teacher', ['--help'], tmp_path).stdout
    for flag in ('--dest', '--run_dir', '--device', '--steps', '--resume'): assert flag in out, flag


def test_unknown_method_lists_available(tmp_path):
    r = _cli('distill_nb.demo', ['--method', 'magic', '--outdir', tmp_path / 'o'], tmp_path, check=False)
    assert r.returncode != 0 and "--method 'magic': not available; expected one of" in r.stderr and "'dmd2'" in r.stderr
    assert not (tmp_path / 'o').exists()


def test_shrunk_demo_beats_untrained(tmp_path):
    out = tmp_path / 'out'
    r = _cli('distill_nb.demo', ['--outdir', out, *SHRUNK], tmp_path)
    assert '| teacher, Heun 18 steps | 35 |' in r.stdout and '| DMD2 student | 1 |' in r.stdout, r.stdout
    res = json.loads((out / 'results.json').read_text())
    rows = {x['model']: x for x in res['rows']}
    s, u = rows['DMD2 student'], rows['untrained student (teacher copy)']
    assert s['fd_rc'] < u['fd_rc'] and s['sw'] < u['sw'], rows
    assert res['beats_untrained'] is True
    for f in ('samples.png', 'losses.png', 'results.md', 'student_dmd2.safetensors'): assert (out / f).is_file(), f
    from distill_nb.checkpoints import load_network
    g = load_network(out / 'student_dmd2.safetensors')
    assert g.distill_meta['sampler'] == {'kind': 'one_step', 'sigma': 80.0} and g.distill_meta['method'] == 'dmd2'


@pytest.mark.skipif(shutil.which('torchrun') is None and not (Path(sys.executable).parent / 'torchrun').exists(), reason='no torchrun')
def test_torchrun_two_processes(tmp_path):
    tr = shutil.which('torchrun') or str(Path(sys.executable).parent / 'torchrun')
    out = tmp_path / 'ddp'
    r = subprocess.run([tr, '--standalone', '--nproc_per_node', '2', '-m', 'distill_nb.demo', '--outdir', str(out), '--iters', '4',
                        '--batch', '8', '--n_eval', '32', '--eval_batch', '32', '--no_progress'], env=_env(tmp_path),
                       capture_output=True, text=True, timeout=240, cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-4000:]
    res = json.loads((out / 'results.json').read_text())
    assert res['world_size'] == 2 and r.stdout.count('| DMD2 student | 1 |') == 1  # rank 0 prints and writes


def test_shipped_teacher_is_package_data():
    from distill_nb.demo_teacher import demo_teacher_path, load_demo_teacher
    from distill_nb.checkpoints import read_network_meta
    p = demo_teacher_path()
    assert p.is_file() and p.stat().st_size < 4 * 2 ** 20
    assert p.parent == ROOT / 'distill_nb' / 'assets'
    assert 'recursive-include distill_nb/assets *' in (ROOT / 'MANIFEST.in').read_text()
    t = load_demo_teacher()
    assert (type(t).__name__, t.img_resolution, t.img_channels, t.label_dim) == ('EDMPrecond', 16, 3, 4)
    meta = read_network_meta(p)
    assert meta['demo_teacher']['recipe']['arch'] == 'tiny' and meta['sampler'] == {'kind': 'edm'}


def test_cd_method_smoke(tmp_path):
    "Consistency distillation runs through the same table, with 1, 2 and 4 steps (quality not checked at this size)."
    out = tmp_path / 'cd'
    r = _cli('distill_nb.demo', ['--method', 'cd', '--outdir', out, '--iters', '3', '--batch', '8', '--n_eval', '32',
                                 '--eval_batch', '32', '--no_progress'], tmp_path)
    for k in ('| CD student, 1 step | 1 |', '| CD student, 2 steps | 2 |', '| CD student, 4 steps | 4 |'): assert k in r.stdout, r.stdout
    from distill_nb.checkpoints import load_network
    g = load_network(out / 'student_cd.safetensors')
    assert type(g).__name__ == 'ConsistencyPrecond' and g.distill_meta['sampler']['kind'] == 'consistency'


def test_gdd_method_smoke(tmp_path):
    "GDD-I runs through the same table and beats the untrained student after a few dozen iterations."
    import torch
    from distill_nb.demo import run_distill_demo
    from distill_nb.checkpoints import load_network
    torch.set_num_threads(1)
    res = run_distill_demo(tmp_path / 'gdd', method='gdd', iters=20, batch=16, n_eval=64, eval_batch=64, progress=False,
                           log=lambda *a, **k: None)
    rows = {r['model']: r for r in res['rows']}
    s, u = rows['GDD-I student (EMA)'], rows['untrained student (teacher copy)']
    assert s['nfe'] == 1 and s['fd_rc'] < u['fd_rc'] and s['sw'] < u['sw'], rows
    g = load_network(tmp_path / 'gdd' / 'student_gdd.safetensors')
    assert type(g).__name__ == 'ConsistencyPrecond' and g.distill_meta['method'] == 'gdd-i'
    assert g.distill_meta['sampler'] == {'kind': 'one_step', 'sigma': 80.0}


def test_dkdm_method_cli(tmp_path):
    "`--method dkdm` distils its own shipped DDPM teacher: the student's row, the teacher's at the same NFE (a reference), the summary against it."
    import json
    r = _cli('distill_nb.demo', ['--method', 'dkdm', '--iters', 2, '--batch', 8, '--n_eval', 16, '--eval_batch', 16, '--no_progress',
                                 '--outdir', tmp_path / 'o'], tmp_path)
    rows = {x['model']: x for x in json.loads((tmp_path / 'o' / 'results.json').read_text())['rows']}
    t = next(v for k, v in rows.items() if k.startswith('DDPM teacher')); s = next(v for k, v in rows.items() if k.startswith('DKDM student'))
    assert t['reference'] and not s['reference'] and t['nfe'] == s['nfe'] == 10 and t['train_images'] is None, (t, s)
    assert 'its teacher (DDPM teacher' in r.stdout, r.stdout[-2000:]
    r = _cli('distill_nb.demo', ['--method', 'magic', '--outdir', tmp_path / 'o'], tmp_path, check=False)
    assert r.returncode == 2 and "'dkdm'" in r.stderr and "'lcm'" in r.stderr and 'Traceback' not in r.stderr


def test_dmd_method_smoke(tmp_path):
    "DMD v1 makes its teacher pairs in the run folder, runs through the same table and beats the untrained student."
    import torch
    from distill_nb.demo import run_distill_demo
    from distill_nb.checkpoints import load_network
    from distill_nb.data.pairs import PairsDataset
    torch.set_num_threads(1)
    res = run_distill_demo(tmp_path / 'dmd', method='dmd', iters=32, batch=16, n_eval=64, eval_batch=64, progress=False,
                           log=lambda *a, **k: None)
    rows = {r['model']: r for r in res['rows']}
    s, u = rows['DMD student'], rows['untrained student (teacher copy)']
    assert s['nfe'] == 1 and s['fd_rc'] < u['fd_rc'] and s['sw'] < u['sw'], rows
    pairs = PairsDataset(tmp_path / 'dmd' / 'dmd_run' / 'pairs.hdf5')
    assert len(pairs) == 64 and pairs[0][0].shape == (3, 16, 16)  # max(batch, iters * batch // 8)
    g = load_network(tmp_path / 'dmd' / 'student_dmd.safetensors')
    assert g.distill_meta['method'] == 'dmd' and g.distill_meta['sampler'] == {'kind': 'one_step', 'sigma': 80.0}


# dmd2 (the default) and dmd (its run folder also holds the pairs); cd and gdd pass overwrite=True the same way
@pytest.mark.parametrize('method', ['dmd2', 'dmd'])
def test_demo_twice_into_the_same_outdir(tmp_path, method):
    "The method's run folder inside --outdir is the demo's scratch space: a second demo replaces it (the Learner would refuse it)."
    import warnings, torch
    from distill_nb.demo import run_distill_demo
    torch.set_num_threads(1)
    kw = dict(method=method, iters=2, batch=8, n_eval=16, eval_batch=16, progress=False, log=lambda *a, **k: None)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')  # 'cleared the previous run' notes
        for _ in range(2): res = run_distill_demo(tmp_path / 'out', **kw)
    assert res['settings']['method'] == method and (tmp_path / 'out' / 'results.json').is_file()


def test_method_all_leaderboard(tmp_path):
    "`--method all`: every available method from a fresh copy of the same teacher, one table, one student file each, one loss panel per method."
    from distill_nb.demo import run_distill_demo, available_methods
    res = run_distill_demo(tmp_path / 'all', 'all', iters=3, batch=16, n_eval=32, eval_batch=32, progress=False, log=lambda *a, **k: None)
    methods = available_methods()
    assert res['methods'] == methods and {'dmd2', 'dmd2gan', 'fdistill', 'dmd', 'cd', 'gdd', 'sid', 'scm', 'meanflow'} <= set(methods)
    models = [r['model'] for r in res['rows']]
    assert models[:4] == ['data (held-out toy images, noise floor)', 'teacher, Heun 18 steps', 'teacher, Euler 4 steps', 'untrained student (teacher copy)']
    for label in ('DMD2 student', 'DMD2 + GAN head student', 'f-distill (js) student', 'CD student, 4 steps', 'SiD student (EMA)', 'sCD student, 2 steps', 'MeanFlow student, 2 steps'): assert label in models, label
    for r in res['rows'][4:]:
        assert r['fd_toy'] is not None and 0 <= r['precision'] <= 1 and 0 <= r['recall'] <= 1
        assert r['reference'] == (r['train_images'] is None), r  # a method's own teacher rows (DKDM, LCM) are references
        if r['model'].startswith(('DMD', 'CD', 'SiD', 'sCD', 'MeanFlow', 'GDD', 'f-distill')): assert r['train_images'] == 3 * 16, r
    assert res['budget'] == {'iterations': 3, 'global_batch': 16, 'images': 48}
    out = tmp_path / 'all'
    for m in methods:
        assert (out / f'student_{m}.safetensors').is_file(), m
        assert (out / f'samples_{m}.png').stat().st_size > 0 and (out / f'losses_{m}.png').stat().st_size > 0, m
    assert (out / 'losses.png').stat().st_size > 0 and 'precision' in (out / 'results.md').read_text()
    from distill_nb.demo import notebook_pictures
    pics = notebook_pictures(out, tmp_path / 'images')
    assert {p.name for p in pics} >= {'leaderboard.png', 'demo_dmd2.png', 'losses_cd.png'}, pics
