"""Command lines of consistency distillation (`cd_train`) and LCM (`lcm_train`): end to end, exact resume, DMD2 hand-off, torchrun,
user errors (one line on stderr, exit status 2, nothing written)."""
import dataclasses, json, os, re, socket, subprocess, sys
from pathlib import Path
import pytest
import torch
from safetensors.torch import load_file
from distill_nb.core import UserError

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, 'PYTHONPATH': f'{ROOT}{os.pathsep}' + os.environ.get('PYTHONPATH', ''), 'WANDB_MODE': 'disabled', 'OMP_NUM_THREADS': '1'}

def _run(args, **kw):
    r = subprocess.run([sys.executable, *args], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=240, **kw)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r

def small_teacher(path):
    "An 8x8 conditional EDMPrecond(SongUNet) with augment_dim 9 (like EDM's CIFAR nets), saved in our format."
    from distill_nb.precond import EDMPrecond
    from distill_nb.checkpoints import save_network
    import distill_nb.networks  # noqa: F401 (registers SongUNet)
    torch.manual_seed(0)
    net = EDMPrecond(8, 3, label_dim=4, model_type='SongUNet', model_channels=16, channel_mult=[1, 2], num_blocks=1,
                     attn_resolutions=[4], dropout=0.0, augment_dim=9)
    with torch.no_grad():
        for p in net.parameters(): p.add_(0.02 * torch.randn_like(p))
    return str(save_network(net, path))

@pytest.fixture(scope='module')
def teacher(tmp_path_factory): return small_teacher(tmp_path_factory.mktemp('t') / 'teacher.safetensors')

CD_ARGS = ['--data', 'toy', '--batch_size', '2', '--lr', '1e-4', '--num_scales', '8',
           '--ckpt_every', '2', '--device', 'cpu', '--ema_rate', '0.99', '--target_ema', '0.9', '--progress', 'false']

def _free_port():
    with socket.socket() as s: s.bind(('127.0.0.1', 0)); return s.getsockname()[1]

def test_cd_train_cli_torchrun_and_dmd2_handoff(tmp_path, teacher):
    "`cd_train` as a command line under torchrun (2 CPU processes, gloo); its output is DMD2's --consistency_model_path generator."
    out = tmp_path / 'cd'
    r = _run(['-m', 'torch.distributed.run', '--nproc_per_node', '2', '--master_port', str(_free_port()), '-m', 'distill_nb.cd',
              '--teacher_model_path', teacher, *CD_ARGS, '--output_path', str(out), '--train_iters', '2', '--loss', 'pseudo_huber',
              '--sample_sigmas', '80,0.8'])
    assert 'consistency model written' in r.stdout and 'batch 4 = 2 processes x 2' in r.stdout  # --batch_size is per process
    cfg = json.loads((out / 'config.json').read_text())['config']
    assert (cfg['world_size'], cfg['batch'], cfg['local_batch'], cfg['method_config']) == (2, 4, 2, 'CDConfig')
    from distill_nb.checkpoints import load_network
    cm = load_network(out / 'consistency_model.safetensors')
    assert type(cm).__name__ == 'ConsistencyPrecond' and cm.sigma_min == 0.002
    assert cm.distill_meta['sampler'] == {'kind': 'consistency', 'sigmas': [80.0, 0.8]}
    x = torch.randn(2, 3, 8, 8)
    assert torch.equal(cm(x, 0.002, torch.eye(4)[[0, 1]]), x)  # boundary condition survives the round trip
    assert (out / 'metrics.jsonl').exists()
    from distill_nb.config import parse_config  # DMD2's own command-line spellings (its config is another helper's)
    from distill_nb.dmd2 import DMD2Config, DMD2_ALIASES, make_dmd2
    model = make_dmd2(parse_config(DMD2Config, ['--teacher_model_path', teacher, '--consistency_model_path',
                                                 str(out / 'consistency_model.safetensors'), '--device', 'cpu'], DMD2_ALIASES, world_size=1))
    assert type(model.generator).__name__ == 'ConsistencyPrecond'
    from distill_nb.generate import generate  # distill_generate samples it with its stored 2-level schedule
    files = generate(str(out / 'consistency_model.safetensors'), tmp_path / 'png', seeds='0-2', device='cpu', verbose=False)
    assert len(files) == 3 and all(f.exists() for f in files)

def _cfg(teacher, out, **kw):
    from distill_nb.cd import CDConfig
    base = dict(teacher=teacher, data='toy', batch=2, lr=1e-3, num_scales=8, ckpt_every=2, device='cpu', toy_size=8, ema_rate='0.9',
                target_ema=0.5, optimizer='adam', log_every=1, progress=False, run_dir=str(out))
    return CDConfig(**{**base, **kw})

