"Command-line behaviour of `python -m distill_nb.demo_text` (the toy text teacher's regeneration command)."
import subprocess, sys

def _run(*args):
    return subprocess.run([sys.executable, '-m', 'distill_nb.demo_text', *args], capture_output=True, text=True, timeout=120)

def test_bad_steps_is_a_one_line_user_error(tmp_path):
    r = _run('--dest', str(tmp_path / 't.safetensors'), '--steps', '0', '--no_progress')
    assert r.returncode == 2, r.stderr
    assert '--steps' in r.stderr and 'Traceback' not in r.stderr
    assert not (tmp_path / 't.safetensors').exists()

def test_shipped_teacher_loads_and_is_small():
    from distill_nb.demo_text import demo_text_teacher_path, load_demo_text_teacher, TextTeacher
    assert demo_text_teacher_path().stat().st_size <= 1_000_000
    assert isinstance(load_demo_text_teacher(), TextTeacher)
