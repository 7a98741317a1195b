"""Bad input through the command line (`simcal evaluate`, `simcal data ...`, `simcal train`, `simcal calibrate`,
`simcal test`): every case exits with status 2 and one message naming the field or option at fault, and leaves no
output behind. A table of cases, one or more per kind of fault (bad files, out-of-range options, 0 taken for "the
default", unreadable checkpoints, mismatched statistics and heads, finished runs re-run with other settings); good
runs beside them show that the same files are fine when the fault is absent or explicitly allowed."""
import contextlib, copy, io, json, subprocess, sys
from pathlib import Path

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from simcal.cli import main

H, W = 60, 80


def _poly(x, y, w, h): return [[x, y, x + w, y, x + w, y + h, x, y + h]]


def _rle(poly):
    r = mask_utils.merge(mask_utils.frPyObjects(poly, H, W))
    return {'size': [H, W], 'counts': r['counts'].decode()}


@pytest.fixture(scope='module')
def files(tmp_path_factory):
    "A small LVIS-format ground truth, perfect box and mask results for it, and its training-statistics table."
    d = tmp_path_factory.mktemp('rel')
    cats = [{'id': c, 'name': f'cat{c}', 'frequency': 'rcf'[c % 3]} for c in (1, 2, 3)]
    images = [{'id': i, 'height': H, 'width': W, 'file_name': f'{i}.jpg', 'neg_category_ids': [],
               'not_exhaustive_category_ids': []} for i in (1, 2, 3)]
    anns, bbox, segm = [], [], []
    for k, (i, c, b) in enumerate([(1, 1, (5, 5, 20, 10)), (1, 2, (30, 20, 25, 30)), (2, 3, (10, 10, 40, 40)),
                                   (3, 1, (2, 2, 10, 10)), (3, 2, (40, 30, 30, 20))], 1):
        poly = _poly(*b)
        area = float(mask_utils.area(mask_utils.merge(mask_utils.frPyObjects(poly, H, W))))
        anns.append({'id': k, 'image_id': i, 'category_id': c, 'bbox': list(map(float, b)), 'area': area,
                     'segmentation': poly})
        bbox.append({'image_id': i, 'category_id': c, 'bbox': list(map(float, b)), 'score': 0.9})
        segm.append({'image_id': i, 'category_id': c, 'segmentation': _rle(poly), 'score': 0.9})
    gt = {'images': images, 'annotations': anns, 'categories': cats}
    table = [{'id': c['id'], 'name': c['name'], 'instance_count': n, 'image_count': 1}
             for c, n in zip(cats, (3, 30, 300))]
    paths = {'gt': d / 'gt.json', 'bbox': d / 'bbox.json', 'segm': d / 'segm.json', 'stats': d / 'stats.json'}
    for key, obj in (('gt', gt), ('bbox', bbox), ('segm', segm), ('stats', table)):
        paths[key].write_text(json.dumps(obj))
    return {'dir': d, 'paths': paths, 'gt': gt, 'bbox': bbox, 'segm': segm}


def run(argv):
    "`simcal ARGV` in this process: (exit status, stderr)."
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try: code = main([str(a) for a in argv])
        except SystemExit as e: code = e.code
    return code, err.getvalue()


def _write(tmp_path, name, obj):
    p = tmp_path / name; p.write_text(json.dumps(obj)); return p


def _leftovers(folder):
    return sorted(p.name for p in Path(folder).iterdir()) if Path(folder).exists() else []


# ---------------------------------------------------------------------------------------------------------------------
# evaluate: bad files. (name, which file is changed, change, iou type, engine, what the message must hold)

def _results(change):
    def apply(f):
        r = copy.deepcopy(f['segm'] if 'segm' in change.__name__ else f['bbox']); change(r); return r
    return apply

def segm_garbage(r): r[2]['segmentation']['counts'] = 'garbage!'
def segm_past_image(r): r[2]['segmentation']['counts'] += '1'
def segm_unfinished(r): r[2]['segmentation']['counts'] += 'o'
def segm_negative_run(r): r[2]['segmentation']['counts'] = '0T3' + 'O'  # a 4th number: 'O' is -1 (a difference)
def bbox_negative_score(r): r[2]['score'] = -0.25
def bbox_unknown_image(r): r[2]['image_id'] = 99