QUIET = dict(log=lambda s: None)

def test_cd_train_bad_flags(tmp_path, teacher):
    from distill_nb.cd import CDConfig, train_cd
    with pytest.raises(UserError, match='--teacher is required'): train_cd(CDConfig(device='cpu', run_dir=str(tmp_path / 'x')))
    with pytest.raises(UserError, match='--loss'): train_cd(_cfg(teacher, tmp_path / 'x', loss='l1'))
    assert not (tmp_path / 'x').exists()

def test_cd_train_exact_resume(tmp_path, teacher):
    "4 steps in one go == 2 steps + resume to 4: the student, the published EMA and the target, bit for bit."
    from distill_nb.cd import train_cd
    full = train_cd(_cfg(teacher, tmp_path / 'a', steps=4), **QUIET)
    train_cd(_cfg(teacher, tmp_path / 'b', steps=2), **QUIET)
    res = train_cd(_cfg(teacher, tmp_path / 'b', steps=4, resume='auto'), **QUIET)
    assert res.step == 4
    a, b = load_file(str(tmp_path / 'a' / 'consistency_model.safetensors')), load_file(str(tmp_path / 'b' / 'consistency_model.safetensors'))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    for p, q in zip(full.unwrapped('student').parameters(), res.unwrapped('student').parameters()): assert torch.equal(p, q)
    ta, tb = full.target.module().state_dict(), res.target.module().state_dict()
    assert all(torch.equal(ta[k], tb[k]) for k in ta)

def test_cd_in_memory_teacher_and_data(tmp_path):
    "`train_cd(cfg, teacher=module, data=dataset)` (the demo's call): no files needed; the data must still fit the teacher."
    from distill_nb.cd import CDConfig, train_cd, CD_PRESETS
    from distill_nb.toydata import ToyShapes
    from distill_nb.checkpoints import load_network
    t = load_network('builtin:tiny-edm')
    ds = ToyShapes(16, t.img_resolution, 4, seed=0, channels=t.img_channels)
    cfg = CDConfig(**{**CD_PRESETS['toy'], 'run_dir': str(tmp_path / 'r'), 'batch': 4, 'steps': 2, 'device': 'cpu', 'progress': False})
    learn = train_cd(cfg, teacher=t, data=ds, **QUIET)
    assert learn.step == 2 and learn.ema is None and (tmp_path / 'r' / 'consistency_model.safetensors').exists()
    with pytest.raises(UserError, match='images are 3x16x16, but the teacher in memory'):
        train_cd(cfg, teacher=t, data=ToyShapes(4, 16, 4, seed=0, channels=3), **QUIET)

def _lcm_files(tmp_path):
    from distill_nb.microdit import build_microdit
    from distill_nb.lcm import write_latent_dataset
    torch.manual_seed(0)
    dit = build_microdit('micro')
    with torch.no_grad():
        for p in dit.parameters(): p.add_(0.05 * torch.randn_like(p))
    torch.save(dit.state_dict(), tmp_path / 'teacher.pt')
    write_latent_dataset(tmp_path / 'lat.npz', torch.randn(8, 4, 8, 8), torch.randn(8, 5, 32))
    return tmp_path / 'teacher.pt', tmp_path / 'lat.npz'

def test_lcm_train_cli(tmp_path):
    teacher, data = _lcm_files(tmp_path)
    out = tmp_path / 'lcm'
    r = _run(['-m', 'distill_nb.lcm', '--teacher_ckpt', str(teacher), '--data', str(data), '--output_path', str(out),
              '--dit_arch', 'micro', '--latent_res', '8', '--pos_interp_scale', '1.0', '--batch_size', '4', '--micro_batch', '2',
              '--train_iters', '2', '--num_scales', '10', '--ckpt_every', '1', '--max_keep', '1', '--device', 'cpu', '--guidance_scale', '3'])
    assert 'LCM student written' in r.stdout
    from distill_nb.lcm import load_lcm, generate
    st = load_lcm(out / 'lcm_student.safetensors')
    assert st.distill_meta['sampler'] == {'kind': 'lcm', 'num_steps': 4, 'guidance_scale': 3.0, 'guidance_range': [1.0, 10.0]}
    assert st.model.guidance_embed and st.sigma_data == 0.9
    assert generate(st, torch.randn(2, 5, 32), num_inference_steps=2).shape == (2, 4, 8, 8)
    ckpts = sorted((out / 'checkpoints').iterdir())
    assert [p.name for p in ckpts if p.name.startswith('step-')] == ['step-00000002']  # max_keep 1

