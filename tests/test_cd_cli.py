"""Command lines of consistency distillation (`cd_train`) and LCM (`lcm_train`): end to end, exact resume, DMD2 hand-off, torchrun,
user errors (one line on stderr, exit status 2, nothing written)."""
import json, os, re, socket, subprocess, sys
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
           '--ckpt_every', '2', '--device', 'cpu', '--ema', '0.99', '--target_ema', '0.9']

def _free_port():
    with socket.socket() as s: s.bind(('127.0.0.1', 0)); return s.getsockname()[1]

def test_cd_train_cli_torchrun_and_dmd2_handoff(tmp_path, teacher):
    "`cd_train` as a command line under torchrun (2 CPU processes, gloo); its output is DMD2's --consistency_model_path generator."
    out = tmp_path / 'cd'
    r = _run(['-m', 'torch.distributed.run', '--nproc_per_node', '2', '--master_port', str(_free_port()), '-m', 'distill_nb.cd',
              '--teacher_model_path', teacher, *CD_ARGS, '--output_path', str(out), '--train_iters', '2', '--loss', 'pseudo_huber',
              '--sample_sigmas', '80,0.8'])
    assert 'consistency model written' in r.stdout
    import json
    assert json.loads((out / 'config.json').read_text())['world_size'] == 2
    from distill_nb.checkpoints import load_network
    cm = load_network(out / 'consistency_model.safetensors')
    assert type(cm).__name__ == 'ConsistencyPrecond' and cm.sigma_min == 0.002
    assert cm.distill_meta['sampler'] == {'kind': 'consistency', 'sigmas': [80.0, 0.8]}
    x = torch.randn(2, 3, 8, 8)
    assert torch.equal(cm(x, 0.002, torch.eye(4)[[0, 1]]), x)  # boundary condition survives the round trip
    assert (out / 'metrics.jsonl').exists()
    from distill_nb.dmd2 import DMD2Config, build_dmd2
    model = build_dmd2(DMD2Config(teacher_model_path=teacher, consistency_model_path=str(out / 'consistency_model.safetensors'),
                                  device='cpu'))
    assert type(model.generator).__name__ == 'ConsistencyPrecond'
    from distill_nb.generate import generate  # distill_generate samples it with its stored 2-level schedule
    files = generate(str(out / 'consistency_model.safetensors'), tmp_path / 'png', seeds='0-2', device='cpu', verbose=False)
    assert len(files) == 3 and all(f.exists() for f in files)

def test_cd_train_bad_flags(tmp_path, teacher):
    from distill_nb.cd import CDConfig, train_cd
    with pytest.raises(UserError, match='--teacher_model_path is required'): train_cd(CDConfig(device='cpu'))
    with pytest.raises(UserError, match='--loss'):
        train_cd(CDConfig(teacher_model_path=teacher, loss='l1', device='cpu', output_path=str(tmp_path / 'x'), toy_size=4))

def test_cd_train_exact_resume(tmp_path, teacher):
    from distill_nb.cd import CDConfig, train_cd
    base = dict(teacher_model_path=teacher, data='toy', batch_size=2, lr=1e-3, num_scales=8, ckpt_every=2, device='cpu',
                toy_size=8, ema=0.9, target_ema=0.5, optimizer='adam', log_every=1)
    full = train_cd(CDConfig(**base, output_path=str(tmp_path / 'a'), train_iters=4), log_fn=lambda s: None)
    train_cd(CDConfig(**base, output_path=str(tmp_path / 'b'), train_iters=2), log_fn=lambda s: None)
    res = train_cd(CDConfig(**base, output_path=str(tmp_path / 'b'), train_iters=4, resume=True), log_fn=lambda s: None)
    assert res.step == 4
    a, b = load_file(str(tmp_path / 'a' / 'consistency_model.safetensors')), load_file(str(tmp_path / 'b' / 'consistency_model.safetensors'))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    for p, q in zip(full.unwrapped('student').parameters(), res.unwrapped('student').parameters()): assert torch.equal(p, q)

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
              '--train_iters', '2', '--num_scales', '10', '--ckpt_every', '1', '--device', 'cpu', '--guidance_scale', '3'])
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
        train_lcm(LCMConfig(teacher_ckpt=str(teacher), data=str(data), dit_arch='MicroDiT_Tiny_2', latent_res=8, device='cpu',
                            output_path=str(tmp_path / 'o')))
    assert not (tmp_path / 'o').exists()
    with pytest.raises(UserError, match='--data is required'): train_lcm(LCMConfig(teacher_ckpt=str(teacher)))

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
    r = subprocess.run([sys.executable, '-m', 'distill_nb.cd', '--teacher_model_path', 'x', '--ema', '2', '--debug'], cwd=ROOT, env=ENV,
                       capture_output=True, text=True, timeout=240)
    assert r.returncode != 0 and 'Traceback' in r.stderr and '--ema' in r.stderr  # --debug shows the traceback

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
    from distill_nb.cd import CDConfig, train_cd
    out = tmp_path / 'run'
    cfg = dict(teacher_model_path=teacher, data='toy', output_path=str(out), batch_size=2, num_scales=8, ckpt_every=1, device='cpu',
               toy_size=4, train_iters=2, log_every=1, ema=0.9)
    train_cd(CDConfig(**cfg), log_fn=lambda s: None)
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    msg = _fail(['-m', 'distill_nb.cd', '--teacher_model_path', teacher, '--output_path', str(out), '--batch_size', '2', '--num_scales', '8',
                 '--train_iters', '1', '--device', 'cpu'], 'cd_train')
    assert 'use --resume to continue it or --overwrite to replace it' in msg
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    train_cd(CDConfig(**cfg, overwrite=True), log_fn=lambda s: None)
    steps = [json.loads(l)['step'] for l in (out / 'metrics.jsonl').read_text().splitlines()]
    assert steps == sorted(set(steps)) and steps[-1] == 2  # one step sequence, not two
    with pytest.raises(UserError, match='not both'): train_cd(CDConfig(**cfg, overwrite=True, resume=True))

