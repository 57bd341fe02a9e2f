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


# ---- every sampler kind the trainers write, through the one table (samplers.SAMPLERS), with the header alone ----

def _png_tensor(p: Path) -> torch.Tensor:
    return torch.from_numpy(np.array(Image.open(p))).permute(2, 0, 1)

@pytest.fixture(scope='module')
def kind_files(tmp_path_factory, nets):
    "One tiny 8x8 network file per sampler kind, each header written as the trainer that produces the kind writes it."
    from distill_nb.learner import save_module
    from distill_nb.dkdm import MLPEps
    from distill_nb.adm import ADMUNet, adm_kwargs_from_flags
    from distill_nb.meanflow import AverageVelocity
    import copy
    d, (net, _, _) = tmp_path_factory.mktemp('kinds'), nets
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        eps = MLPEps((3, 8, 8), hidden=32, depth=1)  # a DKDM toy student (learned variances: 6 output channels)
        adm = ADMUNet(**adm_kwargs_from_flags('tiny', image_size=8, num_channels=32, num_res_blocks=1, attention_resolutions='',
                                              channel_mult='1', num_heads=1, class_cond=True, num_classes=4, learn_sigma=True))
        with torch.no_grad():
            for p in adm.parameters(): p.add_(torch.randn_like(p) * 0.02)  # ADM zero-initialises its output layer
        mf = AverageVelocity(copy.deepcopy(net), delta_channels=16)  # a MeanFlow student (average velocity, not a denoiser)
    diffusion = dict(diffusion_steps=40, noise_schedule='cosine', learn_sigma=True, timestep_respacing='4', clip_denoised=True)
    return {
        'edm': save_network(net, d / 'edm.safetensors', meta={'sampler': {'kind': 'edm', 'num_steps': 3}}),
        'one_step': save_network(net, d / 'one.safetensors', meta={'sampler': {'kind': 'one_step', 'sigma': 80.}}),
        'consistency': save_network(net, d / 'cm.safetensors', meta={'sampler': {'kind': 'consistency', 'sigmas': [80., 0.8]}}),
        'few_step': save_network(net, d / 'few.safetensors', meta={'sampler': {'kind': 'few_step', 'sigmas': [80., 2.5]}}),
        # DKDM writes the teacher's diffusion flags and no sampler entry: ancestral DDPM with the flags' respacing
        'ddpm': save_module(eps, d / 'dkdm-student.safetensors', meta={'step': 1, 'diffusion': diffusion}),
        'ddim': save_module(eps, d / 'ddim.safetensors', meta={'sampler': {'kind': 'ddim', 'steps': 5, 'eta': 0.5}, 'diffusion': diffusion}),
        # DKDM's final file today (dkdm.ddpm_sampler_meta): a class-conditional ADM ε-network with its process in the sampler entry
        'ddpm-adm': save_module(adm, d / 'adm.safetensors', meta={'sampler': {
            'kind': 'ddpm', 'diffusion': {'diffusion_steps': 40, 'noise_schedule': 'cosine', 'learn_sigma': True, 'timestep_respacing': ''},
            'steps': '3', 'ddim': False, 'clip_denoised': True}}),
        'meanflow': save_network(mf, d / 'mf.safetensors', meta={'sampler': {
            'kind': 'meanflow', 'times': [0.98, 0.], 'parametrisation': 'rectified_flow', 'two_step_times': [0.98, 0.5, 0.]}}),
    }

@pytest.mark.parametrize('kind', ['edm', 'one_step', 'consistency', 'few_step', 'ddpm', 'ddim', 'ddpm-adm', 'meanflow'])
def test_every_kind_round_trip(tmp_path, kind_files, kind):
    "Save -> distill_generate with the header alone -> PNGs of the right shape, one per seed, the same for a seed in any "
    "batch of the same size and run, and equal to the Python side (`samplers.seed_images`, the same table)."
    from distill_nb.generate import distill_generate
    from distill_nb.checkpoints import load_network
    from distill_nb.samplers import seed_images, sampler_meta
    f = kind_files[kind]
    net = load_network(str(f))
    assert sampler_meta(net)['kind'] == kind.split('-')[0]
    distill_generate(network=str(f), outdir=str(tmp_path / 'a'), seeds='0-3', batch=2, device='cpu')
    distill_generate(network=str(f), outdir=str(tmp_path / 'b'), seeds='3,2,1,0', batch=2, device='cpu')
    a, b = pngs(tmp_path / 'a'), pngs(tmp_path / 'b')
    assert sorted(a) == sorted(b) == [f'{i:06d}.png' for i in range(4)]
    assert all(v.shape == (8, 8, 3) and v.dtype == np.uint8 for v in a.values())
    # seeds 0,1 are batch [0, 1] in run a and [1, 0] in run b: a seed's image does not depend on its batch mates or its place
    assert all(np.array_equal(a[k], b[k]) for k in a), kind
    ref = to_uint8(seed_images(net, [0, 1], device='cpu'))  # the batch [0, 1] of run a, through `samplers.sample`
    for i in range(2): assert torch.equal(_png_tensor(tmp_path / 'a' / f'{i:06d}.png'), ref[i]), kind
    assert len({v.tobytes() for v in a.values()}) == 4  # four seeds, four different images

