"kill -9 at a deterministic point of a checkpoint write and of a rotation: the leftovers are removed at the next start and the resume is exact."
import os, subprocess, sys, textwrap
from pathlib import Path
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
KW = dict(toy_n=16, batch=4, sample_every=0, device='cpu', progress=False, ckpt_every=2, max_keep=2, lr=5e-3, log_every=1)

SCRIPT = textwrap.dedent('''
    import os, signal, shutil, sys, torch
    from distill_nb import edm_train
    mode, run, steps, resume = sys.argv[1], sys.argv[2], int(sys.argv[3]), (sys.argv[4] if len(sys.argv) > 4 else None)
    def die(): os.kill(os.getpid(), signal.SIGKILL)
    if mode == 'write':  # killed while checkpoint 4 is being written: its weights are on disk, training_state.pt is not
        save = torch.save
        torch.save = lambda obj, f, *a, **k: die() if 'step-00000004' in str(f) else save(obj, f, *a, **k)
    if mode == 'rotate':  # killed after the oldest checkpoint was renamed away for deletion, before it is deleted
        rmtree = shutil.rmtree
        shutil.rmtree = lambda p, *a, **k: die() if '.del-step' in str(p) else rmtree(p, *a, **k)
    edm_train.train_edm(run, steps=steps, resume=resume, **KW)
''').replace('**KW', ', '.join(f'{k}={v!r}' for k, v in KW.items()))


def _run(tmp_path, *args):
    script = tmp_path/'train.py'; script.write_text(SCRIPT)
    env = {**os.environ, 'OMP_NUM_THREADS': '1', 'MKL_NUM_THREADS': '1', 'WANDB_MODE': 'disabled',
           'PYTHONPATH': os.pathsep.join([str(ROOT)] + [p for p in os.environ.get('PYTHONPATH', '').split(os.pathsep) if p])}
    env.pop('WORLD_SIZE', None); env.pop('RANK', None)
    return subprocess.run([sys.executable, str(script), *map(str, args)], env=env, capture_output=True, text=True, timeout=300)


def _weights(f):
    from safetensors.torch import load_file
    return load_file(str(f))


def test_kill_during_checkpoint_write_then_exact_resume(tmp_path):
    a, b = tmp_path/'a', tmp_path/'b'
    r = _run(tmp_path, 'none', a, 6); assert r.returncode == 0, r.stderr[-3000:]
    r = _run(tmp_path, 'write', b, 6); assert r.returncode == -9, (r.returncode, r.stderr[-3000:])
    left = sorted(p.name for p in (b/'checkpoints').iterdir())
    assert left[0].startswith('.tmp-step-00000004-') and left[1:] == ['step-00000002'], left  # what the kill left
    r = _run(tmp_path, 'none', b, 6, 'latest'); assert r.returncode == 0, r.stderr[-3000:]
    assert sorted(p.name for p in (b/'checkpoints').iterdir()) == ['step-00000004', 'step-00000006']  # leftover gone
    wa, wb = _weights(a/'network-final.safetensors'), _weights(b/'network-final.safetensors')
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)  # bitwise: the resume is exact
    import json
    steps = lambda d: [json.loads(l)['step'] for l in (d/'metrics.jsonl').read_text().splitlines()]
    assert steps(b) == steps(a) == [1, 2, 3, 4, 5, 6]  # one step sequence, the killed run's records after step 2 dropped


def test_kill_during_rotation_leftover_removed(tmp_path):
    from distill_nb.edm_train import train_edm
    c = tmp_path/'c'
    r = _run(tmp_path, 'rotate', c, 6); assert r.returncode == -9, (r.returncode, r.stderr[-3000:])
    assert sorted(p.name for p in (c/'checkpoints').iterdir()) == ['.del-step-00000002', 'step-00000004', 'step-00000006']
    ck6 = {p.name: p.read_bytes() for p in (c/'checkpoints'/'step-00000006').iterdir()}
    learn = train_edm(c, steps=8, resume='latest', **KW)
    assert learn.resume_dir.name == 'step-00000006'
    assert sorted(p.name for p in (c/'checkpoints').iterdir()) == ['step-00000006', 'step-00000008']
    assert {p.name: p.read_bytes() for p in (c/'checkpoints'/'step-00000006').iterdir()} == ck6  # the valid checkpoint untouched
