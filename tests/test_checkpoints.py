"Safe EDM-pickle loading in fresh processes: tampered module source never runs, hostile globals are refused, damaged files fail cleanly."
import os, pickle, subprocess, sys, textwrap
from pathlib import Path
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path: sys.path.insert(0, str(ROOT))  # works without `pip install -e .`
from distill_nb.checkpoints import CheckpointError, write_edm_pickle, load_network, convert_edm_pickle, read_network_meta, _ensure_registry
from distill_nb.core import REGISTRY, sha256_file


def py(code: str, cwd=None):
    "Run python code in a fresh process with the repo on the path (and no EDM anywhere)."
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get('PYTHONPATH', ''), OMP_NUM_THREADS='1')
    return subprocess.run([sys.executable, '-c', textwrap.dedent(code)], capture_output=True, text=True, env=env, timeout=120, cwd=cwd)

def tiny(seed=0, model_type='SongUNet', cls='EDMPrecond'):
    _ensure_registry()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = REGISTRY[cls](img_resolution=8, img_channels=3, label_dim=4, model_type=model_type, model_channels=16,
                            channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4], dropout=0.0)
        with torch.no_grad():
            for p in net.parameters(): p.add_(torch.randn_like(p) * 0.05)
    return net.eval()

def evil_src(marker: Path) -> str:
    return (f"import os\nopen({str(marker)!r}, 'w').write('module_src ran')\n"
            f"raise RuntimeError('module_src was executed')\nclass EDMPrecond: pass\n")

CASES = [('SongUNet', 'EDMPrecond'), ('DhariwalUNet', 'EDMPrecond'), ('SongUNet', 'VPPrecond'), ('DhariwalUNet', 'iDDPMPrecond')]

def test_tampered_source_never_runs(tmp_path):
    "Pickles whose embedded source writes a marker and raises load bit-exactly in a fresh process; the source never runs."
    marker = tmp_path / 'MARKER'
    x, s, lab = torch.randn(2, 3, 8, 8), torch.tensor([0.4, 7.]), torch.eye(4)[[1, 2]]
    for i, (model_type, cls) in enumerate(CASES):
        net = tiny(model_type=model_type, cls=cls)
        write_edm_pickle(tmp_path / f'edm{i}.pkl', {'ema': net, 'loss_fn': None, 'augment_pipe': None, 'dataset_kwargs': {}}, module_src=evil_src(marker))
        torch.save({'x': x, 's': s, 'lab': lab, 'out': net(x, s, lab)}, tmp_path / f'ref{i}.pt')
    r = py(f'''
        import sys, torch
        from distill_nb.checkpoints import load_network
        for i, cls in enumerate({[c for _, c in CASES]!r}):
            net = load_network({str(tmp_path)!r} + f'/edm{{i}}.pkl')
            ref = torch.load({str(tmp_path)!r} + f'/ref{{i}}.pt', weights_only=True)
            assert type(net).__name__ == cls
            assert (net(ref['x'], ref['s'], ref['lab']) - ref['out']).abs().max().item() == 0
        assert not [m for m in sys.modules if m.startswith(('torch_utils', 'dnnlib', '_imported_module'))]
        print('OK')
    ''')
    assert r.returncode == 0 and 'OK' in r.stdout, r.stderr
    assert not marker.exists()

def test_hostile_globals_refused(tmp_path):
    marker = tmp_path / 'PWNED'
    class Payload:
        def __init__(self, fn, arg): self.fn, self.arg = fn, arg
        def __reduce__(self): return (self.fn, (self.arg,))
    payloads = {'system': Payload(os.system, f'touch {marker}'), 'eval': Payload(eval, f'open({str(marker)!r}, "w")'),
                'exec': Payload(exec, f'open({str(marker)!r}, "w")'), 'torch_load': Payload(torch.load, str(marker))}
    for name, p in payloads.items():
        f = tmp_path / f'{name}.pkl'
        f.write_bytes(pickle.dumps({'ema': p}))
        with pytest.raises(CheckpointError, match='refusing to load global'): load_network(f)
    r = py(f'from distill_nb.checkpoints import load_network\nload_network({str(tmp_path / "system.pkl")!r})')
    assert r.returncode != 0 and 'refusing to load global' in r.stderr and 'system.pkl' in r.stderr
    assert not marker.exists()
    # a persistent object of a class that is not EDM's is refused too, whatever its source says
    class Evil(torch.nn.Module): pass
    f = write_edm_pickle(tmp_path / 'evil_class.pkl', {'ema': Evil()}, module_src=evil_src(marker), classes=('Evil',))
    with pytest.raises(CheckpointError, match="unknown persistent class 'Evil'"): load_network(f)
    assert not marker.exists()

