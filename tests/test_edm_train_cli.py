"The `edm_train` CLI and `train_edm`: outputs, resume (bitwise), dataset paths, wandb offline, bad flags."
import json, os, subprocess, sys
from pathlib import Path
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
TINY = ['--toy_n', '32', '--batch', '4', '--sample_every', '0', '--device', 'cpu', '--no_progress', '--log_every', '1']


def _cli(args, tmp_path, check=True):
    env = {**os.environ, 'OMP_NUM_THREADS': '1', 'WANDB_MODE': 'offline', 'WANDB_DIR': str(tmp_path), 'WANDB_SILENT': 'true',
           'PYTHONPATH': os.pathsep.join([str(ROOT)] + [p for p in os.environ.get('PYTHONPATH', '').split(os.pathsep) if p])}
    r = subprocess.run([sys.executable, '-m', 'distill_nb.edm_train', *map(str, args)], env=env, capture_output=True, text=True, timeout=180)
    if check: assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    return r


def test_help_lists_flags(tmp_path):
    out = _cli(['--help'], tmp_path).stdout
    for flag in ('--data', '--arch', '--batch', '--lr', '--steps', '--kimg', '--ema', '--run_dir', '--resume', '--device', '--seed', '--wandb'):
        assert flag in out, flag


def test_cli_trains_and_resumes_with_wandb_offline(tmp_path):
    run = tmp_path/'run'
    _cli(['--run_dir', run, '--steps', 2, '--ckpt_every', 2, '--wandb', 'offline', *TINY], tmp_path)
    _cli(['--run_dir', run, '--steps', 4, '--ckpt_every', 2, '--wandb', 'offline', '--resume', 'latest', *TINY], tmp_path)
    assert sorted(p.name for p in (run/'checkpoints').iterdir()) == ['step-00000002', 'step-00000004']
    assert [json.loads(l)['step'] for l in (run/'metrics.jsonl').read_text().splitlines()] == [1, 2, 3, 4]
    cfg = json.loads((run/'config.json').read_text())
    assert cfg['config']['arch'] == 'tiny' and len(cfg['config_hash']) == 16 and 'version' in cfg
    rid = (run/'wandb_id.txt').read_text()
    st = torch.load(run/'checkpoints'/'step-00000004'/'training_state.pt', weights_only=True)
    assert st['callbacks']['WandbLogger']['run_id'] == rid  # the resumed run reused the wandb run id
    assert any(p.name.startswith('offline-run') for p in (run/'wandb').iterdir())  # offline files, no network
    from distill_nb.checkpoints import load_network
    net = load_network(run/'network-final.safetensors')
    assert type(net).__name__ == 'EDMPrecond' and net.label_dim == 4


def test_exact_resume_bitwise(tmp_path):
    from distill_nb.edm_train import train_edm
    kw = dict(toy_n=32, batch=4, sample_every=0, device='cpu', progress=False, ckpt_every=3, lr=5e-3, label_dropout=0.2, dropout=0.1)
    full = train_edm(tmp_path/'a', steps=6, **kw)
    train_edm(tmp_path/'b', steps=4, **kw)
    res = train_edm(tmp_path/'b', steps=6, resume=tmp_path/'b'/'checkpoints'/'step-00000003', **kw)
    for p, q in zip(full.unwrapped('net').parameters(), res.unwrapped('net').parameters()): assert torch.equal(p, q)
    for p, q in zip(full.ema.module().parameters(), res.ema.module().parameters()): assert torch.equal(p, q)
    la = [json.loads(l)['edm/loss'] for l in (tmp_path/'a'/'metrics.jsonl').read_text().splitlines()]
    lb = [json.loads(l)['edm/loss'] for l in (tmp_path/'b'/'metrics.jsonl').read_text().splitlines()]
    assert la == lb


def test_dataset_path_and_unconditional(tmp_path):
    from distill_nb.toydata import ToyShapes
    from distill_nb.data.images import write_edm_dataset
    from distill_nb.edm_train import train_edm
    ds = ToyShapes(16, resolution=8, n_classes=2, channels=1)
    write_edm_dataset(tmp_path/'toy.zip', (ds.raw(i) for i in range(len(ds))))
    learn = train_edm(tmp_path/'run', data=str(tmp_path/'toy.zip'), cond=False, steps=2, batch=4, sample_every=0, device='cpu', progress=False)
    net = learn.unwrapped('net')
    assert (net.img_resolution, net.img_channels, net.label_dim) == (8, 1, 0)
    learn = train_edm(tmp_path/'run2', data=str(tmp_path/'toy.zip'), steps=1, batch=4, sample_every=0, device='cpu', progress=False)
    assert learn.unwrapped('net').label_dim == 2


def test_bad_flags(tmp_path):
    from distill_nb.edm_train import train_edm
    with pytest.raises(FileNotFoundError, match='missing.zip does not exist'): train_edm(tmp_path/'r', data=str(tmp_path/'missing.zip'), steps=1, device='cpu')
    r = _cli(['--arch', 'huge', *TINY], tmp_path, check=False)
    assert r.returncode != 0 and 'invalid choice' in r.stderr
    with pytest.raises(ValueError, match='exactly one of --steps or --kimg'): train_edm(tmp_path/'x', steps=2, kimg=1.0, device='cpu')
