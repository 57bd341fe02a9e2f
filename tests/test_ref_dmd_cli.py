"`dmd_train` (DMD v1) on the command line: the reference's flag spellings, the seed's DM-loss σ range, user errors as one line with exit status 2, no overwrite of a run."
import os, subprocess, sys
from pathlib import Path
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path: sys.path.insert(0, str(ROOT))
from distill_nb.core import UserError
from distill_nb.checkpoints import save_network
from distill_nb.data.pairs import write_pairs
from distill_nb.dmd2 import ToyEDMDenoiser
from distill_nb.config import parse_config
from distill_nb.learner import list_checkpoints
from distill_nb.dmd import DMDConfig, DMD_ALIASES, DMD_PRESETS, train_dmd, dm_index_range, normalize_argv, dmd_train_main
from distill_nb.samplers import edm_sampler
from distill_nb.schedules import karras_train_sigmas


@pytest.fixture(scope='module')
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp('dmd')
    torch.manual_seed(0)
    teacher = ToyEDMDenoiser(8, 3, 4, 8)
    save_network(teacher, d / 'teacher.safetensors')
    save_network(ToyEDMDenoiser(16, 3, 4, 8), d / 'teacher16.safetensors')
    save_network(ToyEDMDenoiser(8, 3, 2, 8), d / 'teacher2cls.safetensors')
    write_pairs(d / 'pairs.hdf5', teacher, list(range(8)), [i % 4 for i in range(8)],
                sample_fn=lambda n, z, y: edm_sampler(n, z, y, num_steps=2).float(), batch_size=8)
    return d


def _cli(*args, cwd):
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get('PYTHONPATH', ''), OMP_NUM_THREADS='1')
    return subprocess.run([sys.executable, '-c', 'from distill_nb.dmd import dmd_train_main; dmd_train_main()', *map(str, args)],
                          capture_output=True, text=True, env=env, timeout=180, cwd=cwd)


def _assert_user_error(r, *needles):
    assert r.returncode == 2, (r.returncode, r.stderr[-3000:])
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith('dmd_train: error: '), r.stderr[-3000:]
    assert 'Traceback' not in r.stderr
    for n in needles: assert n in lines[0], lines[0]


def _args(files, out, *extra):
    return ('--model-path', files / 'teacher.safetensors', '--data-path', files / 'pairs.hdf5', '--output-dir', out, '--batch-size', 4,
            '--device', 'cpu', '--num-workers', 0, '--regression-loss', 'l2', '--log-iters', 2, '--no_progress', *extra)


@pytest.mark.parametrize('extra, needle', [(('--batch-size', '-2'), '--batch_size'), (('--epochs', '0'), '--epochs'),
                                           (('--dm-sigma-range', 'edm'), '--dm_sigma_range'), (('--lr', '-1'), '--lr'),
                                           (('--train-iters', '3'), '--epochs: give either --epochs or --steps')])
def test_cli_bad_flags(files, tmp_path, extra, needle):
    r = _cli(*_args(files, tmp_path / 'run', *extra, *(('--epochs', 1) if '--train-iters' in extra else ())), cwd=tmp_path)
    _assert_user_error(r, needle)
    assert not (tmp_path / 'run').exists()


def test_cli_teacher_does_not_fit_pairs(files, tmp_path):
    r = _cli('--model-path', files / 'teacher16.safetensors', *_args(files, tmp_path / 'run')[2:], cwd=tmp_path)
    _assert_user_error(r, 'pairs.hdf5', '3x8x8', '3x16x16')
    with pytest.raises(UserError, match='has class 3, but the teacher has label_dim=2'):
        train_dmd(DMDConfig(teacher=str(files / 'teacher2cls.safetensors'), data_path=str(files / 'pairs.hdf5'),
                            run_dir=str(tmp_path / 'r2'), batch=4, device='cpu', regression_loss='l2', steps=1, progress=False))
    assert not (tmp_path / 'r2').exists()


