#!/usr/bin/env python3
"""Render nbs/index.ipynb to README.md without Quarto (which cannot be installed on our machines).

Markdown cells are copied verbatim; code cells become ```python blocks (cells starting with `#| hide` are
skipped); stored text outputs follow as plain blocks. `python .ci/readme.py` rewrites README.md;
`python .ci/readme.py --check` exits 1 when README.md is stale (tests/test_readme.py runs this check).
"""
import json, sys
from pathlib import Path

root = Path(__file__).resolve().parent.parent

def render(nb_path=root/'nbs'/'index.ipynb') -> str:
    nb = json.loads(Path(nb_path).read_text())
    out = ['<!-- Generated from nbs/index.ipynb by .ci/readme.py: edit the notebook, then run `python .ci/readme.py`. -->\n']
    for c in nb['cells']:
        src = ''.join(c['source']).rstrip()
        if c['cell_type'] == 'markdown': out.append(src + '\n')
        elif c['cell_type'] == 'code' and src and not src.startswith('#| hide'):
            lines = [l for l in src.split('\n') if not l.startswith('#|')]
            out.append('```python\n' + '\n'.join(lines) + '\n```\n')
            texts = [''.join(o.get('text', '')) or ''.join(o.get('data', {}).get('text/plain', '')) for o in c.get('outputs', [])]
            texts = [t.rstrip() for t in texts if t.strip()]
            if texts: out.append('```\n' + '\n'.join(texts) + '\n```\n')
    return '\n'.join(out)

if __name__ == '__main__':
    text, readme = render(), root/'README.md'
    if '--check' in sys.argv:
        if not readme.exists() or readme.read_text() != text:
            sys.exit('README.md is out of date with nbs/index.ipynb: run `python .ci/readme.py`')
    else: readme.write_text(text)
