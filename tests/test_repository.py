"""The checkout as a stranger gets it: self-contained (nothing reaches above the repository root), and notebooks that
open and save clean in Jupyter started from the project's environment (registered kernel, nbdev's save hook)."""
import json, os, re, shutil, subprocess, sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCANNED = ('tests', 'nbs', 'simcal')
SUFFIXES = {'.py', '.ipynb', '.md', '.txt', '.json', '.ini', '.cfg', '.sh'}


def _tracked(folders=SCANNED):
    out = subprocess.run(['git', 'ls-files', '-z', *folders], cwd=ROOT, capture_output=True, check=True).stdout
    return [ROOT / p for p in out.decode().split('\0') if p and Path(p).suffix in SUFFIXES]


def _inside(p: Path) -> bool:
    p = Path(os.path.normpath(p))
    return p == ROOT or ROOT in p.parents


REL = re.compile(r'(?:\.\./)+[\w.\-]*')            # a relative path climbing out of its folder
PARENTS = re.compile(r'__file__\)\.resolve\(\)\.parents\[(\d+)\]')
SIBLING = 'shared' + '/data'                        # the material beside the checkout that a clone does not have


def _escapes(path: Path) -> list:
    "Paths written in `path` that resolve outside the checkout (relative ones from the file's folder, the cwd of a notebook)."
    text, bad = path.read_text(errors='replace'), []
    for m in REL.finditer(text):
        if not _inside(path.parent / m.group(0)): bad.append(m.group(0))
    for m in PARENTS.finditer(text):
        if not _inside(path.resolve().parents[int(m.group(1))]): bad.append(m.group(0))
    if SIBLING in text: bad.append(SIBLING)
    return bad


def test_scanner_catches_escapes(tmp_path):
    "The check itself can fail: each kind of escape is reported."
    f = ROOT / 'nbs' / 'x.ipynb'
    up = '..' + '/'   # written so that this file's own text does not climb out
    for text in [f"DATA = Path('{up * 2}elsewhere/data')", f'open("{up * 3}etc/passwd")']:
        assert not all(_inside(f.parent / m.group(0)) for m in REL.finditer(text)), text
    assert not _inside(ROOT / 'tests' / '..' / '..')
    assert _inside(ROOT / 'nbs' / 'paper' / '..' / '..' / 'figures')


def test_nothing_reads_outside_the_checkout():
    files = _tracked()
    assert len(files) > 30, 'git ls-files found too little: run the tests from a git checkout'
    bad = {str(f.relative_to(ROOT)): e for f in files if (e := _escapes(f))}
    assert not bad, f'paths that leave the repository: {bad}'


def test_fixtures_have_provenance():
    "Every fixture (file or folder at the top of tests/data) is named in PROVENANCE.md, which gives the licences."
    prov = (ROOT / 'tests' / 'data' / 'PROVENANCE.md').read_text()
    tops = {p.relative_to(ROOT / 'tests' / 'data').parts[0] for p in _tracked(['tests/data'])} - {'PROVENANCE.md'}
    assert tops, 'tests/data is empty'
    assert not [t for t in tops if f'`{t}' not in prov], 'fixtures without provenance'
    assert 'licence' in prov.lower() and 'CC BY 4.0' in prov


# ---------------------------------------------------------------------------------------------------------------
# Notebooks in Jupyter: the registered kernel agrees with the metadata nbdev_clean writes, and saving cleans.

def _kernelspec():
    from jupyter_client.kernelspec import KernelSpecManager
    return KernelSpecManager().get_kernel_spec('python3')


def _notebooks():
    return [p for p in _tracked(['nbs']) if p.suffix == '.ipynb']


def test_notebook_metadata_matches_registered_kernel():
    ks = _kernelspec()
    assert Path(ks.resource_dir).resolve().is_relative_to(Path(sys.prefix).resolve()), \
        'the python3 kernel should be the one `make install` registers in the environment'
    want = {'display_name': ks.display_name, 'language': ks.language, 'name': 'python3'}
    for nb in _notebooks():
        meta = json.loads(nb.read_text())['metadata']
        assert meta.get('kernelspec') == want, f'{nb.relative_to(ROOT)}: {meta.get("kernelspec")} != {want}'


def test_saving_in_jupyter_leaves_notebooks_unchanged(tmp_path):
    """Open two notebooks through a real Jupyter server of this environment, add what JupyterLab adds when it opens
    and runs one (kernelspec of the running kernel, language_info, execution counts), save through the contents API:
    the file on disk is byte-identical to the committed one."""
    pytest.importorskip('jupyter_server')
    sys.path.insert(0, str(ROOT / 'tests'))
    from jupyter_kernel import JupyterServer
    ks = _kernelspec()
    shutil.copy(ROOT / 'settings.ini', tmp_path / 'settings.ini')
    names = ['nbs/06_sampler.ipynb', 'nbs/paper/coco_lt.ipynb']
    for n in names:
        (tmp_path / n).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / n, tmp_path / n)
    import requests
    with JupyterServer(tmp_path) as srv:
        for n in names:
            model = srv.get(f'/api/contents/{n}?content=1').json()
            nb = model['content']
            nb['metadata']['kernelspec'] = {'display_name': ks.display_name, 'language': ks.language, 'name': 'python3'}
            nb['metadata']['language_info'] = {'name': 'python', 'version': sys.version.split()[0],
                                               'mimetype': 'text/x-python', 'file_extension': '.py'}
            for i, c in enumerate(x for x in nb['cells'] if x['cell_type'] == 'code'): c['execution_count'] = i + 1
            r = requests.put(srv.url + f'/api/contents/{n}', headers=srv._h(), timeout=30,
                             json={'type': 'notebook', 'format': 'json', 'content': nb})
            assert r.status_code == 200, r.text
            assert (tmp_path / n).read_bytes() == (ROOT / n).read_bytes(), f'saving {n} changed it'


def test_readme_is_rendered_from_the_start_page():
    "README.md is `make readme` of nbs/index.ipynb (the readme_nb of settings.ini): edit the notebook, not the README."
    sys.path.insert(0, str(ROOT / 'tests'))
    from render_readme import readme_notebook, render
    nb = readme_notebook()
    assert nb == ROOT / 'nbs' / 'index.ipynb' and nb.is_file()
    assert (ROOT / 'README.md').read_text() == render(nb), 'README.md is stale: run `make readme`'
    for must in ('make repro', 'make test', 'make lab', 'lvis_mrcnn', 'coco_lt', 'ablations'):
        assert must in render(nb), must
