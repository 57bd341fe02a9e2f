"""bench/suite.py's peer rows (--peer_dmd2, --peer_fastgen) and bench/peers.py's adapters, on FAKE checkouts.

The fake checkouts hold only the module and class names the adapters import, implemented trivially here: this tests our
plumbing (flags, errors, rows, the ours/theirs ratio in the JSON), not the peers' code.
"""
import importlib, json, subprocess, sys, textwrap
from pathlib import Path
import pytest
from distill_nb.core import UserError

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / 'bench'))
import peers, suite  # noqa: E402

NET = '''
import torch
class EDMPrecond(torch.nn.Module):
    def __init__(self, img_resolution, img_channels, label_dim=0, **kw):
        super().__init__(); self.conv = torch.nn.Conv2d(img_channels, img_channels, 1)
    def forward(self, x, sigma, labels, **kw): return self.conv(x)
'''
FAKE_DMD2 = {
    'third_party/edm/training/networks.py': NET,
    'main/edm/edm_guidance.py': 'get_edm_network = dnnlib = pickle = None  # the adapter hands these over\n',
    'main/edm/edm_unified_model.py': '''
import torch
import main.edm.edm_guidance as g
class EDMUniModel(torch.nn.Module):
    def __init__(self, args, accelerator):
        super().__init__()
        with g.dnnlib.util.open_url(args.model_id) as f: teacher = g.pickle.load(f)['ema']
        self.guidance_model = torch.nn.Module(); self.guidance_model.fake_unet = g.get_edm_network(args)
        self.guidance_model.fake_unet.load_state_dict(teacher.state_dict())
        self.feedforward_model = g.get_edm_network(args)
    def forward(self, noise, sigma, labels, real_train_dict=None, compute_generator_gradient=False, generator_turn=False,
                guidance_turn=False, guidance_data_dict=None):
        if generator_turn:
            x = self.feedforward_model(noise, sigma, labels)
            return ({'loss_dm': x.square().mean()} if compute_generator_gradient else {}), {'guidance_data_dict': {'image': x.detach()}}
        x = guidance_data_dict['image']
        return {'loss_fake_mean': (self.guidance_model.fake_unet(x, sigma, labels) - x).square().mean()}, {}
'''}
FAKE_FASTGEN = {
    'fastgen/methods/distribution_matching/dmd2.py': '',
    'fastgen/configs/methods/config_dmd2.py': '''
from types import SimpleNamespace
class ModelConfig:
    def __init__(self):
        self.net = {'img_resolution': 32, 'img_channels': 3}
        self.net_optimizer, self.fake_score_optimizer = SimpleNamespace(lr=1e-4, fused=False), SimpleNamespace(lr=1e-4, fused=False)
''',
    'fastgen/methods/__init__.py': '''
import torch
from fastgen.networks import EDMPrecond
class DMD2Model(torch.nn.Module):
    def __init__(self, cfg):
        super().__init__(); self.cfg = cfg
        net = {k: v for k, v in cfg.net.items()}
        self.net, self.fake_score = EDMPrecond(**net), EDMPrecond(**net)
    def on_train_begin(self): pass
    def init_optimizers(self):
        self.opt_g = torch.optim.AdamW(self.net.parameters(), lr=self.cfg.net_optimizer.lr)
        self.opt_d = torch.optim.AdamW(self.fake_score.parameters(), lr=self.cfg.fake_score_optimizer.lr)
    def single_train_step(self, data, iteration):
        student = iteration % self.cfg.student_update_freq == 0
        x = self.net(data['real'], None, data['condition'])
        loss = x.square().mean() if student else (self.fake_score(x.detach(), None, None) - x.detach()).square().mean()
        return {'total_loss': loss}, (self.opt_g if student else self.opt_d)
''',
    'fastgen/networks.py': NET,
    'fastgen/trainer.py': '''
class Trainer:
    def train_step(self, model_ddp, model, data, iteration, grad_accum_iter):
        loss_map, opt = model_ddp.single_train_step(data, iteration)
        loss_map['total_loss'].backward()
        self.callbacks.on_optimizer_step_begin(model=model, iteration=iteration)
        opt.step(); opt.zero_grad()
''',
    'fastgen/callbacks/grad_clip.py': '''
class GradClipCallback:
    def __init__(self, grad_norm=1.0, model_key='net'): pass
    def on_optimizer_step_begin(self, model, iteration=0): pass
''',
    'fastgen/utils/logging_utils.py': 'def set_log_level(level): pass\n',
}


