"""The reproduction notebooks, run as users run them: through papermill (`simcal repro`) with tiny parameters, and
through a real Jupyter server on loopback (its kernel API, as JupyterLab does)."""
import json, math, struct
from pathlib import Path

import pytest
from PIL import Image

from simcal.cli import main
from simcal.core import PROTOCOLS
from simcal import repro as simcal_repro
from simcal.repro import REPRO_NOTEBOOKS, EXTRA_NOTEBOOKS, find_notebooks, PAPER_LVIS

ROOT = Path(__file__).resolve().parents[1]
TINY = {'synth': {'num_classes': 12, 'num_train': 60, 'num_val': 24, 'stuff_classes': 3}, 'base_iters': 12, 'cal_iters': 4,
        'T_values': [4], 'heads': ['2fc_rand', '3fc_ft'], 'shared_heads': ['2fc_rand'], 'step_fractions': [0.5],
        'bin_bases': [3, 4], 'bin_counts': [2, 3], 'htc_iters': 4}


def _params():
    out = []
    for k, v in TINY.items(): out += ['-p', k, json.dumps(v)]
    return out


@pytest.fixture(scope='module')
def repro(tmp_path_factory):
    "Run every reproduction notebook once with tiny parameters; returns (figures dir, work dir)."
    d = tmp_path_factory.mktemp('repro')
    rc = main(['repro', '--out', str(d / 'figures'), '--work-dir', str(d / 'runs'), *_params()])
    assert rc == 0
    return d / 'figures', d / 'runs'


def _png_ok(path):
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        assert im.format == 'PNG' and im.size[0] > 300 and im.size[1] > 200
        lo, hi = im.convert('L').getextrema()
        assert hi - lo > 50, f'{path} is blank'


def _check_bins(bins, protocol):
    P = PROTOCOLS[protocol]
    assert [(b['lo'], b['hi']) for b in bins] == [(lo, None if hi == math.inf else hi) for lo, hi in P.bins]
    for b in bins:
        assert b['AP'] is None or 0.0 <= b['AP'] <= 1.0
        assert b['num_categories'] >= 0


def test_executed_notebooks_kept(repro):
    figs, _ = repro
    for nb in REPRO_NOTEBOOKS:
        data = json.loads((figs / 'notebooks' / nb).read_text())
        code = [c for c in data['cells'] if c['cell_type'] == 'code']
        assert all(c.get('execution_count') for c in code), f'{nb}: a cell did not run'
        assert not any(o.get('output_type') == 'error' for c in code for o in c.get('outputs', []))
        assert any('injected-parameters' in c['metadata'].get('tags', []) for c in data['cells'])
        assert str(ROOT) not in (figs / 'notebooks' / nb).read_text()   # checkout paths are relative


FIGURES_SHOWN = {'lvis_mrcnn.ipynb': 4, 'coco_lt.ipynb': 2, 'ablations.ipynb': 4, 'htc.ipynb': 3}   # loss curve + per-bin figures (+ Props-GT)


def test_executed_notebooks_show_figures_and_no_stderr(repro):
    "Every figure is shown inline (as in JupyterLab); no stderr box from our code; step output stays in the logs."
    figs, _ = repro
    assert set(FIGURES_SHOWN) == set(REPRO_NOTEBOOKS)
    for nb, n in FIGURES_SHOWN.items():
        outs = [o for c in json.loads((figs / 'notebooks' / nb).read_text())['cells'] if c['cell_type'] == 'code'
                for o in c.get('outputs', [])]
        pngs = [o for o in outs if 'image/png' in o.get('data', {})]
        assert len(pngs) == n, f'{nb}: {len(pngs)} inline figures, expected {n}'
        assert not [o for o in outs if o.get('name') == 'stderr'], f'{nb}: stderr output'
        text = ''.join(''.join(o.get('text', '')) for o in outs)
        assert '%|' not in text, f'{nb}: a progress bar leaked into the notebook'


