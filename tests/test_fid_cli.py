"Tests of the `distill_fid` CLI (distill_nb.fid) and the metrics path it drives, with detectors the tests create."
import io, json, os, subprocess, sys, zipfile
from pathlib import Path
import numpy as np
import pytest
import torch
from PIL import Image

from distill_nb.metrics import (save_tiny_detector, load_ref_stats, load_detector, compute_metrics, compute_ref_stats,
                                feature_stats, frechet_distance)
from distill_nb.fid import fid_calc, fid_ref, distill_fid


def _pngs(folder: Path, n: int, seed: int, size: int = 8, offset: int = 0):
    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    for i in range(n):
        a = (torch.randint(0, 200, (size, size, 3), generator=g) + offset).clamp(0, 255).to(torch.uint8).numpy()
        Image.fromarray(a).save(folder / f'{i:05d}.png')
    return folder


def _run(*args, env=None):
    e = {**os.environ, **(env or {})}
    p = subprocess.run([sys.executable, '-m', 'distill_nb.fid', *map(str, args)], capture_output=True, text=True, env=e, timeout=120)
    return p


@pytest.fixture()
def setup(tmp_path):
    det = save_tiny_detector(tmp_path / 'tiny.safetensors', dim=8, num_classes=4)
    data = _pngs(tmp_path / 'data', 12, seed=0)
    gen = _pngs(tmp_path / 'gen', 10, seed=1, offset=40)
    return tmp_path, det, data, gen


def test_cli_ref_then_calc(setup):
    tmp, det, data, gen = setup
    p = _run('ref', '--data', data, '--dest', tmp / 'ref.npz', '--detector', det, '--batch', 5, '--keep_features')
    assert p.returncode == 0, p.stderr
    info = json.loads(p.stdout)
    assert info['num_images'] == 12 and info['detector'] == 'distill-tiny'
    with np.load(tmp / 'ref.npz') as z:  # what EDM's fid.py reads: float64 mu, sigma
        assert z['mu'].dtype == np.float64 and z['mu'].shape == (8,) and z['sigma'].shape == (8, 8)
    p = _run('calc', '--images', gen, '--ref', tmp / 'ref.npz', '--num', 10, '--detector_url', det,
             '--metrics', 'fid,is,kid,pr', '--out', tmp / 'res.json')
    assert p.returncode == 0, p.stderr
    res = json.loads(p.stdout)
    assert res == json.loads((tmp / 'res.json').read_text())
    assert {'fid10', 'is10', 'kid10', 'precision10', 'recall10'} <= set(res)
    proto = res['protocol']
    assert proto['num_images'] == 10 and proto['ref_num_images'] == 12
    assert proto['ref_sha256'] == load_ref_stats(tmp / 'ref.npz')['sha256']
    assert proto['detector_sha256'] == load_detector(det).sha256
    assert 'to_uint8' in proto['uint8_rule']
    # FID computed by hand from the same features (independent route through feature_stats)
    d = load_detector(det)
    fg = torch.cat([d(torch.from_numpy(np.stack([np.asarray(Image.open(gen / f'{i:05d}.png')) for i in range(10)])).permute(0, 3, 1, 2))['2048']])
    ref = load_ref_stats(tmp / 'ref.npz')
    # the same float64 arithmetic on the same features: relative 1e-6 of the FID (features of another batching differ in float32)
    assert abs(frechet_distance(*feature_stats(fg), ref['mu'], ref['sigma']) - res['fid10']) < 1e-6 * max(1., res['fid10'])
    assert res['fid10'] > 0


def test_cli_detector_from_env_var_and_zip(setup, monkeypatch, capsys):
    "The default detector is found through the registry's env var; EDM-style zips work as data."
    tmp, det, data, gen = setup
    with zipfile.ZipFile(tmp / 'data.zip', 'w') as z:
        for f in sorted(data.iterdir()): z.write(f, f.name)
    monkeypatch.setenv('DISTILL_NB_WEIGHTS_INCEPTION_V3_COMPAT', str(det))
    assert distill_fid('ref', data=str(tmp / 'data.zip'), dest=str(tmp / 'ref.npz')) is None
    capsys.readouterr()
    assert distill_fid('calc', images=str(data), ref=str(tmp / 'ref.npz'), num=12) is None
    res = json.loads(capsys.readouterr().out)
    # same images as the reference: 0 up to sqrtm round-off, relative to the trace of the covariance
    assert abs(res['fid12']) < 1e-6 * max(1., np.trace(load_ref_stats(tmp / 'ref.npz')['sigma']))
    assert res['protocol']['detector_file'] == str(det)


