"Tests of `distill_dataset` (run as a subprocess) and of multi-worker loading of the datasets in `distill_nb.data`."
import json, os, subprocess, sys
from pathlib import Path
import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path: sys.path.insert(0, str(ROOT))  # works without `pip install -e .`
from distill_nb.data.lmdb_dataset import LMDBDataset, write_lmdb, one_hot
from distill_nb.data.images import ImageFolderDataset, write_edm_dataset, encode_png, CIFAR10_CLASSES
from distill_nb.data.pairs import PairsDataset, write_pairs
from distill_nb.data.cli import distill_dataset

def cli(*args, check=True):
    "Run `python -m distill_nb.data.cli ARGS` with the repo on the path."
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get('PYTHONPATH', ''))
    r = subprocess.run([sys.executable, '-m', 'distill_nb.data.cli', *map(str, args)], capture_output=True, text=True, env=env, timeout=120)
    if check: assert r.returncode == 0, r.stderr
    return r

def run(mode, **kw):
    "Call the CLI function in-process (`core.cli` passes keyword calls straight through, errors as exceptions)."
    return distill_dataset(mode, **{k: str(v) if isinstance(v, Path) else v for k, v in kw.items()})

def files(d: Path) -> dict:
    return {p.relative_to(d).as_posix(): p.read_bytes() for p in sorted(d.rglob('*')) if p.is_file()}

@pytest.fixture
def data(tmp_path):
    g = np.random.default_rng(0)
    imgs = g.integers(0, 256, (9, 3, 8, 8), dtype=np.uint8)
    labs = [int(l) for l in g.integers(0, 10, 9)]
    write_edm_dataset(tmp_path/'edm', zip(imgs, labs))
    write_edm_dataset(tmp_path/'edm.zip', zip(imgs, labs))
    return tmp_path, imgs, labs

def test_help():
    r = cli('--help')
    assert 'to-lmdb' in r.stdout and '--resolution' in r.stdout

def test_folder_lmdb_folder_identical_bytes(data):
    tmp, imgs, labs = data
    cli('to-lmdb', '--source', tmp/'edm', '--dest', tmp/'db')
    run('to-edm', source=tmp/'db', dest=tmp/'back')
    assert files(tmp/'back') == files(tmp/'edm')
    ds = LMDBDataset(tmp/'db')
    assert [ds.raw(i)[1] for i in range(len(ds))] == labs
    assert all((ds.raw(i)[0] == imgs[i]).all() for i in range(len(ds)))

def test_zip_same_as_folder(data):
    tmp, imgs, labs = data
    run('to-lmdb', source=tmp/'edm.zip', dest=tmp/'dbz')
    run('to-lmdb', source=tmp/'edm', dest=tmp/'dbf')
    a, b, z = LMDBDataset(tmp/'dbz'), LMDBDataset(tmp/'dbf'), ImageFolderDataset(tmp/'edm.zip')
    for i in range(len(imgs)):
        assert (a.raw(i)[0] == b.raw(i)[0]).all() and a.raw(i)[1] == b.raw(i)[1]
        assert torch.equal(z[i][0], a[i][0]) and z[i][1] == a[i][1]
    run('to-edm', source=tmp/'dbz', dest=tmp/'back.zip')
    assert (tmp/'back.zip').read_bytes() == (tmp/'edm.zip').read_bytes()

def test_csv_labels_canonical(tmp_path):
    g = np.random.default_rng(1)
    order = ['frog', 'truck', 'truck', 'deer', 'automobile', 'airplane', 'ship']  # first-appearance order != canonical
    (tmp_path/'train').mkdir()
    for i in range(len(order)): (tmp_path/'train'/f'{i+1}.png').write_bytes(encode_png(g.integers(0, 256, (3, 8, 8), dtype=np.uint8)))
    (tmp_path/'trainLabels.csv').write_text('id,label\n' + ''.join(f'{i+1},{c}\n' for i, c in enumerate(order)))
    run('to-lmdb', source=tmp_path/'train', csv=tmp_path/'trainLabels.csv', dest=tmp_path/'db')
    ds = LMDBDataset(tmp_path/'db')
    assert list(ds.labels()) == [CIFAR10_CLASSES.index(c) for c in order] == [6, 9, 9, 4, 1, 0, 8]
    assert ds.label_dim == 10
    info = cli('info', '--source', tmp_path/'db').stdout
    assert '7 images' in info and 'truck' in info
    run('to-edm', source=tmp_path/'db', dest=tmp_path/'edm')
    meta = json.loads((tmp_path/'edm'/'dataset.json').read_text())
    assert [l for _, l in meta['labels']] == [6, 9, 9, 4, 1, 0, 8]