def test_lcm_train_rejects_mismatched_teacher(tmp_path):
    teacher, data = _lcm_files(tmp_path)
    from distill_nb.lcm import LCMConfig, train_lcm
    with pytest.raises(UserError, match=re.escape(str(teacher))):  # strict loading: the error names the checkpoint
        train_lcm(LCMConfig(teacher=str(teacher), data=str(data), dit_arch='MicroDiT_Tiny_2', latent_res=8, device='cpu',
                            run_dir=str(tmp_path / 'o')))
    assert not (tmp_path / 'o').exists()
    with pytest.raises(UserError, match='--data is required'): train_lcm(LCMConfig(teacher=str(teacher)))

# --- user errors: one line `prog: error: ...` on stderr, exit status 2, no traceback, nothing written -------------------------

def _fail(args, prog):
    "Run a command expected to fail on a user error; return its one-line message."
    r = subprocess.run([sys.executable, *args], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=240)
    lines = [l for l in r.stderr.splitlines() if l.strip() and 'Warning' not in l and not l.startswith('  warnings.warn')]
    assert r.returncode == 2, r.stdout[-2000:] + r.stderr[-2000:]
    assert 'Traceback' not in r.stderr and len(lines) == 1 and lines[0].startswith(f'{prog}: error: '), r.stderr
    return lines[0]

def test_cd_train_cli_bad_flag_one_line(tmp_path):
    msg = _fail(['-m', 'distill_nb.cd', '--teacher_model_path', 'builtin:tiny-edm', '--batch_size', '0', '--output_path', str(tmp_path / 'r')], 'cd_train')
    assert '--batch_size' in msg and not (tmp_path / 'r').exists()
    msg = _fail(['-m', 'distill_nb.cd', '--teacher_model_path', 'builtin:tiny-edm', '--sample_sigmas', '80,abc'], 'cd_train')
    assert '--sample_sigmas' in msg
    r = subprocess.run([sys.executable, '-m', 'distill_nb.cd', '--teacher_model_path', 'x', '--ema_rate', '2', '--debug'], cwd=ROOT, env=ENV,
                       capture_output=True, text=True, timeout=240)
    assert r.returncode != 0 and 'Traceback' in r.stderr and '--ema_rate' in r.stderr  # --debug shows the traceback

def test_lcm_train_cli_user_errors_one_line(tmp_path):
    teacher, data = _lcm_files(tmp_path)
    base = ['-m', 'distill_nb.lcm', '--teacher_ckpt', str(teacher), '--data', str(data), '--output_path', str(tmp_path / 'r'),
            '--dit_arch', 'micro', '--latent_res', '8', '--pos_interp_scale', '1.0', '--device', 'cpu']
    assert '--w_min 5.0 must not exceed --w_max 2.0' in _fail([*base, '--w_min', '5', '--w_max', '2'], 'lcm_train')
    cut = tmp_path / 'cut.npz'; cut.write_bytes(data.read_bytes()[:200])
    msg = _fail([*base[:4], '--data', str(cut), *base[6:]], 'lcm_train')
    assert f'{cut}: unreadable latent dataset' in msg
    assert not (tmp_path / 'r').exists()

def test_cd_train_refuses_a_previous_run(tmp_path, teacher):
    "A second run into the same folder: exit 2 naming --resume/--overwrite, the first run untouched; --overwrite replaces it."
    from distill_nb.cd import train_cd
    out = tmp_path / 'run'
    cfg = _cfg(teacher, out, ckpt_every=1, toy_size=4, steps=2)
    train_cd(cfg, **QUIET)
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    msg = _fail(['-m', 'distill_nb.cd', '--teacher_model_path', teacher, '--output_path', str(out), '--batch_size', '2', '--num_scales', '8',
                 '--train_iters', '1', '--device', 'cpu'], 'cd_train')
    assert 'use --resume to continue it or --overwrite to replace it' in msg
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    train_cd(dataclasses.replace(cfg, overwrite=True), **QUIET)
    steps = [json.loads(l)['step'] for l in (out / 'metrics.jsonl').read_text().splitlines()]
    assert steps == sorted(set(steps)) and steps[-1] == 2  # one step sequence, not two
    with pytest.raises(UserError, match='not both'): train_cd(dataclasses.replace(cfg, overwrite=True, resume='auto'), **QUIET)

def _image_folder(path, res, labels):
    from distill_nb.data.images import write_edm_dataset
    write_edm_dataset(path, [(torch.randint(0, 255, (3, res, res), dtype=torch.uint8).numpy(), l) for l in labels])
    return str(path)

