#!/usr/bin/env python
"""Data-parallel scaling: the same training step with 1 vs 2 processes under torchrun (images/s).

    python bench/bench_scaling.py --tiny                     # CPU, gloo, tiny EDM step, 1 vs 2 processes
    python bench/bench_scaling.py --tiny --method dmd2       # tiny DMD2 iteration (generator + fake score) instead
    python bench/bench_scaling.py --device cuda --nprocs 1,2,4,8 --net cifar10 --batch 128   # GPUs, nccl
    python bench/bench_scaling.py --device cuda --nprocs 1 --net imagenet64 --method dmd2 --batch 40    # ADM DMD2 on one GPU

The parent launches `torchrun --standalone --nproc_per_node=N bench/bench_scaling.py --worker ...` for every N. Each
worker builds the network, wraps it in DDP through `distill_nb.learner.Learner` (gloo on CPU, nccl on CUDA), runs
`--warmup` untimed and `--iters` timed iterations on a fixed in-memory batch of `--batch` images per process (weak
scaling: the global batch grows with N), and rank 0 reports global images/s = N * batch * iters / seconds.
Efficiency = images/s(N) / (N * images/s(1)). On CPU each process gets `--threads` threads (default 1), so N processes
use N cores: on a 2-core machine 2 processes can at best double the 1-process figure.
"""
import argparse, json, os, subprocess, sys, tempfile, time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TINY = dict(img_resolution=16, img_channels=3, label_dim=10, model_type='SongUNet', model_channels=16, channel_mult=[1, 2],
            num_blocks=1, attn_resolutions=[8], channel_mult_emb=2, augment_dim=0, dropout=0.0)
CIFAR = dict(img_resolution=32, img_channels=3, label_dim=10, model_type='SongUNet', augment_dim=9, model_channels=128,
             channel_mult=[2, 2, 2], dropout=0.13, embedding_type='positional', encoder_type='standard',
             decoder_type='standard', channel_mult_noise=1, resample_filter=[1, 1])
IN64 = dict(img_resolution=64, img_channels=3, label_dim=1000, model_type='DhariwalUNet', model_channels=192, channel_mult=[1, 2, 3, 4],
            channel_mult_emb=4, num_blocks=3, attn_resolutions=[32, 16, 8], dropout=0.0)
NETS = {'tiny': TINY, 'cifar10': CIFAR, 'imagenet64': IN64}


def worker(a) -> None:
    import torch
    torch.set_num_threads(a.threads)
    from distill_nb.learner import Learner, TrainStep, init_distributed, make_optimizer
    from distill_nb.precond import EDMPrecond
    from distill_nb.edm_train import edm_loss
    info = init_distributed(a.device)
    dev = info.device
    torch.manual_seed(1 + info.rank)
    cfg = dict(NETS[a.net])
    x = torch.rand(a.batch, 3, cfg['img_resolution'], cfg['img_resolution']) * 2 - 1
    y = torch.randint(cfg['label_dim'], (a.batch,))
    if a.method == 'edm':
        net = EDMPrecond(**cfg)
        opt = make_optimizer(net.to(dev).parameters(), 1e-4, betas=(0.9, 0.999), eps=1e-8)
        onehot = lambda c: torch.nn.functional.one_hot(c.long(), cfg['label_dim']).float()
        step = TrainStep('edm', lambda learn, b: edm_loss(learn.models['net'], b[0], onehot(b[1])), opt)
        learn = Learner({'net': net}, [step], [(x, y)], [], device=dev, amp=None)
    else:
        from distill_nb.dmd2 import DMD2, DMD2Config, dmd2_steps
        model = DMD2(EDMPrecond(**cfg)).to(dev)
        c = DMD2Config(batch=a.batch, dfake_gen_update_ratio=a.ratio, warmup_step=0, device=str(dev))
        learn = Learner({'teacher': model.real, 'generator': model.generator, 'guidance': model.guidance}, dmd2_steps(model, c, a.batch),
                        None, [], device=dev, amp=None, batch_size=a.batch)
    sync = (lambda: torch.cuda.synchronize(dev)) if dev.type == 'cuda' else (lambda: None)
    learn.fit(a.warmup); sync()
    if info.world_size > 1: torch.distributed.barrier()
    t0 = time.perf_counter(); learn.fit(a.warmup + a.iters); sync()
    if info.world_size > 1: torch.distributed.barrier()
    dt = time.perf_counter() - t0
    if info.is_main:
        r = {'nproc': info.world_size, 'method': a.method, 'ratio': a.ratio, 'net': a.net, 'batch_per_proc': a.batch, 'threads': a.threads,
             'iters': a.iters, 'sec_per_iter': dt / a.iters, 'images_per_s': info.world_size * a.batch * a.iters / dt,
             'backend': torch.distributed.get_backend() if info.world_size > 1 else 'none', 'device': str(dev)}
        Path(a.out).write_text(json.dumps(r))
    if info.world_size > 1: torch.distributed.destroy_process_group()