def _image_folder(path, res, labels):
    from distill_nb.data.images import write_edm_dataset
    write_edm_dataset(path, [(torch.randint(0, 255, (3, res, res), dtype=torch.uint8).numpy(), l) for l in labels])
    return str(path)

def test_cd_train_data_must_fit_the_teacher(tmp_path, teacher):
    "The 8x8 4-class teacher against datasets of another resolution, more classes, or no labels: one line naming both."
    from distill_nb.cd import CDConfig, train_cd
    from distill_nb.data.lmdb_dataset import NO_LABEL
    cases = [(_image_folder(tmp_path / 'res16', 16, [0, 1]), 'images are 3x16x16, but the teacher'),
             (_image_folder(tmp_path / 'six', 8, list(range(6))), 'labels span 6 classes, but the teacher'),
             (_image_folder(tmp_path / 'nolab', 8, [NO_LABEL, NO_LABEL]), 'has no class labels, but the teacher')]
    for data, want in cases:
        with pytest.raises(UserError, match=want):
            train_cd(CDConfig(teacher_model_path=teacher, data=data, output_path=str(tmp_path / 'o'), device='cpu'))
    assert not (tmp_path / 'o').exists()

CD_BAD = [(dict(batch_size=0), '--batch_size'), (dict(batch_size=-2), '--batch_size'), (dict(train_iters=0), '--train_iters'),
          (dict(num_scales=1), '--num_scales'), (dict(skip=8), '--skip'), (dict(ema=-1.), '--ema'), (dict(ema=1.), '--ema'),
          (dict(target_ema=1.), '--target_ema'), (dict(lr=0.), '--lr'), (dict(sigma_min=80.), '--sigma_min'),
          (dict(sample_sigmas=[]), '--sample_sigmas'), (dict(sample_sigmas=[80., 0.001]), '--sample_sigmas'),
          (dict(optimizer='sgd'), '--optimizer'), (dict(solver='rk4'), '--solver'), (dict(weighting='snr'), '--weighting'),
          (dict(amp='fp8'), '--amp'), (dict(ckpt_every=0), '--ckpt_every'), (dict(max_keep=0), '--max_keep'),
          (dict(clip=-1.), '--clip'), (dict(data='no/such/folder'), '--data'), (dict(resume=True, overwrite=True), 'not both')]

@pytest.mark.parametrize('bad,flag', CD_BAD, ids=[f'{f}={list(b.values())[0]}' for b, f in CD_BAD])
def test_cd_config_checks(bad, flag):
    from distill_nb.cd import CDConfig, check_cd_config
    with pytest.raises(UserError, match=re.escape(flag)): check_cd_config(CDConfig(**{'teacher_model_path': 't', 'num_scales': 8, **bad}))

LCM_BAD = [(dict(batch_size=0), '--batch_size'), (dict(micro_batch=0), '--micro_batch'), (dict(train_iters=-1), '--train_iters'),
           (dict(num_scales=0), '--num_scales'), (dict(skip=0), '--skip'), (dict(sample_steps=0), '--sample_steps'),
           (dict(w_min=0.), '--w_min'), (dict(w_min=4., w_max=3.), '--w_max'), (dict(target_ema=1.5), '--target_ema'),
           (dict(ema=-0.5), '--ema'), (dict(lr=-1e-4), '--lr'), (dict(latent_res=0), '--latent_res'), (dict(clip=0.), '--clip'),
           (dict(loss='lpips'), '--loss'), (dict(weight_decay=-1.), '--weight_decay'), (dict(guidance_scale=0.), '--guidance_scale')]

@pytest.mark.parametrize('bad,flag', LCM_BAD, ids=[f'{f}={list(b.values())[0]}' for b, f in LCM_BAD])
def test_lcm_config_checks(tmp_path, bad, flag):
    from distill_nb.lcm import LCMConfig, check_lcm_config
    (tmp_path / 't.pt').write_bytes(b'x'); (tmp_path / 'd.npz').write_bytes(b'x')
    with pytest.raises(UserError, match=re.escape(flag)):
        check_lcm_config(LCMConfig(teacher_ckpt=str(tmp_path / 't.pt'), data=str(tmp_path / 'd.npz'), **bad))

def test_lcm_config_files_and_world_size(tmp_path):
    from distill_nb.lcm import LCMConfig, check_lcm_config
    (tmp_path / 'empty.pt').write_bytes(b''); (tmp_path / 'd.npz').write_bytes(b'x')
    with pytest.raises(UserError, match='empty file'): check_lcm_config(LCMConfig(teacher_ckpt=str(tmp_path / 'empty.pt'), data=str(tmp_path / 'd.npz')))
    with pytest.raises(UserError, match='no such file'): check_lcm_config(LCMConfig(teacher_ckpt=str(tmp_path / 'd.npz'), data=str(tmp_path / 'none.npz')))
    with pytest.raises(UserError, match='--batch_size: 10 is not divisible by the number of processes'):
        check_lcm_config(LCMConfig(teacher_ckpt=str(tmp_path / 'd.npz'), data=str(tmp_path / 'd.npz'), batch_size=10), world_size=4)
