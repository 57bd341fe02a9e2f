"""Benchmark GDD vs GDD-I training steps: throughput and memory with and without freezing.

    python bench/bench_gdd.py --tiny                 # CPU, tiny networks, a few seconds
    python bench/bench_gdd.py                        # real-size CIFAR-10 NCSN++ + effnet-lite0 D on CUDA
    python bench/bench_gdd.py --arch adm --res 64    # ImageNet-64 ADM generator

Each freeze level runs in its own subprocess so peak memory is measured cleanly (CUDA: max_memory_allocated;
CPU: peak RSS). Reported per level: trainable generator parameters, gradient + Adam state bytes of the generator,
ms per G step (forward + backward + Adam) and per full iteration (G + D step), images/s, peak memory.
"""
from __future__ import annotations
import argparse, json, os, resource, subprocess, sys, time


def _measure(args) -> dict:
    import torch
    from distill_nb.gdd import gdd_generator, apply_freeze, gdd_steps, tiny_gdd_teacher
    from distill_nb.precond import EDMPrecond
    from distill_nb.projected_d import ProjectedDiscriminator
    from distill_nb.learner import Learner
    dev = torch.device(args.device)
    torch.manual_seed(0)
    if args.tiny:
        teacher = tiny_gdd_teacher(args.res, 3, model_type='DhariwalUNet' if args.arch == 'adm' else 'SongUNet')
        D = ProjectedDiscriminator('tiny', feature_size=32, cout=16, max_head_channels=64)
    else:
        if args.arch == 'adm':
            teacher = EDMPrecond(args.res, 3, 0, model_type='DhariwalUNet', model_channels=192, channel_mult=[1, 2, 3, 4])
        else:
            teacher = EDMPrecond(args.res, 3, 0, model_type='SongUNet', model_channels=128, channel_mult=[2, 2, 2],
                                 embedding_type='fourier', channel_mult_noise=2, encoder_type='residual', resample_filter=[1, 3, 3, 1])
        D = ProjectedDiscriminator(args.backbones, feature_size=args.feature_size)
    G, _ = gdd_generator(teacher)
    apply_freeze(G, args.freeze)
    G, D = G.to(dev), D.to(dev)
    steps = gdd_steps(G, D, 1e-5, 1e-5, r1_gamma=0.0)
    learn = Learner({'G': G, 'D': D.heads, 'F': D.features}, steps, None, [], device=dev, amp=None)
    learn.prepare()
    x = torch.rand(args.batch, 3, args.res, args.res, device=dev) * 2 - 1
    learn.batch = (x, torch.zeros(args.batch, dtype=torch.long, device=dev))
    sync = (lambda: torch.cuda.synchronize()) if dev.type == 'cuda' else (lambda: None)
    if dev.type == 'cuda': torch.cuda.reset_peak_memory_stats()
    times = {'G': [], 'D': []}
    for i in range(args.warmup + args.iters):
        for st in steps:
            sync(); t = time.perf_counter(); learn.run_update(st); sync()
            if i >= args.warmup: times[st.name].append(time.perf_counter() - t)
    n_tr = sum(p.numel() for p in G.parameters() if p.requires_grad)
    med = lambda v: sorted(v)[len(v) // 2]
    g_ms, d_ms = 1e3 * med(times['G']), 1e3 * med(times['D'])
    peak = (torch.cuda.max_memory_allocated() if dev.type == 'cuda' else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) / 2 ** 20
    return {'freeze': args.freeze, 'trainable': n_tr, 'total': sum(p.numel() for p in G.parameters()),
            'opt_grad_MiB': 3 * 4 * n_tr / 2 ** 20, 'g_ms': g_ms, 'iter_ms': g_ms + d_ms,
            'img_s': args.batch / ((g_ms + d_ms) / 1e3), 'peak_MiB': peak, 'device': str(dev)}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--tiny', action='store_true', help='tiny networks on CPU (smoke benchmark)')
    ap.add_argument('--arch', default='ncsnpp', choices=['ncsnpp', 'adm'])
    ap.add_argument('--res', type=int, default=None)
    ap.add_argument('--batch', type=int, default=None)
    ap.add_argument('--backbones', default='tf_efficientnet_lite0')
    ap.add_argument('--feature_size', type=int, default=224)
    ap.add_argument('--device', default=None)
    ap.add_argument('--iters', type=int, default=None)
    ap.add_argument('--warmup', type=int, default=2)
    ap.add_argument('--levels', default='0,1,2,3', help='freeze levels to compare')
    ap.add_argument('--freeze', type=int, default=None, help=argparse.SUPPRESS)  # child process
    ap.add_argument('--json', default=None, help='also write the results here')
    args = ap.parse_args()
    if args.device is None:
        import torch
        args.device = 'cuda' if torch.cuda.is_available() and not args.tiny else 'cpu'
    args.res = args.res or (8 if args.tiny else 32)
    args.batch = args.batch or (16 if args.tiny else 64)
    args.iters = args.iters or (5 if args.tiny else 20)
    if args.freeze is not None:
        print('RESULT ' + json.dumps(_measure(args))); return
    rows = []
    for lv in [int(v) for v in args.levels.split(',')]:
        cmd = [sys.executable, __file__, '--freeze', str(lv), '--arch', args.arch, '--backbones', args.backbones,
               '--feature_size', str(args.feature_size), '--device', args.device, '--res', str(args.res),
               '--batch', str(args.batch), '--iters', str(args.iters), '--warmup', str(args.warmup)] + (['--tiny'] if args.tiny else [])
        out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, 'PYTHONPATH': os.pathsep.join([os.path.dirname(os.path.dirname(os.path.abspath(__file__))), os.environ.get('PYTHONPATH', '')])})
        line = [l for l in out.stdout.splitlines() if l.startswith('RESULT ')]
        if out.returncode or not line: sys.exit(f'freeze {lv} failed:\n{out.stderr[-3000:]}')
        rows.append(json.loads(line[0][7:]))
    base = rows[0]
    print(f"GDD step benchmark: {'tiny' if args.tiny else args.arch} {args.res}px, batch {args.batch}, device {args.device}, median of {args.iters} iterations")
    hdr = f"{'freeze':<8}{'trainable G':>14}{'grad+Adam MiB':>15}{'G step ms':>11}{'iter ms':>9}{'img/s':>9}{'peak MiB':>10}{'G step vs GDD':>15}"
    print(hdr); print('-' * len(hdr))
    for r in rows:
        print(f"{r['freeze']:<8}{r['trainable']:>14,}{r['opt_grad_MiB']:>15.1f}{r['g_ms']:>11.1f}{r['iter_ms']:>9.1f}{r['img_s']:>9.1f}"
              f"{r['peak_MiB']:>10.0f}{r['g_ms'] / base['g_ms']:>14.2f}x")
    if args.json:
        with open(args.json, 'w') as f: json.dump(rows, f, indent=1)


if __name__ == '__main__':
    main()