def test_damaged_files_fail_cleanly(tmp_path):
    pkl = write_edm_pickle(tmp_path / 'edm.pkl', {'ema': tiny()})
    data = pkl.read_bytes()
    for i, cut in enumerate([1, 2, 10, 100, len(data) // 3, len(data) // 2, len(data) - 10, len(data) - 1]):
        f = tmp_path / f'cut{i}.pkl'; f.write_bytes(data[:cut])
        with pytest.raises((CheckpointError, FileNotFoundError), match=f'cut{i}.pkl'): load_network(f)
    junk = tmp_path / 'junk.pkl'; junk.write_bytes(os.urandom(4096))
    with pytest.raises(CheckpointError, match='junk.pkl'): load_network(junk)
    empty = tmp_path / 'empty.pkl'; empty.write_bytes(b'')
    with pytest.raises(CheckpointError, match='empty.pkl'): load_network(empty)
    lst = tmp_path / 'list.pkl'; lst.write_bytes(pickle.dumps([1, 2, 3]))
    with pytest.raises(CheckpointError, match="expected a dict with an 'ema'"): load_network(lst)
    with pytest.raises(CheckpointError, match='does not match'): load_network(pkl, sha256='ab' * 32)
    assert type(load_network(pkl, sha256=sha256_file(pkl))).__name__ == 'EDMPrecond'

@pytest.mark.parametrize('protocol', [2, 3, 5])
def test_other_pickle_protocols(tmp_path, protocol):
    "Streams written with older/newer protocols (python-2 names, `_codecs.encode` bytes) load the same."
    net = tiny(2)
    f = write_edm_pickle(tmp_path / 'p.pkl', {'ema': net}, protocol=protocol)
    x = torch.randn(1, 3, 8, 8)
    assert torch.equal(load_network(f)(x, torch.tensor([2.]), None), net(x, torch.tensor([2.]), None))

def test_wrong_architecture_is_a_clear_error(tmp_path):
    "Recorded arguments that do not fit the tensors (e.g. a patched pickle) fail before any allocation, naming the file and both values."
    net = tiny()
    net.init_kwargs = dict(net.init_kwargs, model_channels=32)
    f = write_edm_pickle(tmp_path / 'patched.pkl', {'ema': net})
    with pytest.raises(CheckpointError, match='patched.pkl: .*model_channels=32 in its recorded EDMPrecond arguments, but the weights say model_channels=16'):
        load_network(f)
    net = tiny(); net.init_kwargs = dict(net.init_kwargs, attn_resolutions=[])  # a size no single tensor names: the meta-device check
    f = write_edm_pickle(tmp_path / 'patched2.pkl', {'ema': net})
    with pytest.raises(CheckpointError, match='patched2.pkl: .* does not match the file: it describes .* values in .* tensors, the file holds'): load_network(f)

def test_convert_and_reload_in_fresh_process(tmp_path):
    net = tiny(1)
    pkl = write_edm_pickle(tmp_path / 'edm-tiny.pkl', {'ema': net})
    st = convert_edm_pickle(pkl, tmp_path / 'edm-tiny.safetensors')
    assert read_network_meta(st)['sampler'] == {'kind': 'edm'}
    assert st.read_bytes()[8:9] == b'{'   # a safetensors file, no pickle inside
    x = torch.randn(1, 3, 8, 8)
    torch.save({'x': x, 'out': net(x, torch.tensor([1.]), torch.eye(4)[[0]])}, tmp_path / 'ref.pt')
    r = py(f'''
        import torch
        from distill_nb.checkpoints import load_network
        net = load_network({str(st)!r})
        ref = torch.load({str(tmp_path / 'ref.pt')!r}, weights_only=True)
        assert not net.training and not any(p.requires_grad for p in net.parameters())
        assert torch.equal(net(ref['x'], torch.tensor([1.]), torch.eye(4)[[0]]), ref['out'])
        print('OK')
    ''')
    assert r.returncode == 0 and 'OK' in r.stdout, r.stderr

def test_offline_download_fails_fast(tmp_path):
    import socket, time
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0)); port = s.getsockname()[1]   # closed port: connection refused
    t0 = time.time()
    with pytest.raises(CheckpointError, match='could not download'):  # a UserError: commands print one line
        load_network(f'http://127.0.0.1:{port}/edm-cifar10-32x32-cond-vp.pkl', cache_dir=tmp_path)
    assert time.time() - t0 < 10
    assert not list(tmp_path.iterdir())   # nothing half-written in the cache