def test_lvis_tables_and_figures(repro):
    figs, _ = repro
    for iou in ('bbox', 'segm'):
        rows = json.loads((figs / f'lvis_mrcnn_table_{iou}.json').read_text())
        assert [(r['setting'], r['source']) for r in rows] == [(s, src) for s in ('baseline', 'cal', 'cal+dual')
                                                                for src in ('ours', 'paper')]
        for r in rows:
            for k in ('AP1', 'AP2', 'AP3', 'AP4', 'APr', 'APc', 'APf', 'AP', 'bAP'):
                assert r[k] is None or 0.0 <= r[k] <= 100.0, (k, r)
            if r['source'] == 'paper':
                assert r['AP'] == PAPER_LVIS[(iou, 'r50-ag', r['setting'])]['AP']
        fig = json.loads((figs / f'lvis_mrcnn_bins_{iou}.json').read_text())
        assert set(fig) == {'baseline', 'cal', 'cal+dual'}
        for m in fig.values():
            _check_bins(m['bins'], 'synth')
            defined = [b['AP'] for b in m['bins'] if b['AP'] is not None]
            assert m['bAP'] == pytest.approx(sum(defined) / len(defined), abs=1e-12)
        _png_ok(figs / f'lvis_mrcnn_bins_{iou}.png')
        assert (figs / f'lvis_mrcnn_table_{iou}.md').read_text().count('\n') >= 7
    s = json.loads((figs / 'lvis_mrcnn_summary.json').read_text())
    assert s['dataset'] == 'synth' and len(s['findings']) == 2


def test_props_gt_upper_bound(repro):
    "The Props-GT pass (2 torchrun processes): every detection has score 1 and a class present in its image."
    figs, runs = repro
    fig = json.loads((figs / 'lvis_mrcnn_props_gt.json').read_text())
    assert set(fig['ours']) == {'baseline', 'SimCal (cal+dual)', 'Props-GT'}
    assert fig['release_props_gt_lvis_v0.5']['bAP'] == 36.4
    _png_ok(figs / 'lvis_mrcnn_props_gt.png')
    gt = json.loads((runs / 'data' / 'synth' / 'annotations' / 'val.json').read_text())
    present = {(a['image_id'], a['category_id']) for a in gt['annotations']}
    res = json.loads((runs / 'test_props_gt' / 'results.json').read_text())
    assert res and all(r['score'] == 1.0 and (r['image_id'], r['category_id']) in present for r in res)


def test_coco_lt_tables_and_figures(repro):
    figs, _ = repro
    for iou in ('bbox', 'segm'):
        rows = json.loads((figs / f'coco_lt_table_{iou}.json').read_text())
        assert {r['source'] for r in rows} == {'ours', 'paper'} and 'eAP' in rows[0]
        fig = json.loads((figs / f'coco_lt_bins_{iou}.json').read_text())
        for m in fig.values(): _check_bins(m['bins'], 'synth_coco')
        _png_ok(figs / f'coco_lt_bins_{iou}.png')


def test_coco_lt_protocol_applied(repro):
    "COCO-LT's rules: at most 100 detections per image, none at or below score 0.05."
    _, runs = repro
    res = json.loads((runs / 'test_synth_coco_dual' / 'results.json').read_text())
    per_image = {}
    for r in res:
        per_image[r['image_id']] = per_image.get(r['image_id'], 0) + 1
        assert r['score'] > 0.05
    assert max(per_image.values()) <= 100


