"Multi-process training with the Learner: 2 CPU processes, gloo, launched with torchrun."
import json, os, socket, subprocess, sys, textwrap
from pathlib import Path
import pytest

WORKER = textwrap.dedent('''
    import json, sys
    from pathlib import Path
    import torch, torch.distributed as dist
    from torch import nn
    from distill_nb.core import seed_everything
    from distill_nb.learner import init_distributed, get_world_size, Learner, TrainStep, ResumableLoader, make_optimizer, Callback
    from distill_nb.callbacks import EMA, Checkpointer, MetricsLogger

    info = init_distributed('cpu')
    assert get_world_size() == 2 and dist.get_backend() == 'gloo'

    def train(out, n_steps, resume=None, compile=False):
        seed_everything(100 + info.rank)  # different init and noise per rank: DDP must synchronise
        x = torch.randn(64, 4, generator=torch.Generator().manual_seed(0))
        ds = torch.utils.data.TensorDataset(x, x @ torch.tensor([1., -2., 3., 0.5]))
        gen, critic = nn.Sequential(nn.Linear(4, 16), nn.SiLU(), nn.Linear(16, 1)), nn.Linear(4, 1)
        def c_loss(learn, b): return (learn.models['critic'](b[0]).squeeze(1) - b[1]) ** 2
        def g_loss(learn, b):
            o = learn.models['gen'](b[0] + 0.1 * torch.randn_like(b[0])).squeeze(1)
            return {'mse': (o - b[1]) ** 2}
        steps = [TrainStep('critic', c_loss, make_optimizer(critic.parameters(), 1e-2)),
                 TrainStep('gen', g_loss, make_optimizer(gen.parameters(), 1e-2), every=2, clip=1.0)]
        firsts = []
        class FirstBatch(Callback):
            def before_step(self, learn):
                if not firsts: firsts.append(learn.batch[0].clone())
        ema = EMA('gen', decay=0.9)
        learn = Learner({'gen': gen, 'critic': critic}, steps, ResumableLoader(ds, 8, seed=1), device='cpu', run_dir=out,
                        cbs=[ema, Checkpointer(every=3), MetricsLogger(every=2), FirstBatch()], config={'ddp_test': True},
                        compile={'backend': 'eager'} if compile else False)
        learn.fit(n_steps, resume=resume)
        flat = torch.cat([p.detach().flatten() for k in ('gen', 'critic') for p in learn.unwrapped(k).parameters()])
        eflat = torch.cat([p.detach().flatten() for p in ema.module().parameters()])
        allp = [torch.zeros_like(flat) for _ in range(2)]; dist.all_gather(allp, flat)
        alle = [torch.zeros_like(eflat) for _ in range(2)]; dist.all_gather(alle, eflat)
        fb = [torch.zeros_like(firsts[0]) for _ in range(2)]; dist.all_gather(fb, firsts[0])
        return {'param_diff': (allp[0] - allp[1]).abs().max().item(), 'ema_diff': (alle[0] - alle[1]).abs().max().item(),
                'ema_moved': (eflat - flat[:eflat.numel()]).abs().max().item(), 'same_first_batch': torch.equal(fb[0], fb[1]),
                'wrapped': type(learn.models['gen']).__name__, 'n_img': learn.n_img, 'ema_updates': ema.n_updates,
                'params': flat.tolist(), 'ema': eflat.tolist()}

    def accum_run(accum, compile=False):
        "3 SGD updates of a shared linear model, each batch in `accum` micro-batches; no_sync entries counted."
        seed_everything(7)
        x = torch.randn(64, 4, generator=torch.Generator().manual_seed(0))
        ds = torch.utils.data.TensorDataset(x, x @ torch.tensor([1., -2., 3., 0.5]))
        net, calls = nn.Linear(4, 1), []
        orig = nn.parallel.DistributedDataParallel.no_sync
        def counting(self): calls.append(1); return orig(self)
        nn.parallel.DistributedDataParallel.no_sync = counting
        try:
            learn = Learner({'net': net}, [TrainStep('fit', lambda l, b: (l.models['net'](b[0]).squeeze(1) - b[1]) ** 2,
                                                     make_optimizer(net.parameters(), 0.1, kind='sgd'), accum=accum)],
                            ResumableLoader(ds, 8, seed=1), device='cpu', compile={'backend': 'eager'} if compile else False)
            learn.fit(3)
        finally: nn.parallel.DistributedDataParallel.no_sync = orig
        flat = torch.cat([p.detach().flatten() for p in learn.unwrapped('net').parameters()])
        allp = [torch.zeros_like(flat) for _ in range(2)]; dist.all_gather(allp, flat)
        return {'params': flat.tolist(), 'param_diff': (allp[0] - allp[1]).abs().max().item(), 'no_sync_calls': len(calls)}

    out = Path(sys.argv[1])
    res = {'run': train(out/'run', 6, compile=True)}  # DDP + torch.compile
    res['accum1'], res['accum4'] = accum_run(1), accum_run(4, compile=True)  # gradient accumulation under DDP (+ compile)
    # exact resume: uninterrupted vs stopped at 4 (checkpoint at 3) and resumed to 6
    res['full'] = train(out/'a', 6); train(out/'b', 4)
    res['resumed'] = train(out/'b', 6, resume=out/'b'/'checkpoints'/'step-00000003')
    # a second run into a finished run folder: rank 0 decides, every rank raises the same UserError (no rank left hanging)
    from distill_nb.core import UserError
    try: train(out/'a', 6); refused = ''
    except UserError as e: refused = str(e)
    res['refused'] = [None, None]; dist.all_gather_object(res['refused'], refused)
    if info.rank == 0: (out/'result.json').write_text(json.dumps(res))
    dist.barrier(); dist.destroy_process_group()  # barrier first: a rank tearing gloo down while its peer still talks can abort
''')


