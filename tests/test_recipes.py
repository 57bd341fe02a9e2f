"Reference recipes: every recipe has the required fields, its flags exist in its trainer's CLI, its hash is locked and stable, and `distill_recipe run --dry_run` prints the command."
import inspect, json, os, shlex, shutil, subprocess, sys
from pathlib import Path
import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path: sys.path.insert(0, str(ROOT))
from distill_nb.recipes import (REQUIRED_FIELDS, recipe_names, load_recipe, recipe_hash, recipe_command, trainer_function,
                                trainer_flags, trainer_parser, apply_overrides, recipe_dir, eval_commands, check_inputs, run_recipe,
                                distill_recipe)

NAMES = recipe_names()
EXPECTED = {'dmd2-cifar10-cond', 'dmd2-imagenet64-gan', 'dmd2-imagenet64-dm', 'dmd2-imagenet64-finetune', 'gdd-i-cifar10-uncond',
            'dkdm-cifar10', 'lcm-microdit'}


def env():
    return dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get('PYTHONPATH', ''), OMP_NUM_THREADS='1')


def cli(*args, check=True):
    r = subprocess.run([sys.executable, '-m', 'distill_nb.recipes', *map(str, args)], capture_output=True, text=True, env=env(),
                       cwd=ROOT, timeout=300)
    if check: assert r.returncode == 0, r.stderr[-3000:]
    return r


def test_shipped_recipes():
    assert EXPECTED <= set(NAMES)


@pytest.mark.parametrize('name', NAMES)
def test_required_fields(name):
    raw = json.loads((recipe_dir() / f'{name}.json').read_text())
    for sec, keys in REQUIRED_FIELDS.items():
        d = raw[sec] if sec else raw
        for k in keys: assert k in d, f'{name}: missing {sec}.{k}'
    f = raw['fid']
    assert raw['training']['images_seen'] > 0 and raw['batch']['global'] > 0
    assert f['uint8_rule'].startswith('x*127.5+128')
    if raw['sampling']['cli'] == 'distill_generate':  # the EDM class-conditional protocol
        assert (f['num_samples'], f['seeds']) == (50000, '0-49999')
        assert f['reference_stats'].endswith('.npz') and 'inception-2015-12-05' in f['detector']
    assert raw['expected']['fid_paper'] > 0


@pytest.mark.parametrize('name', NAMES)
def test_flags_exist_in_trainer(name):
    r = load_recipe(name)
    f = trainer_function(r)
    acts = trainer_flags(r)  # the trainer's own parser: config fields and their aliases (or the signature of an older CLI)
    for k in list(r['flags']) + [r['batch']['flag']]:
        assert k in acts, f'{name}: --{k} is not a flag of {r["trainer"]["function"]}'
    help_text = trainer_parser(r).format_help()
    for k in r['flags']: assert k in help_text
    for n in (1, 8):  # the full command parses with the trainer's own parser
        if r['batch']['per_process'] and r['batch']['global'] % n: continue
        argv = recipe_command(r, n)
        assert argv[:2] == ['torchrun', f'--nproc_per_node={n}']


@pytest.mark.parametrize('name', NAMES)
def test_hash_locked(name):
    lock = json.loads((recipe_dir() / 'recipes.lock.json').read_text())
    assert lock[name] == recipe_hash(load_recipe(name))


def test_batch_split_and_overrides():
    r = load_recipe('dmd2-imagenet64-gan')
    c8, c7 = recipe_command(r, 8), recipe_command(r, 7)
    assert c8[c8.index('--batch_size') + 1] == '35' and c7[c7.index('--batch_size') + 1] == '40'
    with pytest.raises(ValueError, match='not divisible'): recipe_command(r, 3)
    with pytest.raises(ValueError, match='--bogus'): recipe_command(apply_overrides(r, ['bogus=1']))
    with pytest.raises(ValueError, match='global_batch'): apply_overrides(r, ['batch_size=4'])
    g = load_recipe('gdd-i-cifar10-uncond')  # a global-batch trainer keeps the global value
    c = recipe_command(g, 8)
    assert c[c.index('--batch') + 1] == '256' and c[2:4] == ['-m', 'distill_nb.gdd']
    assert recipe_command(load_recipe('dkdm-cifar10'), 8)[2:4] == ['--no-python', 'dkdm_train']


def test_dry_run_cli():
    out = cli('run', 'dmd2-imagenet64-gan', '--nproc', 8, '--dry_run', '--override', 'train_iters=7', 'output_path=/tmp/x').stdout.strip()
    argv = shlex.split(out.splitlines()[-1])
    assert argv[:4] == ['torchrun', '--nproc_per_node=8', '-m', 'distill_nb.dmd2']
    assert argv[argv.index('--train_iters') + 1] == '7' and '--gan_classifier' in argv
    assert not Path('/tmp/x/recipe.json').exists()  # dry run writes nothing


