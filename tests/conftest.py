"Make the repository importable when pytest runs from a checkout without `pip install -e .`."
import os, sys
from pathlib import Path

root = str(Path(__file__).resolve().parent.parent)
if root not in sys.path: sys.path.insert(0, root)
os.environ.setdefault('WANDB_MODE', 'disabled')