def _free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0)); return s.getsockname()[1]


@pytest.fixture(scope='module')
def ddp_run(tmp_path_factory):
    "One torchrun launch (2 processes) runs every scenario; the tests check its results."
    tmp_path = tmp_path_factory.mktemp('ddp')
    return tmp_path, _torchrun(tmp_path)


def _torchrun(tmp_path):
    script = tmp_path/'worker.py'
    script.write_text(WORKER)
    root = str(Path(__file__).resolve().parents[1])  # the repo, importable without an install
    env = {**os.environ, 'OMP_NUM_THREADS': '1', 'WANDB_MODE': 'disabled',
           'PYTHONPATH': os.pathsep.join([root] + [p for p in os.environ.get('PYTHONPATH', '').split(os.pathsep) if p])}
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node=2', '--nnodes=1', '--master_addr=127.0.0.1',
           f'--master_port={_free_port()}', str(script), str(tmp_path)]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=150)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    return json.loads((tmp_path/'result.json').read_text())


def test_ddp_params_identical_and_ema_moves(ddp_run):
    "DDP + torch.compile wrappers: ranks stay identical, EMA updates, data is sharded, only rank 0 writes."
    tmp_path, res = ddp_run; res = res['run']
    assert res['param_diff'] == 0.0 and res['ema_diff'] == 0.0
    assert res['ema_moved'] > 0 and res['ema_updates'] == 3
    assert not res['same_first_batch']  # each rank reads its own shard
    assert res['wrapped'] == 'OptimizedModule' and res['n_img'] == 6 * 8 * 2
    recs = [json.loads(l) for l in (tmp_path/'run'/'metrics.jsonl').read_text().splitlines()]
    assert [r['step'] for r in recs] == [2, 4, 6]  # written once (rank 0), not twice
    assert sorted(p.name for p in (tmp_path/'run'/'checkpoints').iterdir()) == ['step-00000003', 'step-00000006']


def test_ddp_exact_resume(ddp_run):
    "Stopped at 4 and resumed from the step-3 checkpoint under DDP: bitwise the same weights and EMA as an uninterrupted run."
    _, res = ddp_run
    full, resumed = res['full'], res['resumed']
    assert resumed['param_diff'] == 0.0
    assert resumed['params'] == full['params'] and resumed['ema'] == full['ema']


def test_ddp_second_run_refused_on_every_rank(ddp_run):
    "Starting again into a finished run folder without resume/overwrite is refused identically on both ranks."
    tmp_path, res = ddp_run
    r0, r1 = res['refused']
    assert r0 == r1 and f"{tmp_path/'a'}: holds a previous run" in r0 and 'use --resume to continue it or --overwrite to replace it' in r0


def test_ddp_gradient_accumulation(ddp_run):
    "accum=4 under DDP (+ torch.compile): no_sync on the 3 first micro-batches of each update, ranks identical, same weights as accum=1."
    _, res = ddp_run
    a1, a4 = res['accum1'], res['accum4']
    assert a1['no_sync_calls'] == 0 and a4['no_sync_calls'] == 3 * 3  # 3 updates x (4 - 1) micro-batches
    assert a4['param_diff'] == 0.0
    # the batch gradient summed in another order: equal up to a few float32 roundings (2^-23 ≈ 1.2e-7) of the weights' size (≈ 1)
    scale = max(abs(v) for v in a1['params'])
    assert max(abs(p - q) for p, q in zip(a1['params'], a4['params'])) <= 1e-5 * scale, (a1['params'], a4['params'])