def test_cd_train_data_must_fit_the_teacher(tmp_path, teacher):
    "The 8x8 4-class teacher against datasets of another resolution, more classes, or no labels: one line naming both."
    from distill_nb.cd import train_cd
    from distill_nb.data.lmdb_dataset import NO_LABEL
    cases = [(_image_folder(tmp_path / 'res16', 16, [0, 1]), 'images are 3x16x16, but the teacher'),
             (_image_folder(tmp_path / 'six', 8, list(range(6))), 'labels span 6 classes, but the teacher'),
             (_image_folder(tmp_path / 'nolab', 8, [NO_LABEL, NO_LABEL]), 'has no class labels, but the teacher')]
    for data, want in cases:
        with pytest.raises(UserError, match=want): train_cd(_cfg(teacher, tmp_path / 'o', data=data), **QUIET)
    assert not (tmp_path / 'o').exists()

CD_BAD = [(dict(batch=0), '--batch'), (dict(batch=-2), '--batch'), (dict(steps=0), '--steps'),
          (dict(num_scales=1), '--num_scales'), (dict(skip=8), '--skip'), (dict(ema_rate='-1'), '--ema_rate'), (dict(ema_rate='1'), '--ema_rate'),
          (dict(ema=-1.), '--ema'), (dict(target_ema=1.), '--target_ema'), (dict(lr=0.), '--lr'), (dict(sigma_min=80.), '--sigma_min'),
          (dict(sample_sigmas=''), '--sample_sigmas'), (dict(sample_sigmas='80,0.001'), '--sample_sigmas'),
          (dict(optimizer='sgd'), '--optimizer'), (dict(solver='rk4'), '--solver'), (dict(weighting='snr'), '--weighting'),
          (dict(precision='fp8'), '--precision'), (dict(ckpt_every=-1), '--ckpt_every'), (dict(max_keep=-1), '--max_keep'),
          (dict(clip=-1.), '--clip'), (dict(data='no/such/folder'), '--data'), (dict(micro_batch=0), '--micro_batch'),
          (dict(training_mode='consistency_training'), '--training_mode')]

@pytest.mark.parametrize('bad,flag', CD_BAD, ids=[f'{f}={list(b.values())[0]}' for b, f in CD_BAD])
def test_cd_config_checks(bad, flag):
    from distill_nb.cd import CDConfig
    with pytest.raises(UserError, match=re.escape(flag)): CDConfig(**{'teacher': 't', 'num_scales': 8, **bad}).check()

LCM_BAD = [(dict(batch=0), '--batch'), (dict(micro_batch=0), '--micro_batch'), (dict(steps=-1), '--steps'),
           (dict(num_scales=0), '--num_scales'), (dict(skip=0), '--skip'), (dict(sample_steps=0), '--sample_steps'),
           (dict(w_min=0.), '--w_min'), (dict(w_min=4., w_max=3.), '--w_max'), (dict(target_ema=1.5), '--target_ema'),
           (dict(ema_rate='-0.5'), '--ema_rate'), (dict(lr=-1e-4), '--lr'), (dict(latent_res=0), '--latent_res'), (dict(clip=0.), '--clip'),
           (dict(loss='lpips'), '--loss'), (dict(weight_decay=-1.), '--weight_decay'), (dict(guidance_scale=0.), '--guidance_scale'),
           (dict(teacher=None), '--teacher is required'), (dict(data=None), '--data is required')]

@pytest.mark.parametrize('bad,flag', LCM_BAD, ids=[f'{f}={list(b.values())[0]}' for b, f in LCM_BAD])
def test_lcm_config_checks(tmp_path, bad, flag):
    from distill_nb.lcm import LCMConfig
    (tmp_path / 't.pt').write_bytes(b'x'); (tmp_path / 'd.npz').write_bytes(b'x')
    with pytest.raises(UserError, match=re.escape(flag)):
        LCMConfig(**{'teacher': str(tmp_path / 't.pt'), 'data': str(tmp_path / 'd.npz'), **bad}).check()

def test_lcm_config_files_and_world_size(tmp_path):
    from distill_nb.lcm import LCMConfig
    (tmp_path / 'empty.pt').write_bytes(b''); (tmp_path / 'd.npz').write_bytes(b'x')
    from distill_nb.lcm import train_lcm  # the files are checked when the run builds, before anything is written
    with pytest.raises(UserError, match=r'd\.npz: unreadable latent dataset'):  # a damaged --data file, named
        train_lcm(LCMConfig(teacher=str(tmp_path / 'empty.pt'), data=str(tmp_path / 'd.npz'), run_dir=str(tmp_path / 'r1'), device='cpu'))
    assert not (tmp_path / 'r1').exists()
    with pytest.raises(UserError, match='--batch: 10 is not divisible by the number of processes'):
        LCMConfig(teacher=str(tmp_path / 'd.npz'), data=str(tmp_path / 'd.npz'), batch=10).check(world_size=4)