def test_cli_refuses_to_overwrite_a_run(files, tmp_path):
    r = _cli(*_args(files, tmp_path / 'run'), cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    _assert_user_error(_cli(*_args(files, tmp_path / 'run'), cwd=tmp_path), str(tmp_path / 'run'), '--overwrite')
    r = _cli(*_args(files, tmp_path / 'run', '--overwrite'), cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    r = _cli(*_args(files, tmp_path / 'run', '--resume', '--epochs', '2'), cwd=tmp_path)  # continues (2 more iterations)
    assert r.returncode == 0, r.stderr[-3000:]
    assert sorted(p.name for p in (tmp_path / 'run' / 'checkpoints').iterdir())[-1] == 'step-00000004'


def test_seed_sigma_range_in_training(files, tmp_path):
    "dmd_train follows the seed's DM-loss σ range by default: grid indices 19..978, σ ∈ [0.0031574, 71.2583]; DMD2's with dm_sigma_range='dmd2'."
    cfg = DMDConfig(teacher=str(files / 'teacher.safetensors'), data_path=str(files / 'pairs.hdf5'), run_dir=str(tmp_path / 'r'),
                    batch=4, device='cpu', regression_loss='l2', log_every=10, progress=False)  # neither --steps nor --epochs: one epoch
    learn = train_dmd(cfg)
    ks = karras_train_sigmas(1000).double()
    lo, hi = dm_index_range('dmd', 1000)
    assert (lo, hi) == (19, 978)
    # σ endpoints: float32 grid values within one float32 rounding of the float64 closed form
    assert abs(ks[lo].item() - 0.0031573985760307) <= 2 ** -23 * 0.0032 and abs(ks[hi].item() - 71.258287252730) <= 2 ** -23 * 72
    assert learn.update_counts == {'generator': 2, 'guidance': 2}
    assert (learn.dmd.dm_lo, learn.dmd.dm_hi) == (19, 978)  # the range the generator turn samples from
    assert cfg.steps == 2  # 8 pairs / batch 4, written into the config (and config.json)
    learn2 = train_dmd(DMDConfig(**{**cfg.__dict__, 'run_dir': str(tmp_path / 'r2'), 'dm_sigma_range': 'dmd2', 'steps': 1}))
    assert (learn2.dmd.dm_lo, learn2.dmd.dm_hi) == (20, 980)
    lo2, hi2 = dm_index_range('dmd2', 1000)
    assert (lo2, hi2) == (20, 980) and abs(ks[hi2].item() - 72.053898686328) <= 2 ** -23 * 73


def test_reference_command_line_parses_and_runs(files, tmp_path):
    "The reference's README command (`python -m dmd train --model-path ... --epochs 2 --batch-size 32`, hyphenated) parses to the "
    "intended config (per-process batch under WORLD_SIZE) and runs in process with tiny sizes."
    argv = ['--model-path', str(files / 'teacher.safetensors'), '--data-path', str(files / 'pairs.hdf5'), '--output-dir', str(tmp_path / 'run'),
            '--epochs', '2', '--batch-size', '32']
    c = parse_config(DMDConfig, normalize_argv(argv), DMD_ALIASES, DMD_PRESETS, world_size=2)
    assert (c.teacher, c.data_path, c.run_dir, c.epochs, c.batch, c.local_batch(2), c.steps) == (
        str(files / 'teacher.safetensors'), str(files / 'pairs.hdf5'), str(tmp_path / 'run'), 2, 64, 32, None)
    c = parse_config(DMDConfig, normalize_argv(argv + ['--preset', 'cifar10-authors', '--im-save-steps', '5', '--max-norm', '3',
                                                       '--dmd-loss-lambda', '0.5', '--use_fp16']), DMD_ALIASES, DMD_PRESETS, world_size=1)
    assert (c.lr, c.seed, c.batch, c.sample_every, c.max_grad_norm, c.dmd_loss_lambda, c.precision) == (1.75e-5, 42, 32, 5, 3., 0.5, 'bf16')
    assert parse_config(DMDConfig, [], DMD_ALIASES) == DMDConfig().check()  # no flag = the Python defaults
    dmd_train_main(argv[:-2] + ['--batch-size', '4', '--device', 'cpu', '--regression-loss', 'l2', '--log-iters', '2', '--no_progress'])
    assert list_checkpoints(tmp_path / 'run' / 'checkpoints')[-1].name == 'step-00000004'  # 2 epochs x 8 pairs / 4
    assert (tmp_path / 'run' / 'network-final.safetensors').is_file()
    learn = train_dmd(DMDConfig(run_dir=str(tmp_path / 'run'), steps=6, batch=4, device='cpu', regression_loss='l2', data_path=str(files / 'pairs.hdf5'),
                                teacher=str(files / 'teacher.safetensors'), log_every=2, resume='auto', progress=False))
    assert learn.step == 6 and list_checkpoints(tmp_path / 'run' / 'checkpoints')[-1].name == 'step-00000006'
