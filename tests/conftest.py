"Make the repository importable when pytest runs from a checkout without `pip install -e .`."
import os, sys
from pathlib import Path
import pytest
import torch

root = str(Path(__file__).resolve().parent.parent)
if root not in sys.path: sys.path.insert(0, root)
os.environ.setdefault('WANDB_MODE', 'disabled')


@pytest.fixture(autouse=True, scope='module')
def _one_thread():
    "Every test module: one intra-op thread (tiny networks run fastest so, and OpenMP spinning on a busy 2-core CI box costs seconds); restored afterwards."
    n = torch.get_num_threads(); torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