def gt_duplicate_annotation_id(g): g['annotations'][3]['id'] = 2
def gt_duplicate_image_id(g): g['images'][2]['id'] = 1
def gt_duplicate_category_id(g): g['categories'][2]['id'] = 1
def gt_unknown_image(g): g['annotations'][3]['image_id'] = 9
def gt_unknown_category(g): g['annotations'][3]['category_id'] = 9
def gt_degenerate_box(g): g['annotations'][3]['bbox'][2] = 0.0
def gt_polygon_two_points(g): g['annotations'][3]['segmentation'] = [[1, 1, 5, 5]]
def gt_polygon_odd(g): g['annotations'][3]['segmentation'] = [[1, 1, 5, 1, 5, 5, 1]]
def gt_rle_garbage(g): g['annotations'][3]['segmentation'] = {'size': [H, W], 'counts': 'not an RLE!'}
def gt_rle_past_image(g): g['annotations'][3]['segmentation'] = {'size': [H, W], 'counts': [H * W, 7]}
def gt_rle_other_size(g): g['annotations'][3]['segmentation'] = {'size': [H, H], 'counts': [H * H]}

RESULT_CASES = [
    # undecodable RLE and counts past the image, through the fast reader, the exact path and the reference engine
    (segm_garbage, 'segm', 'hotcoco', ["results[2]", "field 'segmentation'", 'do not decode']),
    (segm_garbage, 'segm', 'lvis-api', ["results[2]", "field 'segmentation'", 'do not decode']),
    (segm_past_image, 'segm', 'hotcoco', ["results[2]", "field 'segmentation'", 'not the image']),
    (segm_past_image, 'segm', 'lvis-api', ["results[2]", "field 'segmentation'", 'not the image']),
    (segm_unfinished, 'segm', 'hotcoco', ["results[2]", "field 'segmentation'", 'ends inside a number']),
    (segm_negative_run, 'segm', 'lvis-api', ["results[2]", "field 'segmentation'", 'negative run length']),
    (bbox_negative_score, 'bbox', 'hotcoco', ["results[2]", "field 'score'", 'negative score', '--allow negative-scores']),
    (bbox_negative_score, 'bbox', 'lvis-api', ["results[2]", "field 'score'", 'negative score']),
    (bbox_unknown_image, 'bbox', 'hotcoco', ["results[2]", "field 'image_id'", 'unknown image id 99']),
]

GT_CASES = [
    (gt_duplicate_annotation_id, ["annotations[3] (id=2)", "field 'id'", 'duplicate id (also annotations[1])']),
    (gt_duplicate_image_id, ["images[2] (id=1)", "field 'id'", 'duplicate id']),
    (gt_duplicate_category_id, ["categories[2] (id=1)", "field 'id'", 'duplicate id']),
    (gt_unknown_image, ["annotations[3] (id=4)", "field 'image_id'", 'unknown image id 9']),
    (gt_unknown_category, ["annotations[3] (id=4)", "field 'category_id'", 'unknown category id 9']),
    (gt_degenerate_box, ["annotations[3] (id=4)", "field 'bbox'", 'degenerate box', '--allow degenerate-boxes']),
    (gt_polygon_two_points, ["annotations[3] (id=4)", "field 'segmentation'", 'at least 3 points']),
    (gt_polygon_odd, ["annotations[3] (id=4)", "field 'segmentation'", '7 coordinates']),
    (gt_rle_garbage, ["annotations[3] (id=4)", "field 'segmentation'", 'do not decode']),
    (gt_rle_past_image, ["annotations[3] (id=4)", "field 'segmentation'", f'cover {H * W + 7} pixels']),
    (gt_rle_other_size, ["annotations[3] (id=4)", "field 'segmentation'", 'differs from its image']),
]


@pytest.mark.parametrize('change,iou_type,engine,parts', RESULT_CASES,
                         ids=[f'{c[0].__name__}-{c[2]}' for c in RESULT_CASES])
