"Gradient accumulation (`TrainStep(accum=...)`, `micro_batch=...`): exact resume, and the shared-state dicts across a resume."
import torch
from torch import nn
from distill_nb.learner import Learner, TrainStep, ResumableLoader, make_optimizer, Callback


def _run(run_dir, n_steps, resume=None, save_at=None, **step_kw):
    torch.manual_seed(0)
    x = torch.randn(40, 4, generator=torch.Generator().manual_seed(1))
    ds = torch.utils.data.TensorDataset(x, x @ torch.tensor([1., -2., 3., 0.5]))
    g = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.2), nn.Linear(8, 1))
    def loss(learn, b):  # random numbers drawn per micro-batch (dropout, noise): the RNG stream must resume exactly
        if learn.micro.index == 0: learn.scratch['t/noise'] = torch.randn(len(learn.batch[0]))
        return (g(b[0]).squeeze(1) + 0.1 * learn.scratch['t/noise'][learn.micro.rows] - b[1]) ** 2
    class SaveAt(Callback):
        def after_step(self, learn):
            if learn.step == save_at: learn.save_checkpoint(run_dir/'checkpoints'/f'step-{learn.step:08d}')
    learn = Learner({'g': g}, [TrainStep('g', loss, make_optimizer(g.parameters(), 1e-2), clip=1.0, **step_kw)],
                    ResumableLoader(ds, 10, seed=2), cbs=[SaveAt()], device='cpu', run_dir=run_dir)
    learn.fit(n_steps, resume=resume)
    return learn


def _params(learn): return [p.detach().clone() for p in learn.unwrapped('g').parameters()]


def test_exact_resume_with_accumulation(tmp_path):
    "Stopped after 5 iterations (checkpoint at 4) and resumed to 9: bitwise the weights and Adam state of an uninterrupted run."
    for kw in (dict(accum=3), dict(micro_batch=4)):
        name = '_'.join(f'{k}{v}' for k, v in kw.items())
        full = _run(tmp_path/f'{name}_a', 9, **kw)
        _run(tmp_path/f'{name}_b', 5, save_at=4, **kw)
        res = _run(tmp_path/f'{name}_b', 9, resume='latest', **kw)
        assert res.step == full.step == 9 and res.update_counts == full.update_counts
        for p, q in zip(_params(full), _params(res)): assert torch.equal(p, q), name
        sf, sr = full.steps[0].opt.state_dict()['state'], res.steps[0].opt.state_dict()['state']
        for k in sf: assert torch.equal(sf[k]['exp_avg_sq'], sr[k]['exp_avg_sq'])


def test_accumulation_changes_nothing_when_one(tmp_path):
    "accum=1 and micro_batch >= batch are the plain update, bit for bit."
    base = _params(_run(tmp_path/'a', 4))
    for kw in (dict(accum=1), dict(micro_batch=10), dict(micro_batch=64)):
        for p, q in zip(base, _params(_run(tmp_path/'_'.join(map(str, kw.values())), 4, **kw))): assert torch.equal(p, q), kw


def test_scratch_and_shared_after_resume(tmp_path):
    "`scratch` holds only this iteration's values; `shared` starts empty in a resumed run (it is never checkpointed)."
    _run(tmp_path/'r', 5, save_at=4, accum=2)
    learn = _run(tmp_path/'r', 6, resume='latest', accum=2)
    assert list(learn.scratch) == ['t/noise'] and learn.shared == {}