def test_show_cli_hash_stable_across_processes():
    "`show` in a fresh interpreter with another PYTHONHASHSEED prints the same config hash."
    r = subprocess.run([sys.executable, '-m', 'distill_nb.recipes', 'show', 'gdd-i-cifar10-uncond'], capture_output=True, text=True,
                       env=dict(env(), PYTHONHASHSEED='12345'), cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert recipe_hash(load_recipe('gdd-i-cifar10-uncond')) in r.stdout and '0-49999' in r.stdout and 'torchrun' in r.stdout


def test_list_and_bad_name(capsys):
    distill_recipe('list')
    out = capsys.readouterr().out
    for n in NAMES: assert n in out
    with pytest.raises(ValueError, match='unknown recipe'): distill_recipe('show', 'no-such-recipe')
    with pytest.raises(ValueError, match='give a recipe name'): distill_recipe('run')


def test_run_checks_inputs(tmp_path):
    r = apply_overrides(load_recipe('dmd2-cifar10-cond'), [f'real_image_path={tmp_path}/missing.lmdb'])
    with pytest.raises(FileNotFoundError, match='--real_image_path'): check_inputs(r)
    with pytest.raises(FileNotFoundError, match='--real_image_path'):
        run_recipe('dmd2-cifar10-cond', 8, [f'real_image_path={tmp_path}/missing.lmdb', f'output_path={tmp_path}/run'])
    assert not (tmp_path / 'run').exists()


def test_eval_commands():
    get, gen, fid = eval_commands(load_recipe('dmd2-cifar10-cond'), 8, 'G.safetensors', 'out')
    assert gen[:4] == ['torchrun', '--nproc_per_node=8', '-m', 'distill_nb.generate'] and gen[gen.index('--seeds') + 1] == '0-49999'
    assert get[-1].endswith('/cifar10-32x32.npz') and fid[fid.index('--ref') + 1] == get[get.index('-o') + 1]
    from fastcore.script import anno_parser
    from distill_nb.fid import distill_fid
    from distill_nb.weights import WEIGHTS
    assert fid[fid.index('--detector_url') + 1] in {e.url for e in WEIGHTS.values()}
    anno_parser(distill_fid).parse_args(fid[3:])  # the FID command parses with distill_fid's own parser


def test_manifest_includes_recipes():
    text = (ROOT / 'MANIFEST.in').read_text()
    if 'distill_nb/recipes' not in text: pytest.skip('MANIFEST.in needs: recursive-include distill_nb/recipes *.json')
    assert 'recursive-include distill_nb/recipes' in text


@pytest.mark.skipif(shutil.which('torchrun') is None, reason='torchrun is not on PATH')
def test_run_end_to_end(tmp_path, monkeypatch):
    "A recipe file outside the package runs through torchrun (1 process, tiny EDM on toy data) and records recipe.json."
    r = json.loads((recipe_dir() / 'gdd-i-cifar10-uncond.json').read_text())
    r.update(name='tiny-edm', trainer={'module': 'distill_nb.edm_train', 'function': 'edm_train', 'console_script': 'edm_train'},
             inputs={}, batch={'global': 8, 'flag': 'batch', 'per_process': False, 'reference_processes': 1},
             flags={'run_dir': str(tmp_path / 'run'), 'data': 'toy', 'resolution': 8, 'toy_n': 32, 'arch': 'tiny', 'steps': 2,
                    'ckpt_every': 1000, 'sample_every': 0, 'no_progress': True, 'device': 'cpu'})
    p = tmp_path / 'tiny-edm.json'; p.write_text(json.dumps(r))
    for k, v in env().items(): monkeypatch.setenv(k, v)  # PYTHONPATH (no install needed), one thread
    cmd = run_recipe(str(p), nproc=1)
    assert cmd[:4] == ['torchrun', '--nproc_per_node=1', '-m', 'distill_nb.edm_train']
    rec = json.loads((tmp_path / 'run' / 'recipe.json').read_text())
    assert rec['hash'] == recipe_hash(r) and rec['is_locked_recipe'] and rec['command'] == cmd
    assert (tmp_path / 'run' / 'network-final.safetensors').exists()


@pytest.mark.parametrize('name', NAMES)
def test_recipe_config_resolves(name):
    "distill_recipe reads the trainer's own run config: the command line resolves to one config whose global batch is the recipe's."
    from distill_nb.recipes import recipe_config
    r = load_recipe(name)
    for n in (1, 8):
        if r['batch']['per_process'] and r['batch']['global'] % n: continue
        cfg = recipe_config(r, n)
        if cfg is None: pytest.skip(f'{r["trainer"]["function"]} has no run config')
        assert cfg.batch == r['batch']['global'], (name, n, cfg.batch)