def test_coco_rules_filtered_equal_a_direct_pass(repro, tmp_path):
    "The main job's COCO-LT detections (an LVIS-rules pass filtered to COCO's rules) equal a direct COCO-rules pass."
    _, runs = repro
    derived = runs / 'test_synth_coco_dual'
    m = json.loads((derived / 'metrics.json').read_text())
    assert m['derived_from'].endswith('test_modes/dual') and m['protocol'] == 'synth_coco'
    src = json.loads((runs / 'test_modes' / 'dual' / 'metrics.json').read_text())   # a variant of a 3-way pass
    data = runs / 'data' / 'synth'
    direct = simcal_repro.test_model(src['checkpoint'], data / 'annotations' / 'val.json', data / 'images', tmp_path,
                                     str(data / 'annotations' / 'train.json'), 'synth_coco',
                                     cal_head=src['calibration']['cal_head'], mode='dual',
                                     extra=['--score-thresh', 0.05, '--max-dets', 100], nproc=2)   # as the notebook runs it
    for name in ('results.json', 'results_segm.json'):
        a = json.loads((derived / name).read_text()); b = json.loads((tmp_path / name).read_text())
        assert len(a) == len(b) > 0
        key = lambda r: (r['image_id'], -r['score'], r['category_id'])
        assert sorted(a, key=key) == sorted(b, key=key), name
    for iou in ('bbox', 'segm'): assert m[iou]['AP'] == direct[iou]['AP'] and m[iou]['bAP'] == direct[iou]['bAP']


def test_calibration_heads_trained_once(repro):
    "The paper notebooks share one calibration run for every head: the LVIS notebook's, reused by the others."
    _, runs = repro
    step = json.loads((runs / 'cal_heads' / 'step.json').read_text())
    assert step['args'][step['args'].index('--head') + 1:][:2] == ['2fc_rand', '3fc_ft']
    for h in ('2fc_rand', '3fc_ft'): assert (runs / 'cal_heads' / h / 'calibration.pt').is_file()
    assert not [d.name for d in runs.iterdir() if d.name.startswith('cal_') and d.name not in ('cal_heads', 'cal_steps')]


def test_ablation_figures(repro):
    figs, _ = repro
    t = json.loads((figs / 'ablation_dual_threshold.json').read_text())
    assert [r['T'] for r in t['ours']] == [0, 4, 16, 'inf']
    assert len(t['paper']) == 21
    heads = json.loads((figs / 'ablation_heads.json').read_text())
    assert {(r['head'], r['source']) for r in heads} >= {('2fc_rand', 'ours'), ('3fc_ft', 'ours'), ('3fc_ft', 'paper')}
    steps = json.loads((figs / 'ablation_calibration_steps.json').read_text())
    assert [r['iters'] for r in steps['ours']] == [0, 2, 4]
    bins = json.loads((figs / 'ablation_bins.json').read_text())
    assert bins['lvis_v0.5_bin_sizes'][2] == [67, 298, 284, 181]
    assert [r['f'] for r in bins['ours_f']] == [3, 4]
    for name in ('ablation_dual_threshold', 'ablation_heads_bins', 'ablation_calibration_steps', 'ablation_bins'):
        _png_ok(figs / f'{name}.png')


def test_htc_notebook(repro):
    """The HTC table (segm with the paper's rows, bbox ours only), the per-bin figures, HTC against the Mask R-CNN of the
    same run, and the steps it ran: an HTC from the Mask R-CNN's fixed backbone and RPN, calibrated per stage."""
    figs, runs = repro
    rows = json.loads((figs / 'htc_table_segm.json').read_text())
    settings = ['baseline', '2fc_rand', '3fc_ft']
    assert [r['setting'] for r in rows if r['source'] == 'ours'] == settings
    paper = {r['setting']: r for r in rows if r['source'] == 'paper'}
    assert set(paper) == {'baseline', '2fc_rand', '3fc_ft'} and paper['3fc_ft']['AP'] == 33.4 and paper['3fc_ft']['APr'] == 24.7
    assert {r['source'] for r in json.loads((figs / 'htc_table_bbox.json').read_text())} == {'ours'}
    for iou in ('bbox', 'segm'):
        fig = json.loads((figs / f'htc_bins_{iou}.json').read_text())
        assert set(fig) == {'baseline', '2fc_rand', '3fc_ft'}
        for m in fig.values(): _check_bins(m['bins'], 'synth')
        _png_ok(figs / f'htc_bins_{iou}.png')
    vs = json.loads((figs / 'htc_vs_mrcnn.json').read_text())
    assert [r['setting'] for r in vs] == ['Mask R-CNN baseline', 'Mask R-CNN + SimCal (3fc_ft)', 'HTC baseline',
                                          'HTC + SimCal (3fc_ft)'] * 2
    mr = json.loads((runs / 'test_modes' / 'orig' / 'metrics.json').read_text())
    assert vs[0]['AP'] == pytest.approx(round(100 * mr['bbox']['AP'], 2))
    cfg = json.loads((runs / 'htc_htc_demo' / 'config.json').read_text())['train']
    assert cfg['freeze'] == ['backbone', 'rpn'] and cfg['init_from']['checkpoint'].endswith('base_demo/model_final.pth')
    from simcal.checkpoint import load_checkpoint
    a, b = (load_checkpoint(runs / d / 'model_final.pth')['model'] for d in ('base_demo', 'htc_htc_demo'))
    assert all(torch_equal(a[k], b[k]) for k in a if k.startswith(('backbone.fpn', 'rpn')))   # fixed while the heads trained
    from simcal.calibration import load_calibration
    for h in ('2fc_rand', '3fc_ft'):
        assert len(load_calibration(runs / 'htc_cal_heads' / h / 'calibration.pt')['stage_heads']) == 2   # + 'head': 3 stages
    assert len(json.loads((runs / 'htc_test' / 'variants.json').read_text())) == 3    # one pass, three ways