def test_refuses_overwrite(data):
    tmp = data[0]
    (tmp/'db').mkdir(); (tmp/'db'/'keep.txt').write_text('mine')
    for mode in ('to-lmdb', 'to-edm'):
        with pytest.raises(ValueError, match='refusing to overwrite'): run(mode, source=tmp/'edm', dest=tmp/'db')
    assert files(tmp/'db') == {'keep.txt': b'mine'}

def test_bad_image_atomic(data):
    tmp = data[0]
    (tmp/'edm'/'00000'/'img00000004.png').write_bytes(b'\x89PNG broken')
    before = set(os.listdir(tmp))
    r = cli('to-lmdb', '--source', tmp/'edm', '--dest', tmp/'db', check=False)  # as a subprocess: exit status, message
    assert r.returncode == 2 and 'img00000004.png' in r.stderr and 'nothing was written' in r.stderr and 'Traceback' not in r.stderr
    for mode, dest in [('to-lmdb', 'db'), ('to-edm', 'out'), ('to-edm', 'out.zip')]:
        with pytest.raises(ValueError, match='img00000004.png'): run(mode, source=tmp/'edm', dest=tmp/dest)
        assert set(os.listdir(tmp)) == before  # no destination, no temporary leftovers
    run('to-lmdb', source=tmp/'edm', dest=tmp/'db', skip_bad=True)
    assert len(LMDBDataset(tmp/'db')) == 8

def test_missing_source(tmp_path):
    with pytest.raises(ValueError, match='nope: no such file or folder'): run('info', source=tmp_path/'nope')
    with pytest.raises(ValueError, match='--dest is required'): run('to-lmdb', source=tmp_path)

def test_resolution(data):
    tmp = data[0]
    run('to-lmdb', source=tmp/'edm', dest=tmp/'db4', resolution=4, max_images=5)
    ds = LMDBDataset(tmp/'db4')
    assert len(ds) == 5 and ds.image_shape == (3, 4, 4)

@pytest.mark.parametrize('ctx', ['fork', 'spawn'])
def test_lmdb_dataloader_workers(data, ctx):
    tmp, imgs, labs = data
    write_lmdb(tmp/'db', zip(imgs, labs))
    ds = LMDBDataset(tmp/'db')
    _ = ds[0]  # the parent holds an open environment before the workers start
    dl = torch.utils.data.DataLoader(ds, batch_size=2, num_workers=2, multiprocessing_context=ctx, persistent_workers=False)
    xs, ys = zip(*dl)
    x, y = torch.cat(xs), torch.cat(ys)
    assert torch.equal(x, torch.from_numpy(imgs).float() / 127.5 - 1)
    assert y.tolist() == labs and one_hot(y, 10).shape == (9, 10)
    assert ds[1][1] == labs[1]  # the parent's handle still works

def test_pairs_dataloader_workers(tmp_path):
    class Net: img_channels, img_resolution, label_dim = 1, 4, 2
    write_pairs(tmp_path/'p.hdf5', Net(), list(range(6)), [0, 1] * 3, lambda n, z, c: z * 0.5, batch_size=4)
    ds = PairsDataset(tmp_path/'p.hdf5')
    _ = ds[0]
    z, x, c = (torch.cat(t) for t in zip(*torch.utils.data.DataLoader(ds, batch_size=4, num_workers=2)))
    assert torch.allclose(x, z * 0.5) and c.tolist() == [0, 1] * 3  # relative (rtol 1e-5): the float32 product, stored
    assert torch.equal(z[3], torch.randn(1, 4, 4, generator=torch.Generator().manual_seed(3)))
