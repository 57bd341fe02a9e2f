"README.md is rendered from nbs/index.ipynb (Quarto is unavailable); these tests keep the two and CI in sync."
import re, subprocess, sys
from pathlib import Path

root = Path(__file__).resolve().parent.parent

def _block(text, marker):
    m = re.search(rf'<!-- ci:{marker} -->\s*```bash\n(.*?)\n```\s*<!-- /ci:{marker} -->', text, re.S)
    assert m, f'README.md: no {marker} block'
    return m.group(1).strip()

def test_readme_rendered_from_index():
    r = subprocess.run([sys.executable, str(root/'.ci'/'readme.py'), '--check'], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr

def test_quick_start_is_two_commands():
    text = (root/'README.md').read_text()
    main, test = _block(text, 'main-command'), _block(text, 'test-command')
    for cmd in (main, test):
        assert len(cmd.splitlines()) == 1 and cmd.startswith('pip install'), cmd
    assert 'nbdev_test' in test and 'pytest' in test

def test_ci_runs_the_readme_test_command():
    ci = (root/'.ci'/'run').read_text()
    assert 'ci:test-command' in ci and 'eval "$install"' in ci and 'eval "$tests"' in ci

def test_main_command_entry_point_is_declared():
    main = _block((root/'README.md').read_text(), 'main-command')
    script = main.split('&&')[1].split()[0]
    assert re.search(rf'^\s*{script}=', (root/'settings.ini').read_text(), re.M), f'{script} not in console_scripts'

def test_flag_tables_are_generated():
    "The README's flag tables are exactly what the trainers' run configs say (regenerate with distill_nb.recipes.flags_markdown())."
    from distill_nb.recipes import flags_markdown
    assert flags_markdown() in (root/'README.md').read_text(), 'README flag tables are stale: paste flags_markdown() into nbs/index.ipynb (## Flags)'
