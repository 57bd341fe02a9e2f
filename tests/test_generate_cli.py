"`distill_generate` run as `python -m distill_nb.generate`: EDM's flags, file names and folders, EDM pickles and our checkpoints, two gloo processes."
import os, socket, subprocess, sys
from pathlib import Path
import numpy as np
import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path: sys.path.insert(0, str(ROOT))  # works without `pip install -e .`
from distill_nb.checkpoints import write_edm_pickle, save_network, _ensure_registry
from distill_nb.core import REGISTRY
from distill_nb.samplers import generate_images, one_step_sample, edm_latents_and_labels
from distill_nb.core import to_uint8


def env(**kw):
    return dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get('PYTHONPATH', ''), OMP_NUM_THREADS='1', **kw)

def cli(*args, check=True, **env_kw):
    "Run `python -m distill_nb.generate ARGS`."
    r = subprocess.run([sys.executable, '-m', 'distill_nb.generate', *map(str, args)], capture_output=True, text=True,
                       env=env(**env_kw), timeout=180)
    if check: assert r.returncode == 0, r.stderr
    return r

def pngs(d: Path) -> dict:
    return {p.relative_to(d).as_posix(): np.array(Image.open(p)) for p in sorted(d.rglob('*.png'))}

@pytest.fixture(scope='module')
def nets(tmp_path_factory):
    d = tmp_path_factory.mktemp('nets')
    _ensure_registry()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        net = REGISTRY['EDMPrecond'](img_resolution=8, img_channels=3, label_dim=4, model_type='SongUNet', model_channels=16,
                                     channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4], dropout=0.0)
        with torch.no_grad():
            for p in net.parameters(): p.add_(torch.randn_like(p) * 0.05)
    net.eval()
    pkl = write_edm_pickle(d / 'edm-tiny-8x8-cond.pkl', {'ema': net, 'loss_fn': None, 'augment_pipe': None, 'dataset_kwargs': {}})
    gen = save_network(net, d / 'gen.safetensors', meta={'sampler': {'kind': 'one_step', 'sigma': 80.}})
    return net, pkl, gen

def test_help():
    r = cli('--help')
    for flag in ('--network', '--outdir', '--seeds', '--subdirs', '--class_idx', '--batch', '--steps', '--sigma_min',
                 '--sigma_max', '--rho', '--S_churn', '--S_min', '--S_max', '--S_noise', '--solver', '--device'):
        assert flag in r.stdout, flag

def test_edm_pickle_matches_sampler(tmp_path, nets):
    "EDM's flag spellings; PNGs equal `generate_images` (EDM's seeds-to-latents/labels rule and Heun sampler)."
    net, pkl, _ = nets
    cli('--network', pkl, '--outdir', tmp_path / 'out', '--seeds=0-4,1001', '--batch=2', '--steps', 3, '--S_churn', 5,
        '--device', 'cpu', '--subdirs')
    got = pngs(tmp_path / 'out')
    assert sorted(got) == ['000000/000000.png', '000000/000001.png', '000000/000002.png', '000000/000003.png',
                           '000000/000004.png', '001000/001001.png']
    # exact PNG parity with the same batching (--batch=2); another batch size changes float32 conv rounding, and one
    # pixel in 6x8x8x3 flipped by one uint8 level at batch 6 (torch 2.14.1 CPU), so across batchings allow 1 level
    ref = generate_images(net, [0, 1, 2, 3, 4, 1001], batch_size=2, device='cpu', num_steps=3, S_churn=5.)
    for i, k in enumerate(sorted(got)): assert np.array_equal(got[k], ref[i].permute(1, 2, 0).numpy()), k
    ref6 = generate_images(net, [0, 1, 2, 3, 4, 1001], batch_size=6, device='cpu', num_steps=3, S_churn=5.)
    for i, k in enumerate(sorted(got)): assert np.abs(got[k].astype(int) - ref6[i].permute(1, 2, 0).numpy()).max() <= 1, k

def test_class_flag_and_errors(tmp_path, nets):
    "`--class` (EDM's spelling) fixes the label; bad flags and files give clear errors."
    net, pkl, _ = nets
    cli('--network', pkl, '--outdir', tmp_path / 'c', '--seeds', '0-1', '--class', 2, '--steps', 2, '--device', 'cpu')
    ref = generate_images(net, [0, 1], class_idx=2, device='cpu', num_steps=2)
    got = pngs(tmp_path / 'c')
    assert all(np.array_equal(got[f'{i:06d}.png'], ref[i].permute(1, 2, 0).numpy()) for i in range(2))
    from fastcore.script import anno_parser
    from distill_nb.generate import distill_generate, generate
    p = anno_parser(distill_generate)
    assert p.parse_args(['--network', 'x', '--outdir', 'o', '--class', '3']).class_idx == 3
    with pytest.raises(SystemExit): p.parse_args(['--outdir', 'o'])            # --network is required
    with pytest.raises(SystemExit): p.parse_args(['--network', 'x', '--outdir', 'o', '--solver', 'rk4'])
    with pytest.raises(ValueError, match='--class'): generate(str(pkl), tmp_path / 'e', seeds='0', class_idx=7, device='cpu', verbose=False)
    # a missing network is a user error naming the file (checkpoints.CheckpointError, a UserError)
    with pytest.raises((FileNotFoundError, ValueError), match='missing.pkl'): generate(str(tmp_path / 'missing.pkl'), tmp_path / 'e', device='cpu', verbose=False)

def test_one_step_generator(tmp_path, nets):
    net, _, gen = nets
    cli('--network', gen, '--outdir', tmp_path / 'g', '--seeds', '3-5', '--device', 'cpu')
    lat, lab, _ = edm_latents_and_labels([3, 4, 5], 3, 8, 4)
    ref = to_uint8(one_step_sample(net, lat, lab, sigma=80.))
    got = pngs(tmp_path / 'g')
    for i, s in enumerate([3, 4, 5]): assert np.array_equal(got[f'{s:06d}.png'], ref[i].permute(1, 2, 0).numpy())

def test_two_processes_match_one(tmp_path, nets):
    "torchrun-style environment with WORLD_SIZE=2 (gloo): EDM's rank_batches split, same files as one process."
    _, pkl, _ = nets
    args = ['--network', pkl, '--seeds', '0-6', '--batch', 2, '--steps', 2, '--device', 'cpu']
    from distill_nb.generate import generate
    generate(str(pkl), tmp_path / 'one', seeds='0-6', batch=2, steps=2, device='cpu', verbose=False)
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0)); port = s.getsockname()[1]
    procs = [subprocess.Popen([sys.executable, '-m', 'distill_nb.generate', *map(str, args), '--outdir', str(tmp_path / 'two')],
                              env=env(RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE='2', MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port)),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(2)]
    outs = [p.communicate(timeout=180) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outs]
    one, two = pngs(tmp_path / 'one'), pngs(tmp_path / 'two')
    assert sorted(one) == sorted(two) == [f'{i:06d}.png' for i in range(7)]
    assert all(np.array_equal(one[k], two[k]) for k in one)
