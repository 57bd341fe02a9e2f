"""Command lines of sCM (`python -m distill_nb.scm`, `scm_train`) and MeanFlow (`python -m distill_nb.meanflow`, `meanflow_train`):
help, resolved presets, tiny end-to-end runs whose final files load and sample, torchrun (2 CPU processes, gloo), and user errors
(one line on stderr, exit status 2, no traceback, nothing written)."""
import json, os, socket, subprocess, sys
from pathlib import Path
import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, 'PYTHONPATH': f'{ROOT}{os.pathsep}' + os.environ.get('PYTHONPATH', ''), 'WANDB_MODE': 'disabled', 'OMP_NUM_THREADS': '1'}
TINY = ['--data', 'toy', '--toy_size', '16', '--batch', '4', '--steps', '2', '--ckpt_every', '1', '--sample_every', '0', '--progress', 'false',
        '--device', 'cpu']

def _run(args, ok=True):
    r = subprocess.run([sys.executable, *args], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=240)
    if ok: assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r

@pytest.fixture(scope='module')
def teacher(tmp_path_factory):
    "An 8x8 conditional EDMPrecond(SongUNet) with augment_dim 9 (unused parameters, as in EDM's CIFAR nets), saved in our format."
    from distill_nb.precond import EDMPrecond
    from distill_nb.checkpoints import save_network
    import distill_nb.networks  # noqa: F401 (registers SongUNet)
    torch.manual_seed(0)
    net = EDMPrecond(8, 3, label_dim=4, model_type='SongUNet', model_channels=16, channel_mult=[1, 2], num_blocks=1,
                     attn_resolutions=[4], dropout=0.0, augment_dim=9)
    with torch.no_grad():
        for p in net.parameters(): p.add_(0.02 * torch.randn_like(p))
    return str(save_network(net, tmp_path_factory.mktemp('t') / 'teacher.safetensors'))

def _free_port():
    with socket.socket() as s: s.bind(('127.0.0.1', 0)); return s.getsockname()[1]

@pytest.mark.parametrize('mod, flag', [('distill_nb.scm', '--tangent'), ('distill_nb.meanflow', '--flow_ratio')])
def test_help(mod, flag):
    r = _run(['-m', mod, '--help'])
    assert flag in r.stdout and '--preset' in r.stdout and '--batch_size' in r.stdout

def test_print_config_presets():
    "Presets resolve to FastGen's settings; a flag overrides the preset; the per-process alias is multiplied by WORLD_SIZE."
    c = json.loads(_run(['-m', 'distill_nb.scm', '--preset', 'cifar10-sct', '--teacher', 'edm.pkl', '--lr', '2e-4', '--print_config']).stdout)
    assert (c['mode'], c['batch'], c['steps'], c['dropout'], c['sigma_max'], c['lr'], c['optimizer']) == ('sct', 512, 350000, 0.2, 800.0, 2e-4, 'radam')
    r = subprocess.run([sys.executable, '-m', 'distill_nb.meanflow', '--preset', 'cifar10', '--batch_size', '128', '--print_config'], cwd=ROOT,
                       env={**ENV, 'WORLD_SIZE': '8'}, capture_output=True, text=True, timeout=240)
    c = json.loads(r.stdout)
    assert (c['batch'], c['lr'], c['lr_warmup'], c['flow_ratio'], c['arch'], c['target']) == (1024, 6e-4, 9765, 0.25, 'ddpmpp', 'data')

def test_scm_cli_two_steps(tmp_path, teacher):
    "sCD for 2 iterations from the command line; the final network loads and `distill_generate` samples it with its stored sampler."
    out = tmp_path / 'scm'
    _run(['-m', 'distill_nb.scm', '--teacher', teacher, '--run_dir', str(out), *TINY, '--sample_steps', '2', '--mid_sigma', '0.821'])
    from distill_nb.checkpoints import load_network
    from distill_nb.generate import generate
    net = load_network(out / 'network-final.safetensors')
    assert net.distill_meta['sampler']['kind'] == 'consistency' and net.distill_meta['sampler']['sigmas'] == [80.0, 0.821]
    files = generate(str(out / 'network-final.safetensors'), tmp_path / 'png', seeds='0-1', device='cpu', verbose=False)
    assert len(files) == 2 and all(f.exists() for f in files)

def test_meanflow_cli_two_steps(tmp_path, teacher):
    "MeanFlow distillation for 2 iterations; the final file is a registered AverageVelocity (not a class of __main__) with its sampler."
    out = tmp_path / 'mf'
    _run(['-m', 'distill_nb.meanflow', '--teacher', teacher, '--run_dir', str(out), *TINY, '--delta_channels', '16', '--t_max', '0.9877'])
    from distill_nb.checkpoints import load_network, read_network_meta
    from distill_nb.meanflow import meanflow_sampler
    assert read_network_meta(out / 'network-final.safetensors')['class_module'] == 'distill_nb.meanflow'
    net = load_network(out / 'network-final.safetensors')
    assert type(net).__name__ == 'AverageVelocity' and net.distill_meta['sampler']['times'] == [0.9877, 0.0]
    x = meanflow_sampler(net, torch.randn(2, 3, 8, 8), torch.eye(4)[[0, 1]], net.distill_meta['sampler']['times'])
    assert x.shape == (2, 3, 8, 8) and torch.isfinite(x).all()

@pytest.mark.parametrize('mod, extra', [('distill_nb.scm', []), ('distill_nb.meanflow', ['--delta_channels', '16'])])
def test_torchrun(tmp_path, teacher, mod, extra):
    "2 CPU processes (gloo): the global batch is split, DDP finds the unused augment embedding, rank 0 writes the run."
    out = tmp_path / 'ddp'
    r = _run(['-m', 'torch.distributed.run', '--nproc_per_node', '2', '--master_port', str(_free_port()), '-m', mod,
              '--teacher', teacher, '--run_dir', str(out), *TINY, *extra])
    assert 'batch 4 = 2 processes x 2' in r.stdout
    rec = json.loads((out / 'config.json').read_text())['config']
    assert (rec['world_size'], rec['local_batch']) == (2, 2)
    assert (out / 'network-final.safetensors').is_file()

@pytest.mark.parametrize('mod', ['distill_nb.scm', 'distill_nb.meanflow'])
def test_missing_teacher_one_line(tmp_path, mod):
    r = _run(['-m', mod, '--teacher', str(tmp_path / 'nope.pkl'), '--run_dir', str(tmp_path / 'run'), '--steps', '2', '--device', 'cpu'], ok=False)
    assert r.returncode == 2 and 'Traceback' not in r.stderr, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and 'error:' in lines[0] and 'nope.pkl: no such file (from --teacher)' in lines[0], r.stderr
    assert not (tmp_path / 'run').exists()

@pytest.mark.parametrize('mod, argv, msg', [('distill_nb.scm', ['--mode', 'scd'], '--teacher'),
                                            ('distill_nb.meanflow', ['--target', 'data'], '--arch'),
                                            ('distill_nb.scm', ['--teacher', 'x', '--tangent_c', '-1'], '--tangent_c')])
def test_bad_flags_one_line(mod, argv, msg):
    r = _run(['-m', mod, *argv, '--print_config'], ok=False)
    assert r.returncode == 2 and 'Traceback' not in r.stderr and msg in r.stderr, r.stderr