def launch(a, n: int) -> dict:
    "Run the worker under torchrun with `n` processes; return rank 0's result."
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / 'r.json'
        cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', f'--nproc_per_node={n}', __file__, '--worker',
               '--out', str(out), '--method', a.method, '--net', a.net, '--batch', str(a.batch), '--iters', str(a.iters),
               '--warmup', str(a.warmup), '--ratio', str(a.ratio), '--threads', str(a.threads), '--device', a.device]
        env = dict(os.environ, OMP_NUM_THREADS=str(a.threads), PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
        subprocess.run(cmd, check=True, env=env, cwd=ROOT)
        return json.loads(out.read_text())


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--tiny', action='store_true', help='tiny SongUNet on CPU (the defaults below)')
    p.add_argument('--method', default='edm', choices=['edm', 'dmd2'], help='EDM denoising step or one DMD2 iteration (G + fake score)')
    p.add_argument('--net', default=None, choices=sorted(NETS), help='network (default: tiny with --tiny, else cifar10)')
    p.add_argument('--nprocs', default='1,2', help='comma-separated process counts')
    p.add_argument('--ratio', type=int, default=1, help='dmd2: guidance updates per generator update (1: both every iteration; DMD2 uses 5)')
    p.add_argument('--batch', type=int, default=None, help='batch per process (default 16 tiny, 128 otherwise)')
    p.add_argument('--iters', type=int, default=None, help='timed iterations (default 10 tiny, 50 otherwise)')
    p.add_argument('--warmup', type=int, default=3, help='untimed iterations')
    p.add_argument('--threads', type=int, default=1, help='CPU threads per process')
    p.add_argument('--device', default=None, help='cpu | cuda (default: cpu with --tiny, else cuda)')
    p.add_argument('--json', default=None, help='also write the rows here')
    p.add_argument('--worker', action='store_true', help=argparse.SUPPRESS)
    p.add_argument('--out', default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    a.net = a.net or ('tiny' if a.tiny else 'cifar10')
    a.batch = a.batch or (16 if a.tiny else 128)
    a.iters = a.iters or (10 if a.tiny else 50)
    a.device = a.device or ('cpu' if a.tiny else 'cuda')
    if a.worker: return worker(a)
    rows = [launch(a, int(n)) for n in a.nprocs.split(',')]
    base = rows[0]['images_per_s'] / rows[0]['nproc']
    for r in rows: r['efficiency'] = r['images_per_s'] / (r['nproc'] * base)
    for r in rows:
        print(f"{r['method']} {r['net']} nproc {r['nproc']} ({r['backend']}, {r['threads']} thread(s) each, batch {r['batch_per_proc']}/proc): "
              f"{r['images_per_s']:8.1f} images/s, {r['sec_per_iter']*1e3:7.1f} ms/iter, efficiency {r['efficiency']:.2f}")
    if a.json: Path(a.json).write_text(json.dumps(rows, indent=1))
    return rows


if __name__ == '__main__': main()
