"Command lines of consistency distillation (`cd_train`) and LCM (`lcm_train`): end to end, exact resume, DMD2 hand-off, torchrun."
import os, socket, subprocess, sys
from pathlib import Path
import pytest
import torch
from safetensors.torch import load_file

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
    with pytest.raises(ValueError, match='--teacher_model_path is required'): train_cd(CDConfig(device='cpu'))
    with pytest.raises(ValueError, match='--loss'):
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
    with pytest.raises(ValueError, match='does not match'):  # strict loading: wrong architecture for the checkpoint
        train_lcm(LCMConfig(teacher_ckpt=str(teacher), data=str(data), dit_arch='MicroDiT_Tiny_2', latent_res=8, device='cpu',
                            output_path=str(tmp_path / 'o')))
    with pytest.raises(ValueError, match='--data is required'): train_lcm(LCMConfig(teacher_ckpt=str(teacher)))