def torch_equal(x, y):
    import torch
    return torch.equal(x, y)


def test_dual_equals_orig_and_cal_columns(repro):
    "T=0 is the original head and T=inf the calibrated one: the sweep's end points are the orig and cal runs."
    figs, runs = repro
    t = {r['T']: r for r in json.loads((figs / 'ablation_dual_threshold.json').read_text())['ours']}
    m = {mode: json.loads((runs / 'test_modes' / mode / 'metrics.json').read_text())['segm'] for mode in ('orig', 'cal')}
    assert t[0]['AP'] == pytest.approx(round(100 * m['orig']['AP'], 2))
    assert t['inf']['AP'] == pytest.approx(round(100 * m['cal']['AP'], 2))


# the comparison notebook (an extra of `simcal repro`): the main job's tiny parameters, so its base steps are reused;
# tau-norm at strength 0: the zero-effect check, at no extra cost (a searched strength costs a pass per grid value)
LONGTAIL_TINY = {**{k: TINY[k] for k in ('synth', 'base_iters', 'cal_iters', 'shared_heads')}, 'retrain_iters': 2,
                 'strengths': {'norcal': 1.0, 'logit_adjustment': 1.0, 'tau_norm': 0.0}}
LONGTAIL_METHODS = ['baseline', 'SimCal', 'NorCal', 'logit adjustment', 'tau-norm', 'cRT', 'LWS', 'BAGS']


@pytest.fixture(scope='module')
def longtail(repro):
    "Run the comparison notebook with tiny parameters in the main job's work folder; returns (its output dir, work dir)."
    figs, runs = repro
    out = figs.parent / 'longtail'
    params = [a for k, v in LONGTAIL_TINY.items() for a in ('-p', k, json.dumps(v))]
    assert main(['repro', '--only', 'longtail.ipynb', '--out', str(out), '--work-dir', str(runs), *params]) == 0
    return out, runs