def test_evaluate_bad_results(files, tmp_path, change, iou_type, engine, parts):
    res = _write(tmp_path, 'res.json', _results(change)(files))
    out = tmp_path / 'out' / 'metrics.json'
    code, err = run(['evaluate', files['paths']['gt'], res, '--iou-type', iou_type, '--engine', engine,
                     '--stats', files['paths']['stats'], '--out', out])
    assert code == 2 and err.count('\n') == 1 and str(res) in err, err
    for p in parts: assert p in err, (p, err)
    assert not out.parent.exists()


@pytest.mark.parametrize('change,parts', GT_CASES, ids=[c[0].__name__ for c in GT_CASES])
@pytest.mark.parametrize('command', ['evaluate', 'data stats'])
def test_bad_ground_truth(files, tmp_path, change, parts, command):
    "The same ground-truth fault, the same message, whichever command reads the file."
    g = copy.deepcopy(files['gt']); change(g)
    gt = _write(tmp_path, 'gt.json', g)
    out = tmp_path / 'metrics.json'
    if command == 'evaluate':
        argv = ['evaluate', gt, files['paths']['segm'], '--iou-type', 'segm', '--stats', files['paths']['stats'],
                '--out', out]
    else: argv = ['data', 'stats', gt]
    code, err = run(argv)
    assert code == 2 and err.count('\n') == 1 and str(gt) in err, err
    for p in parts: assert p in err, (p, err)
    assert _leftovers(tmp_path) == ['gt.json']


def test_allowed_checks_run_and_are_recorded(files, tmp_path):
    "What `--allow` names is kept as it is and recorded in the metrics; nothing else changes."
    g = copy.deepcopy(files['gt']); gt_degenerate_box(g)
    gt = _write(tmp_path, 'gt.json', g)
    out = tmp_path / 'm.json'
    code, err = run(['evaluate', gt, files['paths']['bbox'], '--iou-type', 'bbox', '--stats', files['paths']['stats'],
                     '--allow', 'degenerate-boxes', '--out', out])
    assert code == 0, err
    assert json.loads(out.read_text())['meta']['allow'] == ['degenerate-boxes']
    assert run(['data', 'stats', gt, '--allow', 'degenerate-boxes'])[0] == 0
    res = _write(tmp_path, 'neg.json', [dict(r, score=r['score'] - 1) for r in files['bbox']])
    code, err = run(['evaluate', files['paths']['gt'], res, '--iou-type', 'bbox', '--stats', files['paths']['stats'],
                     '--allow', 'negative-scores', '--out', out])
    m = json.loads(out.read_text())
    assert code == 0 and m['AP'] == 1.0 and m['meta']['allow'] == ['negative-scores'], err


def test_perfect_masks_score_one(files, tmp_path):
    "The good files of this table: perfect masks give AP 1 on both engines (so the refusals above are the faults')."
    for engine in ('hotcoco', 'lvis-api'):
        for protocol in ([], ['--protocol', 'coco']):
            out = tmp_path / f'{engine}.json'
            code, err = run(['evaluate', files['paths']['gt'], files['paths']['segm'], '--iou-type', 'segm',
                             '--engine', engine, '--stats', files['paths']['stats'], '--out', out] + protocol)
            assert code == 0, err
            m = json.loads(out.read_text())
            # LVIS by default: its images carry neg_category_ids, empty ones; COCO's engine takes annotations
            # without 'iscrowd' (optional in the format)
            assert m['AP'] == 1.0 and m['meta']['protocol'] == ('coco_lt' if protocol else 'lvis'), m['meta']