def test_cli_offline_and_refusals(setup):
    tmp, det, data, gen = setup
    env = {'DISTILL_NB_WEIGHTS_DIR': str(tmp / 'empty'), 'DISTILL_NB_WEIGHTS_INCEPTION_V3_COMPAT': ''}
    p = _run('ref', '--data', data, '--dest', tmp / 'ref.npz', env=env)  # offline, no weights anywhere
    assert p.returncode != 0
    assert 'weights-inception-2015-12-05-6726825d.pth' in p.stderr and 'DISTILL_NB_WEIGHTS_INCEPTION_V3_COMPAT' in p.stderr
    assert str(tmp / 'empty') in p.stderr
    assert not (tmp / 'ref.npz').exists()
    with pytest.raises(ValueError, match='unpickling'):
        distill_fid('calc', images=str(gen), ref=str(tmp / 'ref.npz'), detector_url=
                    'https://api.ngc.nvidia.com/v2/models/nvidia/research/stylegan3/versions/1/files/metrics/inception-2015-12-05.pkl')
    # fewer images than --num (EDM's default 50000)
    fid_ref(str(data), str(tmp / 'ref.npz'), detector=str(det))
    with pytest.raises(ValueError, match='expected at least 50000'):
        distill_fid('calc', images=str(gen), ref=str(tmp / 'ref.npz'), detector=str(det))
    with pytest.raises(ValueError, match='--data and --dest'):
        distill_fid('ref', data=str(data))


def test_edm_written_npz_is_accepted(setup):
    "A reference file written the way EDM's fid.py writes it (np.savez(mu=, sigma=)) works unchanged."
    tmp, det, data, gen = setup
    d = load_detector(det)
    u8 = torch.from_numpy(np.stack([np.asarray(Image.open(f)) for f in sorted(data.iterdir())])).permute(0, 3, 1, 2)
    mu, sigma = feature_stats(d(u8)['2048'])
    np.savez(tmp / 'edm.npz', mu=mu, sigma=sigma)
    res = fid_calc(str(data), str(tmp / 'edm.npz'), num=12, detector=str(det))
    assert abs(res['fid12']) < 1e-6 * max(1., np.trace(sigma)) and res['protocol']['ref_detector_sha256'] is None  # round-off vs tr Σ


def test_inception_architecture_path(tmp_path):
    "torch-fidelity's Inception-v3 (random weights saved here) through load_detector and compute_metrics."
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    class Skeleton(FeatureExtractorInceptionV3):
        def load_state_dict(self, sd, strict=True): return None
    b = io.BytesIO(); torch.save({}, b); b.seek(0)
    torch.manual_seed(0)
    torch.save(Skeleton('x', ['2048'], feature_extractor_weights_path=b).state_dict(), tmp_path / 'inception.pth')
    gen = _pngs(tmp_path / 'gen', 2, seed=1, size=16)
    ref = _pngs(tmp_path / 'ref', 2, seed=2, size=16)
    d = load_detector(tmp_path / 'inception.pth')  # read weights-only, built by torch-fidelity's registry
    assert d.kind == 'distill-inception-v3'
    r = compute_ref_stats(ref, tmp_path / 'ref.npz', detector=d)
    assert r['meta']['num_images'] == 2 and r['meta']['detector'] == 'distill-inception-v3'
    # IS from the 1008 logits; the 2048-d FID itself is skipped here because a 2048x2048 matrix square root takes
    # tens of seconds on a 2-core CPU (the FID arithmetic is tested with the tiny detector and closed forms)
    out = compute_metrics(gen, None, d, metrics=('is',))
    assert np.isfinite(out['is2']) and out['protocol']['detector_sha256'] == d.sha256 and out['protocol']['isc_splits'] == 2
    with np.load(tmp_path / 'ref.npz') as z: assert z['mu'].shape == (2048,) and z['sigma'].shape == (2048, 2048)