def make(root: Path, files: dict) -> Path:
    for rel, text in files.items():
        f = root / rel; f.parent.mkdir(parents=True, exist_ok=True); f.write_text(textwrap.dedent(text))
    return root


@pytest.fixture
def clean_modules():
    "The fake checkouts' top-level packages must not leak between tests (or into other test files)."
    names = ('main', 'third_party', 'fastgen')
    drop = lambda: [sys.modules.pop(m) for m in list(sys.modules) if m.split('.')[0] in names]
    drop(); importlib.invalidate_caches(); yield; drop()


@pytest.mark.parametrize('peer,files', [('dmd2', FAKE_DMD2), ('fastgen', FAKE_FASTGEN)])
def test_peer_rows(tmp_path, clean_modules, peer, files):
    "Each adapter builds and times the fake peer: an fp32 row matched to our fp32 eager, a best row matched to our fast path."
    root = make(tmp_path / peer, files)
    out = tmp_path / 'rows.json'
    rows = peers.main([peer, str(root), '--tiny', '--batch_size', '2', '--ratio', '2', '--device', 'cpu', '--json', str(out)])
    assert json.loads(out.read_text()) == rows
    assert [(r['mode'], r['matches']) for r in rows] == [('fp32', 'fp32-eager'), ('best', 'fast')]
    assert all(r['images_per_s'] > 0 and r['peer'] == peer for r in rows)
    # the cycle: DMD2 runs `ratio` iterations (generator every ratio-th), FastGen ratio + 1 (one student phase + ratio critic phases)
    assert rows[0]['peer_iterations_per_cycle'] == (2 if peer == 'dmd2' else 3)


def test_missing_package(tmp_path, clean_modules):
    "A peer module importing a package we lack: the rows say 'skipped: missing package X (pip install X)', no crash."
    files = dict(FAKE_FASTGEN, **{'fastgen/trainer.py': 'import hydra_not_installed_xyz\n'})
    root = make(tmp_path / 'fg', files)
    res = peers.main(['fastgen', str(root), '--tiny', '--device', 'cpu'])
    assert res == {'peer': 'fastgen', 'skipped': 'missing package hydra_not_installed_xyz (pip install hydra_not_installed_xyz)'}
    e = ModuleNotFoundError("No module named 'attr'", name='attr')
    assert peers.missing_package(e, root, 'fastgen') == 'missing package attr (pip install attrs)'  # pip names that differ


def test_best_mode_failure(tmp_path, clean_modules):
    "A failure in the peer's best mode (e.g. out of memory) is recorded on that row; the fp32 row still counts."
    net = NET.replace('super().__init__();', "super().__init__(); torch.zeros(-1) if kw.get('use_fp16') else None;")  # RuntimeError
    root = make(tmp_path / 'd', dict(FAKE_DMD2, **{'third_party/edm/training/networks.py': net}))
    rows = peers.main(['dmd2', str(root), '--tiny', '--batch_size', '2', '--ratio', '2', '--device', 'cpu'])
    assert rows[0]['mode'] == 'fp32' and rows[0]['images_per_s'] > 0
    assert rows[1]['mode'] == 'best' and rows[1]['error'].startswith('failed: ') and 'images_per_s' not in rows[1]
    assert suite.add_peer_ratios([{'row': suite.OUR_DMD2, 'status': 'ok', 'results': [{'mode': 'fp32-eager', 'images_per_s': 1.}, {'mode': 'fast', 'images_per_s': 2.}]},
                                  {'row': 'p', 'peer': 'dmd2', 'status': 'ok', 'results': rows}]) == [
        {'peer': 'dmd2', 'ours': 'fp32-eager', 'theirs': 'fp32', 'settings': rows[0]['settings'],
         'ratio_ours_over_theirs': 1. / rows[0]['images_per_s']}]  # no ratio for the failed mode