# --- the reference command lines (the seed spellings) parse to the intended config and run a few tiny steps ------------------

def test_cd_reference_command_line_runs(tmp_path, teacher):
    "consistency_models' README flags (CD, L2 variant; architecture flags come from the teacher's weights) on 2 processes, then 2 steps."
    from distill_nb.config import parse_config
    from distill_nb.cd import CDConfig, CD_ALIASES, CD_PRESETS, train_cd
    argv = ['--training_mode', 'consistency_distillation', '--sigma_max', '80', '--sigma_min', '0.002', '--target_ema_mode', 'fixed',
            '--start_ema', '0.95', '--scale_mode', 'fixed', '--start_scales', '40', '--total_training_steps', '600000', '--loss_norm', 'l2',
            '--teacher_model_path', teacher, '--ema_rate', '0.999,0.9999,0.9999432189950708', '--global_batch_size', '2048',
            '--lr', '0.000008', '--use_fp16', 'True', '--weight_decay', '0.0', '--weight_schedule', 'uniform', '--data_dir', 'toy',
            '--microbatch', '-1', '--save_interval', '10000']
    cfg = parse_config(CDConfig, argv, CD_ALIASES, CD_PRESETS, world_size=2)
    want = parse_config(CDConfig, ['--preset', 'cm-imagenet64-l2', '--teacher', teacher, '--data', 'toy'], CD_ALIASES, CD_PRESETS, world_size=2)
    assert cfg == want and (cfg.batch, cfg.local_batch(2), cfg.precision, cfg.loss, cfg.micro_batch) == (2048, 1024, 'fp16', 'l2', None)
    assert parse_config(CDConfig, ['--batch_size', '6'], CD_ALIASES, world_size=2).batch == 12  # per process, as the old cd_train
    tiny = dataclasses.replace(cfg, batch=2, steps=2, num_scales=8, precision='fp32', toy_size=8, device='cpu', run_dir=str(tmp_path / 'r'),
                               progress=False)
    learn = train_cd(tiny, **QUIET)
    assert learn.step == 2 and sorted(learn.ema.models) == ['0.999', '0.9999', '0.999943']  # tags: the rates to 6 digits

def test_lcm_reference_command_line_runs(tmp_path):
    "diffusers' LCM README flags that apply (per-process --train_batch_size on 2 processes), then 2 tiny steps with 2 micro-batches."
    from distill_nb.config import parse_config
    from distill_nb.lcm import LCMConfig, LCM_ALIASES, LCM_PRESETS, train_lcm
    teacher, data = _lcm_files(tmp_path)
    argv = ['--output_dir', str(tmp_path / 'r'), '--mixed_precision', 'no', '--learning_rate', '1e-6', '--loss_type', 'huber', '--ema_decay', '0.95',
            '--adam_weight_decay', '0.0', '--max_train_steps', '2', '--checkpointing_steps', '1', '--checkpoints_total_limit', '1',
            '--train_batch_size', '2', '--gradient_accumulation_steps', '1', '--resume_from_checkpoint', 'latest', '--report_to', 'none',
            '--seed', '453645634', '--teacher', str(teacher), '--data', str(data), '--dit_arch', 'micro', '--latent_res', '8',
            '--pos_interp_scale', '1.0', '--device', 'cpu', '--num_ddim_timesteps', '10', '--micro_batch', '1']
    with pytest.raises(UserError, match='--gradient_accumulation_steps and --micro_batch disagree'):
        parse_config(LCMConfig, argv, LCM_ALIASES, LCM_PRESETS, world_size=2)
    argv = argv[:-2]
    cfg = parse_config(LCMConfig, argv, LCM_ALIASES, LCM_PRESETS, world_size=2)
    assert (cfg.batch, cfg.local_batch(2), cfg.micro_batch, cfg.loss, cfg.target_ema, cfg.resume, cfg.max_keep, cfg.wandb) == \
           (4, 2, None, 'pseudo_huber', 0.95, 'auto', 1, 'disabled')
    learn = train_lcm(dataclasses.replace(cfg, micro_batch=2, progress=False), **QUIET)  # one process: the whole batch of 4, micro-batches of 2
    assert learn.step == 2 and learn.update_counts['lcm'] == 2 and learn.target is not None
    assert [p.name for p in (tmp_path / 'r' / 'checkpoints').iterdir() if p.name.startswith('step-')] == ['step-00000002']
