"""README.md is rendered from the start page `nbs/index.ipynb` (settings.ini: `readme_nb`), so the two never disagree.

nbdev's own `nbdev_readme` needs the Quarto binary, which no package index ships; this renders the same subset that
the start page uses: markdown cells as written, code cells as Python blocks followed by their text output, cells
marked `#| hide` left out. `make readme` writes README.md; tests/test_repository.py checks it is up to date."""
import configparser, json, sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def readme_notebook(root=ROOT) -> Path:
    cfg = configparser.ConfigParser(delimiters=['=']); cfg.read(root / 'settings.ini')
    return root / cfg['DEFAULT']['nbs_path'] / cfg['DEFAULT']['readme_nb']


def render(nb_path) -> str:
    "The Markdown of a start-page notebook."
    parts = []
    for c in json.loads(Path(nb_path).read_text())['cells']:
        src = ''.join(c['source']).strip('\n')
        lines = src.splitlines()
        if c['cell_type'] == 'markdown':
            parts.append(src)
        elif c['cell_type'] == 'code':
            if any(l.strip() == '#| hide' for l in lines): continue
            code = '\n'.join(l for l in lines if not l.startswith('#|')).strip('\n')
            if code: parts.append(f'```python\n{code}\n```')
            out = ''.join(''.join(o.get('text', '')) or ''.join(o.get('data', {}).get('text/plain', ''))
                          for o in c.get('outputs', []) if o.get('output_type') != 'error').strip('\n')
            if out: parts.append(f'```\n{out}\n```')
    return '\n\n'.join(parts) + '\n'


if __name__ == '__main__':
    out = ROOT / 'README.md'
    out.write_text(render(readme_notebook()))
    print(f'wrote {out.relative_to(ROOT)} from {readme_notebook().relative_to(ROOT)}', file=sys.stderr)