def test_longtail_comparison(longtail):
    "One table (a row per method and IoU type, finite values, the published numbers labelled) and one figure."
    out, runs = longtail
    assert EXTRA_NOTEBOOKS == ['longtail.ipynb'] and not set(EXTRA_NOTEBOOKS) & set(REPRO_NOTEBOOKS)
    nb = json.loads((out / 'notebooks' / 'longtail.ipynb').read_text())
    code = [c for c in nb['cells'] if c['cell_type'] == 'code']
    assert all(c.get('execution_count') for c in code)
    outs = [o for c in code for o in c.get('outputs', [])]
    assert not [o for o in outs if o.get('output_type') == 'error' or o.get('name') == 'stderr']
    assert len([o for o in outs if 'image/png' in o.get('data', {})]) == 1
    text = ''.join(''.join(o.get('text', '')) for o in outs)
    for step in ('train base_demo', 'calibrate cal_heads', 'test test_modes'):
        assert f'{step}: reused' in text, f'{step} was not reused from the paper notebooks'
    rows = json.loads((out / 'longtail_table.json').read_text())
    ours = [r for r in rows if r['source'] == 'ours']
    assert [(r['method'], r['iou']) for r in ours] == [(m, iou) for m in LONGTAIL_METHODS for iou in ('bbox', 'segm')]
    for r in ours:
        for k in ('AP1', 'AP2', 'AP3', 'AP4', 'APr', 'APc', 'APf', 'AP', 'bAP'):
            assert r[k] is not None and math.isfinite(r[k]) and 0.0 <= r[k] <= 100.0, (k, r)
    pub = {(r['method'], r['iou'], r['reference']): r for r in rows if r['source'] == 'published'}
    assert all(r['reference'] for r in pub.values())
    assert {m for m, _, _ in pub} == {'baseline', 'SimCal', 'tau-norm', 'cRT', 'LWS', 'BAGS'}
    simcal = [r for (m, iou, _), r in pub.items() if (m, iou) == ('SimCal', 'segm')]
    assert simcal[0]['AP'] == PAPER_LVIS[('segm', 'r50-ag', 'cal+dual')]['AP'] and 'LVIS v0.5' in simcal[0]['reference']
    assert [r['AP'] for (m, iou, _), r in pub.items() if m == 'cRT'] == [22.1]
    assert (out / 'longtail_table.md').read_text().count('\n') >= 2 * len(LONGTAIL_METHODS)
    fig = json.loads((out / 'longtail_bins.json').read_text())
    assert list(fig['ours']) == LONGTAIL_METHODS
    for m in fig['ours'].values():
        for iou in ('bbox', 'segm'): _check_bins(m[iou]['bins'], 'synth')
    _png_ok(out / 'longtail_bins.png')


def test_longtail_strengths_and_zero_effect(longtail):
    """tau-norm at strength 0 gives the detector's own detections (the baseline pass); the strengths given are the ones
    recorded; each re-trained classifier is a step of its own."""
    out, runs = longtail
    s = json.loads((out / 'longtail_summary.json').read_text())
    assert s['strengths'] == {'NorCal': 1.0, 'logit adjustment': 1.0, 'tau-norm': 0.0}
    assert s['strength_search'] == {'NorCal': None, 'logit adjustment': None, 'tau-norm': None}
    orig = json.loads((runs / 'test_modes' / 'orig' / 'results.json').read_text())
    zero = json.loads((runs / 'test_tau_norm' / 'results.json').read_text())
    key = lambda r: (r['image_id'], r['category_id'], tuple(r['bbox']))
    assert len(orig) == len(zero) > 0
    for a, b in zip(sorted(orig, key=key), sorted(zero, key=key)):
        assert key(a) == key(b) and a['score'] == pytest.approx(b['score'], abs=1e-6)
    m0, mz = (json.loads((runs / d / 'metrics.json').read_text()) for d in ('test_modes/orig', 'test_tau_norm'))
    for iou in ('bbox', 'segm'): assert mz[iou]['AP'] == pytest.approx(m0[iou]['AP'], abs=1e-9)
    for method in ('crt', 'lws', 'bags'):
        step = json.loads((runs / f'retrain_{method}' / 'step.json').read_text())
        assert step['args'][step['args'].index('--method') + 1] == method and (runs / f'retrain_{method}' / 'retrained.pt').is_file()
        assert json.loads((runs / f'test_{method}' / 'metrics.json').read_text())['retrained'].endswith(f'retrain_{method}/retrained.pt')