def test_bad_paths(tmp_path, clean_modules):
    "A path that is not a checkout, or one missing its own modules, is a one-line UserError naming the flag."
    with pytest.raises(UserError, match=r'^--peer_dmd2 .*: not a DMD2 checkout \(expected main/edm/edm_unified_model.py\)$'):
        suite.main(['--tiny', '--peer_dmd2', str(tmp_path / 'nope')])
    with pytest.raises(UserError, match=r'^--peer_fastgen .*: not a FastGen checkout \(expected fastgen/methods/distribution_matching/dmd2.py\)$'):
        suite.main(['--tiny', '--peer_fastgen', str(make(tmp_path / 'd', FAKE_DMD2))])
    broken = make(tmp_path / 'b', {k: v for k, v in FAKE_DMD2.items() if 'edm_guidance' not in k})
    with pytest.raises(UserError, match=r'^--peer_dmd2 .*: incomplete DMD2 checkout \(main.edm.edm_guidance cannot be imported\)$'):
        peers.main(['dmd2', str(broken), '--tiny', '--device', 'cpu'])
    # from the command line: one line on stderr, exit status 2, no traceback
    p = subprocess.run([sys.executable, str(ROOT / 'bench' / 'suite.py'), '--tiny', '--peer_dmd2', '/nonexistent/x'],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and p.stderr.strip().splitlines() == [
        'suite.py: error: --peer_dmd2 /nonexistent/x: not a DMD2 checkout (expected main/edm/edm_unified_model.py)']


def test_suite_peer_rows_and_ratio(tmp_path, monkeypatch, clean_modules):
    "The suite puts the peer rows right after our DMD2 row and records ours/theirs per matched mode in its JSON and table."
    d, f = make(tmp_path / 'd', FAKE_DMD2), make(tmp_path / 'f', dict(FAKE_FASTGEN, **{'fastgen/trainer.py': 'import not_here_xyz\n'}))
    real_run_row, ran = suite.run_row, []

    def run_row(row, tiny, device, cap_s, env):  # our row is stubbed (its own tests cover it); the peer rows really run
        ran.append(row[0])
        if row[1] != 'peers.py': return {'row': row[0], 'status': 'ok', 'results': [{'mode': 'fp32-eager', 'images_per_s': 100.},
                                                                                   {'mode': 'fast', 'images_per_s': 300.}]}
        return real_run_row(row, tiny, device, cap_s, env)
    monkeypatch.setattr(suite, 'run_row', run_row)
    assert suite.main(['--tiny', '--only', 'DDPM++', '--peer_dmd2', str(d), '--peer_fastgen', str(f), '--out_dir', str(tmp_path / 'o')]) == 0
    assert ran[0] == suite.OUR_DMD2 and ran[1:] == [suite.peer_row('dmd2', d)[0], suite.peer_row('fastgen', f)[0]]
    js = json.loads(next((tmp_path / 'o').glob('*.json')).read_text())
    rows = {r['row']: r for r in js['rows']}
    dm = rows[suite.peer_row('dmd2', d)[0]]
    assert dm['status'] == 'ok' and [it['matches'] for it in dm['results']] == ['fp32-eager', 'fast']
    for it in dm['results']:
        ours = 100. if it['matches'] == 'fp32-eager' else 300.
        assert it['ratio_ours_over_theirs'] == pytest.approx(ours / it['images_per_s'], rel=1e-12)  # the same two floats: exact up to rounding
    assert [(q['peer'], q['ours'], q['theirs']) for q in js['peer_ratios']] == [('dmd2', 'fp32-eager', 'fp32'), ('dmd2', 'fast', 'best')]
    assert rows[suite.peer_row('fastgen', f)[0]]['status'] == 'skipped: missing package not_here_xyz (pip install not_here_xyz)'
    md = next((tmp_path / 'o').glob('*.md')).read_text()
    assert 'ours/tianweiy/DMD2:' in md and 'ratio_ours_over_theirs' in md


def test_no_peer_flags(monkeypatch, tmp_path):
    "Without the flags the suite runs our rows only, as before."
    ran = []
    monkeypatch.setattr(suite, 'run_row', lambda row, *a: ran.append(row[1]) or {'row': row[0], 'status': 'ok', 'results': []})
    assert suite.main(['--tiny', '--out_dir', str(tmp_path)]) == 0
    assert 'peers.py' not in ran and ran[0] == 'bench_dmd2.py'