def test_undecodable_rle_does_not_hang_lvis_api(files, tmp_path):
    "In a fresh process, as a user runs it: lvis-api never sees the mask, the command ends at once with status 2."
    res = _write(tmp_path, 'res.json', _results(segm_garbage)(files))
    p = subprocess.run([sys.executable, '-m', 'simcal.cli', 'evaluate', str(files['paths']['gt']), str(res),
                        '--iou-type', 'segm', '--engine', 'lvis-api', '--stats', str(files['paths']['stats'])],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 2 and "results[2]" in p.stderr and "field 'segmentation'" in p.stderr, p.stderr
    assert 'Traceback' not in p.stderr


# ---------------------------------------------------------------------------------------------------------------------
# evaluate: training statistics of another dataset

def test_foreign_stats_refused_unless_allowed(files, tmp_path):
    out = tmp_path / 'm.json'
    gt, res = files['paths']['gt'], files['paths']['bbox']
    # a shipped table of another dataset: other ids and names
    code, err = run(['evaluate', gt, res, '--iou-type', 'bbox', '--stats', 'lvis_v0.5', '--out', out])
    assert code == 2 and "field 'categories'" in err and 'another dataset' in err and 'foreign-stats' in err, err
    assert not out.exists()
    # the same ids with other names
    renamed = json.loads(files['paths']['stats'].read_text()); renamed[1]['name'] = 'zebra'
    stats = _write(tmp_path, 'renamed.json', renamed)
    code, err = run(['evaluate', gt, res, '--iou-type', 'bbox', '--stats', stats, '--out', out])
    assert code == 2 and "'zebra'" in err and "'cat2'" in err and not out.exists(), err
    # a category missing from the statistics
    stats = _write(tmp_path, 'short.json', json.loads(files['paths']['stats'].read_text())[:2])
    code, err = run(['evaluate', gt, res, '--iou-type', 'bbox', '--stats', stats, '--out', out])
    assert code == 2 and '1 of the ground truth' in err and 'ids [3]' in err and not out.exists(), err
    # asked for explicitly: used, and recorded
    with pytest.warns(UserWarning, match='counted as 0 training instances'):
        code, err = run(['evaluate', gt, res, '--iou-type', 'bbox', '--stats', stats, '--allow', 'foreign-stats',
                         '--out', out])
    m = json.loads(out.read_text())
    assert code == 0 and m['meta']['allow'] == ['foreign-stats'] and m['per_category']['3']['train_instances'] == 0


# ---------------------------------------------------------------------------------------------------------------------
# options: checked when the command line is parsed; 0 is a value, never "the default"

OPTION_CASES = [
    (['--bin-count', '0'], '--bin-count', 'must be an integer >= 1'),
    (['--bin-base', '0'], '--bin-base', 'must be an integer >= 2'),
    (['--bin-base', '1'], '--bin-base', 'must be an integer >= 2'),
    (['--bin-base', 'ten'], '--bin-base', "got 'ten'"),
    (['--max-dets', '0'], '--max-dets', 'must be an integer >= 1'),
    (['--max-dets', '-300'], '--max-dets', 'must be an integer >= 1'),
    (['--allow', 'everything'], '--allow', "unknown check 'everything'"),
    (['--engine', 'fast'], '--engine', 'invalid choice'),
]


@pytest.mark.parametrize('extra,option,msg', OPTION_CASES, ids=[' '.join(c[0]) for c in OPTION_CASES])
def test_evaluate_bad_option_values(files, tmp_path, extra, option, msg):
    out = tmp_path / 'm.json'
    code, err = run(['evaluate', files['paths']['gt'], files['paths']['bbox'], '--iou-type', 'bbox', '--out', out]
                    + extra)
    assert code == 2 and f'argument {option}' in err and msg in err, err
    assert 'Traceback' not in err and not out.exists()


def test_evaluate_option_out_of_the_protocols_range(files, tmp_path):
    "A value only the chosen protocol refuses (COCO's AR@10 needs more than 10 detections): one line naming the option."
    out = tmp_path / 'm.json'
    code, err = run(['evaluate', files['paths']['gt'], files['paths']['bbox'], '--iou-type', 'bbox', '--protocol', 'coco',
                     '--stats', files['paths']['stats'], '--max-dets', '10', '--out', out])
    assert code == 2 and '--max-dets' in err and 'got 10' in err and err.count('\n') == 1 and not out.exists(), err


@pytest.mark.parametrize('argv,option,msg', [
    (['data', 'stats', 'lvis_v0.5', '--bin-count', '0'], '--bin-count', 'must be an integer >= 1'),
    (['data', 'stats', 'lvis_v0.5', '--bin-base', '0'], '--bin-base', 'must be an integer >= 2'),
    (['data', 'synth', '--out', '{tmp}/s', '--num-train', '0'], '--num-train', 'must be an integer >= 1'),
    (['data', 'synth', '--out', '{tmp}/s', '--image-size', '8'], '--image-size', 'must be an integer >= 32'),
    (['data', 'synth', '--out', '{tmp}/s', '--seed', '-1'], '--seed', 'must be an integer >= 0'),
], ids=['stats-bin-count-0', 'stats-bin-base-0', 'synth-num-train-0', 'synth-image-size-8', 'synth-seed--1'])
def test_data_bad_option_values(tmp_path, argv, option, msg):
    code, err = run([a.format(tmp=tmp_path) for a in argv])
    assert code == 2 and f'argument {option}' in err and msg in err, err
    assert _leftovers(tmp_path) == []


def test_explicit_bin_values_are_used(files, tmp_path):
    "`--bin-base 2 --bin-count 1` are used as given (not replaced by the protocol's)."
    out = tmp_path / 'm.json'
    code, err = run(['evaluate', files['paths']['gt'], files['paths']['bbox'], '--iou-type', 'bbox',
                     '--stats', files['paths']['stats'], '--bin-base', '2', '--bin-count', '1', '--out', out])
    m = json.loads(out.read_text())
    assert code == 0 and [b['label'] for b in m['bins']] == ['[0,2)', '[2,inf)'], err
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf): assert main(['data', 'stats', 'lvis_v0.5', '--bin-base', '2', '--bin-count', '1']) == 0
    assert 'f=2, m=1' in buf.getvalue() and '[2,inf)' in buf.getvalue()