def test_dkdm_student_from_the_command_line(tmp_path, kind_files):
    "`python -m distill_nb.generate` on a DKDM student file: ancestral steps from the header's flags, `--steps` respaces."
    cli('--network', kind_files['ddpm'], '--outdir', tmp_path / 'o', '--seeds', '0-1', '--steps', 2, '--device', 'cpu')
    from distill_nb.checkpoints import load_network
    from distill_nb.samplers import seed_images
    ref = to_uint8(seed_images(load_network(str(kind_files['ddpm'])), [0, 1], device='cpu', steps=2))
    got = pngs(tmp_path / 'o')
    assert all(np.array_equal(got[f'{i:06d}.png'], ref[i].permute(1, 2, 0).numpy()) for i in range(2))
    from distill_nb.generate import generate
    from distill_nb.core import UserError
    with pytest.raises(UserError, match='--solver: does not apply'):  # a user error: one line, exit 2 from the command (core.cli)
        generate(str(kind_files['ddpm']), tmp_path / 'x', seeds='0', solver='euler', device='cpu', verbose=False)
    assert not (tmp_path / 'x').exists()

def test_few_step_is_dmd2_backward_simulation(kind_files):
    "The `few_step` kind re-noises to exactly σ_k (DMD2's rule), `consistency` to √(σ_k² − σ_min²); with σ_min = 0 they agree."
    from distill_nb.checkpoints import load_network
    from distill_nb.samplers import seed_images
    net = load_network(str(kind_files['few_step']))
    x = seed_images(net, [0, 1], device='cpu')
    assert torch.equal(x, seed_images(net, [0, 1], device='cpu', meta={'kind': 'consistency', 'sigmas': [80., 2.5], 'sigma_min': 0.}))
    assert x.shape == (2, 3, 8, 8) and torch.isfinite(x).all()

def test_lcm_kind(tmp_path):
    "An LCM student file: `samplers.sample` runs LCM's sampler (lazy entry) with the header's steps and guidance; "
    "distill_generate refuses its 4-channel latents with one line pointing to lcm.generate."
    from distill_nb.microdit import latent_teacher, latent_student_from_teacher, microdit_kwargs
    from distill_nb.lcm import save_lcm, lcm_sample
    from distill_nb.checkpoints import load_network
    from distill_nb.samplers import seed_images, sampler_meta
    from distill_nb.core import StackedRandomGenerator
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        student = latent_student_from_teacher(latent_teacher(microdit_kwargs('micro'), caption_len=5)).eval()
    f = save_lcm(student, tmp_path / 'lcm.safetensors', num_steps=2, guidance_scale=3.)
    net = load_network(str(f))
    assert sampler_meta(net)['kind'] == 'lcm'
    got = seed_images(net, [0, 1], device='cpu')
    rnd = StackedRandomGenerator('cpu', [0, 1])
    z = rnd.randn([2, net.img_channels, net.img_resolution, net.img_resolution])
    assert torch.equal(got, lcm_sample(net, z, None, 3., 2, randn_like=rnd.randn_like).float())
    r = cli('--network', f, '--outdir', tmp_path / 'o', '--seeds', '0', '--device', 'cpu', check=False)
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    assert r.returncode == 2 and len(lines) == 1 and 'lcm.generate' in lines[0], r.stderr[-2000:]
    assert not (tmp_path / 'o').exists() or not any((tmp_path / 'o').iterdir())

def test_unknown_kind_is_a_user_error(tmp_path, nets):
    net = nets[0]
    f = save_network(net, tmp_path / 'flow.safetensors', meta={'sampler': {'kind': 'flow'}})
    from distill_nb.generate import generate
    from distill_nb.core import UserError
    with pytest.raises(UserError, match="sampler kind 'flow' in the network's header is unknown; expected one of"):
        generate(str(f), tmp_path / 'o', seeds='0', device='cpu', verbose=False)

def test_samplers_module_imports_no_method_module():
    "samplers.py imports only core and schedules; method-specific samplers are lazy 'distill_nb.module:function' entries that resolve."
    import ast
    import distill_nb.samplers as S
    tree = ast.parse(Path(S.__file__).read_text())
    own = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and (n.level or (n.module or '').startswith('distill_nb'))}
    own |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names if a.name.startswith('distill_nb')}
    assert own <= {'core', 'schedules', 'distill_nb.core', 'distill_nb.schedules'}, own
    for k, mod in (('lcm', 'distill_nb.lcm'), ('one_step_fp32', 'distill_nb.gdd')): assert S.get_sampler(k).__module__ == mod
    assert set(S.SAMPLERS) <= set(S.SAMPLER_SETTINGS)
