"The demo DDPM teacher's command line and its error cases (nbs/88_demo_ddpm_teacher)."
import subprocess, sys
import pytest
from distill_nb.core import UserError
from distill_nb.checkpoints import read_network_meta
from distill_nb.demo_ddpm import load_demo_ddpm_teacher, make_demo_ddpm_teacher, demo_ddpm_teacher_path
from distill_nb.demo_teacher import demo_teacher_path

def _run(*args):
    return subprocess.run([sys.executable, '-m', 'distill_nb.demo_ddpm', *args], capture_output=True, text=True)

def test_cli_trains_and_writes(tmp_path):
    out = _run('--dest', str(tmp_path / 't.safetensors'), '--steps', '2', '--no_progress')
    assert out.returncode == 0, out.stderr
    m = read_network_meta(tmp_path / 't.safetensors')
    assert m['demo_ddpm_teacher']['recipe']['steps'] == 2 and m['sampler']['kind'] == 'ddpm'
    assert m['demo_ddpm_teacher']['command'] is None  # not the shipped recipe: no regeneration command is claimed

def test_cli_rejects_bad_steps(tmp_path):
    out = _run('--dest', str(tmp_path / 't.safetensors'), '--steps', '-3')
    assert out.returncode == 2 and '--steps' in out.stderr and 'Traceback' not in out.stderr

def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match='python -m distill_nb.demo_ddpm'): load_demo_ddpm_teacher(path=tmp_path / 'missing.safetensors')
    with pytest.raises(UserError, match='expected the ADMUNet'): load_demo_ddpm_teacher(path=demo_teacher_path())  # the EDM teacher
    with pytest.raises(UserError, match='unknown recipe keys'): make_demo_ddpm_teacher(tmp_path / 'x.safetensors', progress=False, stpes=2)

def test_shipped_file():
    p = demo_ddpm_teacher_path()
    assert p.is_file() and p.stat().st_size <= 2 ** 20
    net = load_demo_ddpm_teacher()
    assert (net.image_size, net.out_channels, net.num_classes) == (16, 6, 4)