# ---------------------------------------------------------------------------------------------------------------------
# outputs that cannot be written: refused before any work

def test_unwritable_outputs_refused_before_work(files, tmp_path):
    blocker = tmp_path / 'a_file'; blocker.write_text('x')
    for argv, option in [
            (['evaluate', files['paths']['gt'], files['paths']['bbox'], '--iou-type', 'bbox',
              '--stats', files['paths']['stats'], '--out', blocker / 'metrics.json'], '--out'),
            (['evaluate', files['paths']['gt'], files['paths']['bbox'], '--iou-type', 'bbox',
              '--stats', files['paths']['stats'], '--out', tmp_path], '--out'),
            (['data', 'coco-lt', '--instances', files['paths']['gt'], '--out', blocker / 'lt.json'], '--out'),
            (['data', 'synth', '--out', blocker, '--num-train', '1', '--num-val', '1'], '--out')]:
        code, err = run(argv)
        assert code == 2 and f'argument {option}' in err and ('not a folder' in err or 'is a ' in err), err
        assert 'Traceback' not in err
    assert _leftovers(tmp_path) == ['a_file'] and blocker.read_text() == 'x'


# ---------------------------------------------------------------------------------------------------------------------
# train, calibrate, test: a toy set, a tiny detector trained for 2 iterations, a calibration head of it
sys.path.insert(0, str(Path(__file__).parent))
from test_train import TINY, write_toy_lvis  # noqa: E402


@pytest.fixture(scope='module')
def pipe(tmp_path_factory):
    import torch
    from simcal.checkpoint import load_checkpoint
    d = tmp_path_factory.mktemp('pipe')
    ann, root = write_toy_lvis(d / 'toy', n_images=6)
    code, err = run(['train', '--train-ann', ann, '--image-root', root, '--out', d / 'det', '--iters', 2,
                     '--batch-per-gpu', 2, '--num-workers', 0, '--no-progress', '--set'] + TINY)
    assert code == 0, err
    det = d / 'det' / 'model_final.pth'
    code, err = run(['calibrate', '--detector', det, '--train-ann', ann, '--image-root', root, '--out', d / 'cal',
                     '--iters', 2, '--classes-per-iter', 2, '--rois-per-image', 64, '--no-progress'])
    assert code == 0, err
    other = d / 'other.pth'   # the same weights under another file: another SHA-256
    ck = load_checkpoint(det); ck['meta']['note'] = 'another run'; torch.save(ck, other)
    (d / 'text.pth').write_text('not a checkpoint\n'); (d / 'empty.pth').write_bytes(b'')
    foreign = _write(d, 'foreign_stats.json', [{'id': 100 + c, 'name': f'x{c}', 'instance_count': 5, 'image_count': 1}
                                                for c in (1, 2, 3)])
    return {'dir': d, 'ann': ann, 'root': root, 'det': det, 'cal': d / 'cal' / 'calibration.pt', 'other': other,
            'foreign': foreign}