def test_notebook_through_jupyter_server(repro, tmp_path):
    "The LVIS notebook's cells, executed by a Jupyter server's kernel as JupyterLab would (reusing the checkpoints)."
    from jupyter_kernel import JupyterServer
    figs, runs = repro
    nb = json.loads((find_notebooks(ROOT / 'nbs' / 'paper') / 'lvis_mrcnn.ipynb').read_text())
    cells = [''.join(c['source']) for c in nb['cells'] if c['cell_type'] == 'code']
    i = next(k for k, c in enumerate(c for c in nb['cells'] if c['cell_type'] == 'code')
             if 'parameters' in c['metadata'].get('tags', []))
    out_dir = tmp_path / 'figures'
    inject = '\n'.join(f'{k} = {v!r}' for k, v in {**{k: TINY[k] for k in ('synth', 'base_iters', 'cal_iters', 'shared_heads')},
                                                   'work_dir': str(runs), 'out_dir': str(out_dir)}.items())
    cells = cells[:i + 1] + [inject] + cells[i + 1:]
    with JupyterServer(ROOT) as server:
        outputs = server.run_cells('nbs/paper/lvis_mrcnn.ipynb', cells, timeout=600)
    text = ''.join(outputs)
    assert 'reused (made the same way' in text    # the papermill run's checkpoints and results were reused
    s = json.loads((out_dir / 'lvis_mrcnn_summary.json').read_text())
    ref = json.loads((figs / 'lvis_mrcnn_summary.json').read_text())
    assert s['metrics'] == ref['metrics']
    _png_ok(out_dir / 'lvis_mrcnn_bins_segm.png')


def _procs_with(marker: str) -> list:
    "Processes whose environment holds `marker` (every process a `simcal repro` started inherits its status file name)."
    found = []
    for d in Path('/proc').iterdir():
        if not d.name.isdigit(): continue
        try:
            if marker.encode() in (d / 'environ').read_bytes(): found.append(int(d.name))
        except OSError: pass
    return found


@pytest.mark.parametrize('sig', ['SIGTERM', 'SIGINT', 'kernel'])
def test_stopping_repro_leaves_no_process(tmp_path, sig):
    """Stop `simcal repro` while a torchrun step trains (or kill its notebook kernel outright): the kernel, torchrun,
    its ranks and workers are all gone, and no executed notebook is left half-written."""
    import os, signal, subprocess, sys, time
    marker = f'simcal-stop-test-{tmp_path.name}'
    env = {**os.environ, 'SIMCAL_TEST_MARKER': marker}
    cmd = [sys.executable, '-m', 'simcal.cli', 'repro', '--only', 'lvis_mrcnn.ipynb', '--out', str(tmp_path / 'f'),
           '--work-dir', str(tmp_path / 'r'), '-p', 'synth', json.dumps(TINY['synth']), '-p', 'base_iters', '100000']
    p = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        def trainers():   # torchrun and its ranks: their command lines run `simcal.cli train` into this work folder
            cls = [Path(f'/proc/{q}/cmdline').read_bytes().decode(errors='replace') for q in _procs_with(marker)
                   if Path(f'/proc/{q}/cmdline').exists()]
            return [c for c in cls if 'simcal.cli\0train\0' in c and str(tmp_path) in c]
        t0 = time.time()
        while time.time() - t0 < 240 and len(trainers()) < 3:
            assert p.poll() is None, p.stdout.read().decode()[-3000:]
            time.sleep(1)
        assert len(trainers()) >= 3 and len(_procs_with(marker)) >= 5, 'repro, kernel, torchrun and 2 ranks should run'
        if sig == 'kernel':   # the kernel dies at once (no clean-up of its own): its steps must die with it
            kernel = [q for q in _procs_with(marker) if b'ipykernel' in Path(f'/proc/{q}/cmdline').read_bytes()]
            assert len(kernel) == 1
            os.kill(kernel[0], signal.SIGKILL)
        else:
            p.send_signal(getattr(signal, sig))
        out, _ = p.communicate(timeout=120)
        assert p.returncode == (1 if sig == 'kernel' else 130), out.decode()[-3000:]
        t0 = time.time()
        while _procs_with(marker) and time.time() - t0 < 60: time.sleep(1)
        assert _procs_with(marker) == [], 'processes left behind'
        assert not (tmp_path / 'f' / 'notebooks' / 'lvis_mrcnn.ipynb').exists()   # no half-written output
    finally:
        if p.poll() is None: p.kill()
        for q in _procs_with(marker):
            try: os.kill(q, signal.SIGKILL)
            except OSError: pass
