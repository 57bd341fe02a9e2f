"Tests of the `sid_train` command line (SiD, Zhou et al. 2024) as a subprocess, on CPU with the demo teacher."
import json, os, subprocess, sys
from pathlib import Path
from distill_nb.demo_teacher import demo_teacher_path
from distill_nb.learner import read_module_meta, list_checkpoints

ROOT = Path(__file__).resolve().parents[1]


def _cli(*args):
    cmd = [sys.executable, '-m', 'distill_nb.sid', *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, 'PYTHONPATH': str(ROOT), 'OMP_NUM_THREADS': '1', 'WANDB_MODE': 'disabled'})


def test_help_lists_official_spellings():
    r = _cli('--help')
    assert r.returncode == 0, r.stderr[-3000:]
    for flag in ('--teacher', '--alpha', '--tmax', '--glr', '--edm_model', '--init_sigma', '--batch-gpu', '--duration', '--fp16', '--preset'):
        assert flag in r.stdout, flag


def test_two_step_run_with_official_spellings(tmp_path):
    run = tmp_path / 'run'
    r = _cli('--edm_model', demo_teacher_path(), '--outdir', run, '--batch', 4, '--batch-gpu', 2, '--duration', 0.000008,
             '--alpha', 1.2, '--tmax', 800, '--init_sigma', 2.5, '--fp16', 0, '--dropout', 0, '--sample_every', 0,
             '--ckpt_every', 2, '--device', 'cpu', '--progress', 0, '--log_every', 1)
    assert r.returncode == 0, r.stderr[-3000:]
    cfg = json.loads((run / 'config.json').read_text())['config']
    assert (cfg['batch'], cfg['batch_gpu'], cfg['n_steps'], cfg['accum'], cfg['precision']) == (4, 2, 2, 2, 'fp32')
    assert read_module_meta(run / 'network-final.safetensors')['sampler'] == {'kind': 'one_step', 'sigma': 2.5}
    assert [p.name for p in list_checkpoints(run / 'checkpoints')] == ['step-00000002']


def test_missing_teacher_is_one_line(tmp_path):
    r = _cli('--teacher', tmp_path / 'nope.pkl', '--run_dir', tmp_path / 'r', '--steps', 1, '--device', 'cpu')
    assert r.returncode == 2 and 'Traceback' not in r.stderr, r.stderr[-3000:]
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and 'nope.pkl' in lines[0] and lines[0].startswith('sid_train: error:'), r.stderr


def test_user_errors_are_one_line(tmp_path):
    for args, what in ((('--run_dir', tmp_path / 'r', '--steps', 1), '--teacher'),
                       (('--edm_model', demo_teacher_path(), '--run_dir', tmp_path / 'r', '--use_gan', 1), '--data'),
                       (('--edm_model', demo_teacher_path(), '--run_dir', tmp_path / 'r', '--augment', 0.12), '--augment'),
                       (('--edm_model', demo_teacher_path(), '--run_dir', tmp_path / 'r', '--cond', 0, '--steps', 1, '--device', 'cpu'), '--cond')):
        r = _cli(*args)
        assert r.returncode == 2 and what in r.stderr and 'Traceback' not in r.stderr and len(r.stderr.strip().splitlines()) == 1, (what, r.stderr[-2000:])


def test_sida_two_processes(tmp_path):
    "SiDA (real toy images, adversarial terms from the start) under torchrun with 2 CPU processes (gloo): --batch is global."
    run = tmp_path / 'run'
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node', '2', '--master_port', str(_free_port()), '-m', 'distill_nb.sid',
           '--edm_model', str(demo_teacher_path()), '--outdir', str(run), '--batch', '8', '--batch-gpu', '2', '--steps', '2',
           '--use_gan', '1', '--data', 'toy', '--g_warmup_kimg', '0', '--gan_start_kimg', '0', '--sample_every', '0',
           '--device', 'cpu', '--progress', '0', '--log_every', '1']
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600,
                       env={**os.environ, 'PYTHONPATH': str(ROOT), 'OMP_NUM_THREADS': '1', 'WANDB_MODE': 'disabled'})
    assert r.returncode == 0, r.stderr[-3000:]
    cfg = json.loads((run / 'config.json').read_text())['config']
    assert (cfg['world_size'], cfg['local_batch'], cfg['accum']) == (2, 4, 2)
    rec = [json.loads(l) for l in (run / 'metrics.jsonl').read_text().splitlines()][-1]
    assert rec['step'] == 2 and rec['skipped_total'] == 0 and 'fake/d_loss' in rec and 'generator/gan' in rec
    assert (run / 'network-final.safetensors').is_file()


def _free_port() -> int:
    import socket
    with socket.socket() as s: s.bind(('127.0.0.1', 0)); return s.getsockname()[1]


def test_official_flag_not_accepted_is_one_line(tmp_path):
    r = _cli('--edm_model', demo_teacher_path(), '--run_dir', tmp_path / 'r', '--tick', 10)
    assert r.returncode == 2 and '--tick' in r.stderr and 'Traceback' not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr[-2000:]