def _cmd(pipe, tmp_path, kind):
    p = pipe
    data = ['--image-root', p['root'], '--no-progress']
    if kind == 'train':
        return ['train', '--train-ann', p['ann'], '--out', tmp_path / 'out', '--iters', 1, '--num-workers', 0, *data]
    if kind == 'calibrate':
        return ['calibrate', '--detector', p['det'], '--train-ann', p['ann'], '--out', tmp_path / 'out', '--iters', 2,
                '--classes-per-iter', 2, *data]
    return ['test', '--checkpoint', p['det'], '--ann', p['ann'], '--out', tmp_path / 'out', '--num-workers', 0, *data]


# (command, extra arguments, what the message must hold); {text}, {empty}, {other}, {cal}, {foreign}: the fixture's files
PIPELINE_CASES = [
    ('train', ['--batch-per-gpu', '0'], ['argument --batch-per-gpu', 'must be an integer >= 1']),
    ('train', ['--lr', '-1'], ['argument --lr', 'must be a finite number > 0']),
    ('train', ['--num-workers', '-1'], ['argument --num-workers', 'must be an integer >= 0']),
    ('train', ['--checkpoint-every', '-1'], ['argument --checkpoint-every', 'must be an integer >= 0']),
    ('train', ['--iters', '0'], ['argument --iters', 'must be an integer >= 1']),
    ('train', ['--device', 'tpu'], ['argument --device', "got 'tpu'"]),
    ('train', ['--set', 'fpn_channels=abc'], ['--set', 'fpn_channels must be an integer >= 1', "got 'abc'"]),
    ('train', ['--set', 'box_nms_thresh=2'], ['--set', 'box_nms_thresh must be a number in [0, 1]']),
    ('train', ['--set', 'bogus=1'], ['--set', 'unknown preset setting']),
    ('train', ['--set', 'lr_steps=[50]'], ['--set', 'lr_steps (50,) must increase within (0, 1]']),
    ('train', ['--allow', 'everything'], ['argument --allow', "unknown check 'everything'"]),
    ('calibrate', ['--rois-per-image', '0'], ['argument --rois-per-image', 'must be an integer >= 1']),
    ('calibrate', ['--positive-fraction', '2'], ['argument --positive-fraction', '> 0 and <= 1']),
    ('calibrate', ['--hidden', '0'], ['argument --hidden', 'must be an integer >= 1']),
    ('calibrate', ['--iters', '-1'], ['argument --iters', 'must be an integer >= 0']),
    ('calibrate', ['--checkpoint-every', '0'], ['argument --checkpoint-every', 'must be an integer >= 1']),
    ('calibrate', ['--tau', 'nan'], ['argument --tau', 'must be a finite number']),
    ('calibrate', ['--hflip-prob', '1.5'], ['argument --hflip-prob', 'must be a number in [0, 1]']),
    ('calibrate', ['--lr-steps', '2', '1'], ['--lr-steps', 'steps must increase, got [2, 1]']),
    ('calibrate', ['--hidden', '16'], ['--hidden', "'3fc_ft' needs hidden = the detector's representation size 32"]),
    ('calibrate', ['--detector', '{text}'], ['text.pth', 'not a readable PyTorch checkpoint']),
    ('calibrate', ['--detector', '{empty}'], ['empty.pth', 'the file is empty']),
    ('test', ['--score-thresh', '2'], ['argument --score-thresh', 'must be a number in [0, 1]']),
    ('test', ['--max-dets', '0'], ['argument --max-dets', 'must be an integer >= 1']),
    ('test', ['--batch-size', '0'], ['argument --batch-size', 'must be an integer >= 1']),
    ('test', ['--dual-threshold', '-1'], ['argument --dual-threshold', 'must be a finite number >= 0']),
    ('test', ['--mode', 'cal'], ['--mode', "'cal' combines the detector's head with a calibration head: pass --cal-head"]),
    ('test', ['--dual-threshold', '10'], ['--dual-threshold', 'pass --cal-head']),
    ('test', ['--checkpoint', '{text}'], ['text.pth', 'not a readable PyTorch checkpoint']),
    ('test', ['--checkpoint', '{empty}'], ['empty.pth', 'the file is empty']),
    ('test', ['--checkpoint', '{other}', '--cal-head', '{cal}'],
     ['calibration.pt', "field 'detector.sha256'", 'calibrated on another detector checkpoint', '--allow other-detector']),
    ('test', ['--stats', '{foreign}'], ['foreign_stats.json', 'training statistics of another dataset', '--allow foreign-stats']),
]


@pytest.mark.parametrize('kind, extra, parts', PIPELINE_CASES,
                         ids=[f'{k}{"".join(e[:1])}={e[1] if len(e) > 1 else ""}' for k, e, _ in PIPELINE_CASES])
def test_pipeline_bad_input(pipe, tmp_path, kind, extra, parts):
    names = {k: str(pipe[k]) for k in ('cal', 'other', 'foreign')}
    names.update(text=str(pipe['dir'] / 'text.pth'), empty=str(pipe['dir'] / 'empty.pth'))
    argv = _cmd(pipe, tmp_path, kind) + [a.format(**names) for a in extra]
    code, err = run(argv)
    assert code == 2, err
    for part in parts: assert part in err, (part, err)
    assert 'Traceback' not in err
    assert _leftovers(tmp_path / 'out') == []          # nothing written, not even the folder's first file


def test_train_into_a_finished_run_of_other_settings(pipe, tmp_path):
    "A finished run is never half-overwritten: other settings are refused (files untouched); --force replaces it whole."
    out = tmp_path / 'run'
    base = ['train', '--train-ann', pipe['ann'], '--image-root', pipe['root'], '--out', out, '--iters', 1,
            '--num-workers', 0, '--no-progress', '--checkpoint-every', 0, '--set'] + TINY
    assert run(base)[0] == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    code, err = run(base[:-len(TINY)] + TINY + ['--seed', 3])
    assert code == 2 and 'holds a finished training run with other settings (differs in train.seed)' in err, err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    (out / 'notes.txt').write_text('mine')            # not a file of the run: kept by --force
    code, err = run(base + ['--seed', 3, '--force'])
    assert code == 0, err
    assert json.loads((out / 'config.json').read_text())['train']['seed'] == 3
    assert sorted(p.name for p in out.iterdir()) == ['config.json', 'metrics.jsonl', 'model_final.pth', 'notes.txt']


def test_train_and_calibrate_refuse_corrupt_masks(pipe, tmp_path):
    "Training data with an undecodable RLE or a 2-point polygon fails before any step, naming record and field."
    gt = json.loads(Path(pipe['ann']).read_text())
    for change, msg in [(lambda a: a.update(segmentation=[[1, 1, 5, 5]]), 'at least 3 points'),
                        (lambda a: a.update(segmentation={'size': [a['bbox'][3], 9], 'counts': '~~~'}), "field 'segmentation'")]:
        bad = copy.deepcopy(gt); change(bad['annotations'][2])
        ann = _write(tmp_path, 'bad.json', bad)
        for argv in (['train', '--train-ann', ann, '--image-root', pipe['root'], '--out', tmp_path / 'out', '--iters', 1],
                     ['calibrate', '--detector', pipe['det'], '--train-ann', ann, '--image-root', pipe['root'],
                      '--out', tmp_path / 'out', '--iters', 1]):
            code, err = run(argv + ['--no-progress'])
            assert code == 2 and f"annotations[2] (id={bad['annotations'][2]['id']})" in err and msg in err, err
            assert _leftovers(tmp_path / 'out') == []


def test_calibrate_lr_steps_after_the_end_are_said(pipe, tmp_path):
    "A step at or after the end of a run is the first part of a longer schedule (resumed later): a note, not an error."
    code, err = run(_cmd(pipe, tmp_path, 'calibrate') + ['--lr-steps', '1', '10'])
    assert code == 0 and '--lr-steps 10 at or after the end of this run (2 iterations)' in err, err


def test_calibrate_zero_iterations_gives_the_detectors_head(pipe, tmp_path):
    "`--iters 0` is a point of the steps curve: the 3fc_ft head as initialised, i.e. the detector's own classifier."
    from simcal.calibration import load_calibration
    from simcal.checkpoint import load_checkpoint
    code, err = run(['calibrate', '--detector', pipe['det'], '--train-ann', pipe['ann'], '--image-root', pipe['root'],
                     '--out', tmp_path / 'c0', '--iters', 0, '--no-progress'])
    assert code == 0, err
    ck, det = load_calibration(tmp_path / 'c0' / 'calibration.pt'), load_checkpoint(pipe['det'])['model']
    assert ck['iteration'] == 0
    import torch
    for name, src in (('fc6', 'roi_heads.box_head.fc6'), ('fc7', 'roi_heads.box_head.fc7'),
                      ('cls_score', 'roi_heads.box_predictor.cls_score')):
        for p in ('weight', 'bias'):
            assert torch.equal(ck['head'][f'{name}.{p}'], det[f'{src}.{p}']), (name, p)
    # and `simcal test --mode cal` with it scores exactly as the detector alone
    outs = {}
    for mode in ('orig', 'cal'):
        argv = _cmd(pipe, tmp_path / mode, 'test') + ['--no-eval', '--max-dets', 20]
        if mode == 'cal': argv += ['--cal-head', tmp_path / 'c0' / 'calibration.pt', '--mode', 'cal']
        code, err = run(argv)
        assert code == 0, err
        outs[mode] = json.loads((tmp_path / mode / 'out' / 'results.json').read_text())
    assert len(outs['orig']) == len(outs['cal']) > 0
    for a, b in zip(outs['orig'], outs['cal']):
        assert (a['image_id'], a['category_id']) == (b['image_id'], b['category_id'])
        assert a['score'] == pytest.approx(b['score'], abs=1e-6)


def test_test_allowed_other_detector_and_empty_results(pipe, tmp_path):
    "The refusals above are explicit choices: allowed, the same files run; no detection at all is a result, not a fault."
    code, err = run(_cmd(pipe, tmp_path / 'a', 'test') + ['--cal-head', pipe['cal'], '--allow', 'other-detector',
                                                          '--checkpoint', pipe['other'], '--max-dets', 20])
    assert code == 0, err
    code, err = run(_cmd(pipe, tmp_path / 'b', 'test') + ['--score-thresh', '1'])
    assert code == 0, err
    out = tmp_path / 'b' / 'out'
    assert json.loads((out / 'results_segm.json').read_text()) == [] == json.loads((out / 'results.json').read_text())
    m = json.loads((out / 'metrics.json').read_text())
    assert m['segm']['AP'] == 0.0 == m['bbox']['AP']


def test_missing_image_met_by_a_loading_process_is_one_message(pipe, tmp_path):
    "An image missing from disk, met by a data-loading process mid-run: one message naming file, record and field."
    import shutil
    root = tmp_path / 'images'; shutil.copytree(pipe['root'], root)
    gt = json.loads(Path(pipe['ann']).read_text())
    victim = gt['images'][0]
    (root / victim['file_name']).unlink()
    code, err = run(['train', '--train-ann', pipe['ann'], '--image-root', root, '--out', tmp_path / 'out', '--iters', 4,
                     '--batch-per-gpu', 3, '--num-workers', 1, '--no-progress', '--set'] + TINY)
    assert code == 2 and 'image file not found' in err and "field 'file_name'" in err and f"id={victim['id']}" in err, err
    assert 'Traceback' not in err
