"""simcal.evaluate against the reference implementations (lvis-api 0.5.3, pycocotools) and the shipped fixtures."""
import copy, json, math, os, random, warnings
from pathlib import Path

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from simcal.core import InputError, save_json
from simcal.evaluate import (GroundTruth, LVIS_KEYS, COCO_KEYS, BinnedEvaluator, bin_metrics, evaluate_detections,
                             format_summary, lvis_api_numpy_compat, plot_bin_ap, save_figure, bin_ap_table,
                             train_instance_counts, cap_detections)

DATA = Path(__file__).resolve().parent / 'data'
LVIS_HEADLINE = LVIS_KEYS + ('AR@300', 'ARs@300', 'ARm@300', 'ARl@300')
TOL = 1e-9


# ---------------------------------------------------------------------------------------------------------------------
# LVIS-shaped data: a few dozen images and categories, boxes and polygon masks; detections are jittered ground truth
# plus false positives, some images with more than 300 detections, ties in score, negative and not-exhaustive
# categories, categories without ground truth, an image without detections, boxes of size 0 and empty masks.

def make_lvis_like(seed=0, n_img=36, n_cat=40, over_cap_every=4):
    rng = np.random.default_rng(seed)
    cats = [{'id': c, 'name': f'cat{c}', 'frequency': 'rcf'[c % 3], 'synset': f'cat{c}.n.01'} for c in range(1, n_cat + 1)]
    absent = set(range(n_cat - 5, n_cat + 1))  # never in the ground truth
    images, anns, dets = [], [], []
    for i in range(1, n_img + 1):
        h, w = int(rng.integers(80, 240)), int(rng.integers(80, 240))
        present = sorted(int(c) for c in rng.choice([c for c in range(1, n_cat + 1) if c not in absent],
                                                     size=int(rng.integers(1, 5)), replace=False))
        others = [c for c in range(1, n_cat + 1) if c not in present]
        neg = sorted(int(c) for c in rng.choice(others, size=4, replace=False))
        not_exhaustive = [present[0]] if rng.random() < 0.35 else []
        images.append({'id': i, 'height': h, 'width': w, 'file_name': f'{i:06d}.jpg', 'neg_category_ids': neg,
                       'not_exhaustive_category_ids': not_exhaustive})
        gts = []
        for c in present:
            for _ in range(int(rng.integers(1, 4))):
                bw, bh = rng.uniform(4, w * 0.6), rng.uniform(4, h * 0.6)
                x, y = rng.uniform(0, w - bw), rng.uniform(0, h - bh)
                poly = [x, y, x + bw, y, x + bw * 0.8, y + bh, x, y + bh * 0.7]
                area = float(mask_utils.area(mask_utils.merge(mask_utils.frPyObjects([poly], h, w))))
                anns.append({'id': len(anns) + 1, 'image_id': i, 'category_id': c, 'bbox': [x, y, bw, bh],
                             'area': area, 'segmentation': [poly]})
                gts.append((c, x, y, bw, bh))
        if i == n_img: continue  # an image without detections
        nd = 330 if i % over_cap_every == 1 else int(rng.integers(5, 80))
        local = present + neg + not_exhaustive
        for _ in range(nd):
            if gts and rng.random() < 0.35:
                c, x, y, bw, bh = gts[int(rng.integers(len(gts)))]
                x, y = x + rng.normal(0, 2), y + rng.normal(0, 2)
                bw, bh = bw * rng.uniform(0.8, 1.2), bh * rng.uniform(0.8, 1.2)
                if rng.random() < 0.2: c = int(rng.integers(1, n_cat + 1))
            else:
                c = int(rng.choice(local)) if rng.random() < 0.6 else int(rng.integers(1, n_cat + 1))
                bw, bh = rng.uniform(2, w * 0.5), rng.uniform(2, h * 0.5)
                x, y = rng.uniform(0, w - bw), rng.uniform(0, h - bh)
            x, y = max(0.0, x), max(0.0, y)
            bw, bh = min(bw, w - x), min(bh, h - y)
            if rng.random() < 0.01: bw = 0.0  # a box of size 0: dropped by LVIS after the cap
            poly = [x, y, x + bw, y + bh * 0.1, x + bw * 0.9, y + bh, x + bw * 0.1, y + bh * 0.9]
            rle = mask_utils.merge(mask_utils.frPyObjects([poly], h, w))
            dets.append({'image_id': i, 'category_id': c, 'bbox': [float(x), float(y), float(bw), float(bh)],
                         'score': float(np.round(rng.random(), 2)),  # rounded: many ties, also at the cap
                         'segmentation': {'size': [h, w], 'counts': rle['counts'].decode()}})
    random.Random(seed).shuffle(dets)  # images interleaved: the cap regroups them
    return {'images': images, 'annotations': anns, 'categories': cats}, dets


def lvis_api_reference(gt, dets, iou_type):
    "The official lvis-api on the data: headline metrics and per-category AP (mean precision > -1 at area all)."
    with lvis_api_numpy_compat():
        from lvis import LVIS, LVISResults, LVISEval
        G = LVIS.__new__(LVIS)
        import logging; G.logger = logging.getLogger('lvis'); G.dataset = copy.deepcopy(gt); G._create_index()
        ev = LVISEval(G, LVISResults(G, copy.deepcopy(dets)), iou_type)
        ev.run()
    p = ev.eval['precision']
    per_cat = {}
    for k, c in enumerate(ev.params.cat_ids):
        s = p[:, :, k, 0]
        per_cat[str(c)] = float(np.mean(s[s > -1])) if (s > -1).any() else None
    return {k: (None if v == -1 else float(v)) for k, v in ev.results.items()}, per_cat


def assert_close(ours, ref, tol=TOL, what=''):
    for k, v in ref.items():
        o = ours[k]
        if v is None: assert o is None, f"{what}{k}: {o} vs undefined"
        else: assert o is not None and abs(o - v) <= tol, f"{what}{k}: {o!r} vs {v!r}"


@pytest.fixture(scope='module')
def lvis_data():
    gt, dets = make_lvis_like()
    assert max(sum(1 for d in dets if d['image_id'] == i) for i in range(1, 37)) > 300
    return gt, dets


def stats_for(gt):
    return {c['id']: [3, 40, 400, 4000][c['id'] % 4] for c in gt['categories']}


@pytest.mark.parametrize('iou_type', ['bbox', 'segm'])
def test_parity_with_lvis_api(lvis_data, iou_type, tmp_path):
    gt, dets = lvis_data
    ref, ref_cat = lvis_api_reference(gt, dets, iou_type)
    assert sum(v is None for v in ref_cat.values()) >= 6  # categories without ground truth are undefined, not 0
    gp, rp = tmp_path / 'gt.json', tmp_path / 'res.json'
    save_json(gt, gp); save_json(dets, rp)
    runs = {'memory': evaluate_detections(gt, dets, iou_type, stats=stats_for(gt)),
            'file': evaluate_detections(gp, rp, iou_type, stats=stats_for(gt)),
            'lvis-api engine': evaluate_detections(gp, rp, iou_type, stats=stats_for(gt), engine='lvis-api')}
    assert runs['file']['meta']['results_reader'] == 'hotcoco'  # the fast path was taken
    for name, m in runs.items():
        assert_close(m, ref, what=f'{name} ')
        assert_close({c: v['AP'] for c, v in m['per_category'].items()}, ref_cat, what=f'{name} per-category ')
    # in fact they agree to the bit, with each other and with lvis-api's own summary
    for name in ('memory', 'file', 'lvis-api engine'):
        assert [runs[name][k] for k in LVIS_HEADLINE] == [ref[k] for k in LVIS_HEADLINE], name
        assert [runs[name]['per_category'][c]['AP'] for c in ref_cat] == list(ref_cat.values()), name
    assert not hasattr(np, 'float')
    # faster-coco-eval (capped by us) agrees to 1e-9
    assert_close(evaluate_detections(gt, dets, iou_type, stats=stats_for(gt), engine='faster-coco-eval'), ref)


def test_segm_area_from_masks_when_results_carry_no_boxes(lvis_data, tmp_path):
    gt, dets = lvis_data
    dets = [{k: v for k, v in d.items() if k != 'bbox'} for d in dets]
    ref, ref_cat = lvis_api_reference(gt, dets, 'segm')
    save_json(gt, tmp_path / 'gt.json'); save_json(dets, tmp_path / 'res.json')
    m = evaluate_detections(tmp_path / 'gt.json', tmp_path / 'res.json', 'segm', stats=stats_for(gt))
    assert m['meta']['results_reader'] == 'hotcoco'
    assert_close(m, ref)
    assert_close({c: v['AP'] for c, v in m['per_category'].items()}, ref_cat)
    assert_close(evaluate_detections(gt, dets, 'segm', stats=stats_for(gt)), ref)


def test_cap_order_is_lvis_api_order(lvis_data):
    gt, dets = lvis_data
    with lvis_api_numpy_compat():
        from lvis.results import LVISResults
        ours = cap_detections(copy.deepcopy(dets), 300)
        theirs = LVISResults.limit_dets_per_image(None, copy.deepcopy(dets), 300)
    assert [(d['image_id'], d['score'], d['bbox']) for d in ours] == [(d['image_id'], d['score'], d['bbox']) for d in theirs]


def test_records_that_need_the_exact_path_give_the_same_numbers(lvis_data, tmp_path):
    gt, dets = lvis_data
    dets = copy.deepcopy(dets)
    dets[5]['bbox'][0] = -0.5  # a negative x is valid, but sends the file down the record-by-record path
    save_json(gt, tmp_path / 'gt.json'); save_json(dets, tmp_path / 'res.json')
    m = evaluate_detections(tmp_path / 'gt.json', tmp_path / 'res.json', 'bbox', stats=stats_for(gt))
    assert m['meta']['results_reader'] == 'python'
    ref, _ = lvis_api_reference(gt, dets, 'bbox')
    assert_close(m, ref)


# ---------------------------------------------------------------------------------------------------------------------
# COCO protocol: the official fixtures and their expected values (pycocotools 2.0.11)

COCO100 = DATA / 'coco_val2014_100'


@pytest.mark.parametrize('iou_type', ['bbox', 'segm'])
@pytest.mark.parametrize('engine', ['hotcoco', 'pycocotools'])
def test_coco_val2014_100_against_pycocotools(iou_type, engine):
    exp = json.loads((COCO100 / 'expected_cocoeval_stats.json').read_text())[iou_type]
    res = COCO100 / f'instances_val2014_fake{iou_type}100_results.json'
    m = evaluate_detections(COCO100 / 'instances_val2014_100.json', res, iou_type, protocol='coco', engine=engine)
    for k, v in exp['pycocotools_2.0.11_rerun'].items():
        assert (m[k] is None) if v == -1 else abs(m[k] - v) <= TOL, (k, m[k], v)
    for c, v in exp['per_category_AP_area_all_maxDets100'].items():
        got = m['per_category'][c]['AP']
        assert (got is None) if v == -1 else abs(got - v) <= TOL, (c, got, v)
    # COCO-LT bins (f = 20) by the shipped COCO-LT training counts, chosen by default for the 80 COCO categories
    assert m['meta']['stats'] == 'coco_lt' and m['meta']['bin_base'] == 20
    # (the fixture names the first bin [1,20): COCO-LT's rarest class has 1 training instance; ours is [0,20))
    for b, (label, v) in zip(m['bins'], exp['coco_lt_simcal_bins_mean_AP'].items()):
        assert b['label'].split(',')[1] == label.split(',')[1], (b['label'], label)
        assert b['num_categories'] == v['n_classes'] and abs(b['AP'] - v['mean_AP']) <= TOL, (b, v)
    assert m['eAP'] == m['bAP'] and abs(m['bAP'] - np.mean([v['mean_AP'] for v in exp['coco_lt_simcal_bins_mean_AP'].values()])) <= TOL
    assert m['AR'] == m['AR100']


@pytest.mark.parametrize('iou_type', ['bbox', 'segm'])
def test_tiny_shapes_against_pycocotools(iou_type):
    d = DATA / 'tiny_shapes_3img'
    exp = json.loads((d / 'expected_cocoeval_stats.json').read_text())[iou_type]
    gt = json.loads((d / 'gt_dataset.json').read_text())
    dets = json.loads((d / 'dt_dataset.json').read_text())
    if iou_type == 'segm':  # as in the fixture's provenance: polygons merged into one RLE per detection, no box
        size = {im['id']: (im['height'], im['width']) for im in gt['images']}
        for r in dets:
            rle = mask_utils.merge(mask_utils.frPyObjects(r['segmentation'], *size[r['image_id']]))
            r['segmentation'] = {'size': rle['size'], 'counts': rle['counts'].decode()}
            del r['bbox']
    stats = {c['id']: 10 * c['id'] for c in gt['categories']}
    for engine in ('hotcoco', 'pycocotools'):
        m = evaluate_detections(gt, dets, iou_type, protocol='coco', stats=stats, engine=engine)
        for k, v in exp.items():
            assert (m[k] is None) if v == -1 else abs(m[k] - v) <= TOL, (engine, k, m[k], v)


# ---------------------------------------------------------------------------------------------------------------------
# Bins

def _box_ann(aid, img, cat, x, y, w, h):
    return {'id': aid, 'image_id': img, 'category_id': cat, 'bbox': [x, y, w, h], 'area': float(w * h),
            'segmentation': [[x, y, x + w, y, x + w, y + h, x, y + h]]}


def test_bins_by_hand():
    """Four evaluated categories, APs worked out by hand:
    cat 1 (2 train instances, bin [0,10)):      one object, found first                        -> AP 1
    cat 2 (5 train instances, bin [0,10)):      two objects, one found (rank 1), one missed   -> 51/101
    cat 3 (50 train instances, bin [10,100)):   one object, a false positive ranked above it  -> precision 1/2 at
                                                every recall point                            -> AP 1/2
    cat 4 (5000 train instances, bin [1000,inf)): one object, never detected                  -> AP 0
    cat 5 (500 train instances): no ground truth -> skipped; bin [100,1000) is empty (AP None, left out of bAP).
    Bins: (1 + 51/101)/2, 1/2, None, 0 -> bAP = mean of the three."""
    gt = {'images': [{'id': 1, 'height': 300, 'width': 300, 'neg_category_ids': [5], 'not_exhaustive_category_ids': []}],
          'annotations': [_box_ann(1, 1, 1, 0, 0, 50, 50), _box_ann(2, 1, 2, 100, 0, 50, 50),
                          _box_ann(3, 1, 2, 200, 0, 50, 50), _box_ann(4, 1, 3, 0, 100, 50, 50),
                          _box_ann(5, 1, 4, 100, 100, 50, 50)],
          'categories': [{'id': c, 'name': str(c), 'frequency': 'r'} for c in range(1, 6)]}
    dets = [{'image_id': 1, 'category_id': 1, 'bbox': [0, 0, 50, 50], 'score': 0.9},
            {'image_id': 1, 'category_id': 2, 'bbox': [100, 0, 50, 50], 'score': 0.9},
            {'image_id': 1, 'category_id': 3, 'bbox': [200, 200, 50, 50], 'score': 0.9},
            {'image_id': 1, 'category_id': 3, 'bbox': [0, 100, 50, 50], 'score': 0.8},
            {'image_id': 1, 'category_id': 5, 'bbox': [200, 200, 50, 50], 'score': 0.7}]
    m = evaluate_detections(gt, dets, 'bbox', stats={1: 2, 2: 5, 3: 50, 4: 5000, 5: 500})
    eps = np.spacing(1)  # both APIs compute precision as tp / (tp + fp + eps)
    ap = {'1': 1 / (1 + eps), '2': 51 / 101 / (1 + eps), '3': 1 / (2 + eps), '4': 0.0, '5': None}
    for c, v in ap.items():
        got = m['per_category'][c]['AP']
        assert (got is None) if v is None else abs(got - v) < 1e-12, (c, got, v)
    bins = [(1 + 51 / 101) / 2, 0.5, None, 0.0]
    assert [b['num_categories'] for b in m['bins']] == [2, 1, 0, 1]
    for b, v in zip(m['bins'], bins): assert (b['AP'] is None) if v is None else abs(b['AP'] - v) < 1e-12
    assert abs(m['bAP'] - ((1 + 51 / 101) / 2 + 0.5 + 0.0) / 3) < 1e-12
    assert [m['per_category'][c]['bin'] for c in '12345'] == [0, 0, 1, 3, 2]
    text = format_summary(m)
    assert 'bin [100,1000)' in text and 'n/a' in text and 'bAP: 0.4175' in text


def test_bins_over_the_shipped_lvis_v05_tables():
    train, src = train_instance_counts('lvis_v0.5')
    val = {r['id']: r['instance_count'] for r in json.loads((DATA / 'lvis_v0.5_val_category_stats.json').read_text())}
    present = {c: 0.0 if n > 0 else None for c, n in val.items()}  # AP defined exactly for the val-present categories
    bins, _ = bin_metrics(present, train, 10, 3)
    assert [b['num_categories'] for b in bins] == [67, 298, 284, 181]
    bins, _ = bin_metrics({c: 0.0 for c in train}, train, 10, 3)
    assert [b['num_categories'] for b in bins] == [294, 453, 302, 181]
    # the shipped tables read here agree with simcal.data.CategoryStats
    from simcal.data import CategoryStats
    for name in ('lvis_v0.5', 'lvis_v1', 'coco_lt'):
        assert train_instance_counts(name)[0] == CategoryStats.from_table(name).instance_counts, name


def test_default_stats_by_ground_truth(tmp_path):
    cats = [{'id': c, 'name': str(c), 'frequency': 'r'} for c in range(1, 1231)]
    gt = {'images': [{'id': 1, 'height': 10, 'width': 10, 'neg_category_ids': [], 'not_exhaustive_category_ids': []}],
          'annotations': [_box_ann(1, 1, 1, 0, 0, 5, 5)], 'categories': cats}
    m = evaluate_detections(gt, [{'image_id': 1, 'category_id': 1, 'bbox': [0, 0, 5, 5], 'score': 1.0}], 'bbox')
    assert m['meta']['stats'] == 'lvis_v0.5' and m['per_category']['1']['train_instances'] == 2
    gt['categories'] = cats[:1203]
    assert evaluate_detections(gt, [], 'bbox')['meta']['stats'] == 'lvis_v1'
    gt['categories'] = cats[:50]
    with pytest.raises(InputError, match='--stats'): evaluate_detections(gt, [], 'bbox')
    # a training annotation file is counted (through simcal.data.CategoryStats)
    train = {'images': gt['images'], 'categories': cats[:50],
             'annotations': [_box_ann(k, 1, 1 + k % 2, 0, 0, 5, 5) for k in range(1, 8)]}
    save_json(train, tmp_path / 'train.json')
    m = evaluate_detections(gt, [{'image_id': 1, 'category_id': 1, 'bbox': [0, 0, 5, 5], 'score': 1.0}], 'bbox',
                            stats=str(tmp_path / 'train.json'))
    assert m['per_category']['1']['train_instances'] == 3 and m['per_category']['2']['train_instances'] == 4


# ---------------------------------------------------------------------------------------------------------------------
# Bad input: an InputError naming the file, the record and the field, on every path; never a crash in an engine

BAD_CASES = [
    ('unknown image', lambda d: d[7].update(image_id=10 ** 6), 'image_id', 'unknown image id'),
    ('unknown category', lambda d: d[7].update(category_id=999), 'category_id', 'unknown category id'),
    ('NaN score', lambda d: d[7].update(score=float('nan')), 'score', 'finite number'),
    ('infinite score', lambda d: d[7].update(score=float('inf')), 'score', 'finite number'),
    ('negative width', lambda d: d[7]['bbox'].__setitem__(2, -3.0), 'bbox', 'negative box size'),
    ('negative width and height', lambda d: d[7].update(bbox=[5.0, 5.0, -3.0, -2.0]), 'bbox', 'negative box size'),
    ('missing score', lambda d: d[7].pop('score'), 'score', 'missing field'),
    ('missing bbox', lambda d: d[7].pop('bbox'), 'bbox', 'missing field'),
    ('string score', lambda d: d[7].update(score='0.5'), 'score', 'finite number'),
    ('mask size', lambda d: d[7]['segmentation'].update(size=[17, 19]), 'segmentation', 'differs from its image'),
    ('missing mask', lambda d: d[7].pop('segmentation'), 'segmentation', 'missing field'),
    ('polygon mask', lambda d: d[7].update(segmentation=[[1, 1, 5, 1, 5, 5]]), 'segmentation', 'compressed RLE'),
    # the masks must decode and fit their image (the reference APIs score such masks, lvis-api can hang on them)
    ('garbage RLE', lambda d: d[7]['segmentation'].update(counts='garbage!'), 'segmentation', 'do not decode'),
    ('RLE past the image', lambda d: d[7]['segmentation'].update(counts=d[7]['segmentation']['counts'] + '1'),
     'segmentation', 'pixels, not the image'),
    ('RLE ending inside a number', lambda d: d[7]['segmentation'].update(counts=d[7]['segmentation']['counts'] + 'o'),
     'segmentation', 'ends inside a number'),
    ('negative score', lambda d: d[7].update(score=-0.5), 'score', 'negative score'),
]


BAD_RUNS = [(t,) + c for t in ('bbox', 'segm') for c in BAD_CASES if not (t == 'bbox' and c[2] == 'segmentation')]


@pytest.mark.parametrize('iou_type,case,change,field,msg', BAD_RUNS, ids=[f'{r[0]}-{r[1]}' for r in BAD_RUNS])
def test_bad_results(lvis_data, tmp_path, iou_type, case, change, field, msg):
    "(masks are not read by box evaluation: the mask cases run for segm only)"
    gt, dets = lvis_data
    dets = copy.deepcopy(dets[:200]); change(dets)
    save_json(gt, tmp_path / 'gt.json'); save_json(dets, tmp_path / 'res.json')
    for engine in ('hotcoco', 'lvis-api'):
        for source in (tmp_path / 'res.json', dets):
            with pytest.raises(InputError) as e:
                evaluate_detections(tmp_path / 'gt.json', source, iou_type, stats=stats_for(gt), engine=engine)
            text = str(e.value)
            assert 'results[7]' in text and f"field '{field}'" in text and msg in text, text
            if isinstance(source, Path): assert str(source) in text


@pytest.mark.parametrize('iou_type', ['bbox', 'segm'])
def test_negative_scores_allowed_rank_as_given(lvis_data, tmp_path, iou_type):
    "--allow negative-scores: scores shifted below 0 keep their order, so every number is the same as unshifted."
    gt, dets = lvis_data
    dets = copy.deepcopy(dets[:400]); stats = stats_for(gt)
    ref = evaluate_detections(gt, dets, iou_type, stats=stats)
    shifted = [dict(d, score=d['score'] - 2.0) for d in dets]
    save_json(shifted, tmp_path / 'res.json')
    for source in (shifted, tmp_path / 'res.json'):
        with pytest.raises(InputError, match='negative score'): evaluate_detections(gt, source, iou_type, stats=stats)
        m = evaluate_detections(gt, source, iou_type, stats=stats, allow=['negative-scores'])
        assert m['meta']['allow'] == ['negative-scores']
        for k in LVIS_HEADLINE + ('bAP',): assert m[k] == ref[k], k


def test_malformed_files(lvis_data, tmp_path):
    gt, dets = lvis_data
    save_json(gt, tmp_path / 'gt.json')
    (tmp_path / 'res.json').write_text('[{"image_id": 1,')
    with pytest.raises(InputError, match='malformed JSON'):
        evaluate_detections(tmp_path / 'gt.json', tmp_path / 'res.json', 'bbox', stats=stats_for(gt))
    (tmp_path / 'res.json').write_text('{"annotations": []}')
    with pytest.raises(InputError, match='JSON list'):
        evaluate_detections(tmp_path / 'gt.json', tmp_path / 'res.json', 'bbox', stats=stats_for(gt))
    with pytest.raises(InputError, match='not found'):
        evaluate_detections(tmp_path / 'gt.json', tmp_path / 'nothing.json', 'bbox', stats=stats_for(gt))
    (tmp_path / 'gt2.json').write_text('[1, 2]')
    with pytest.raises(InputError, match='gt2.json'):
        evaluate_detections(tmp_path / 'gt2.json', dets, 'bbox', stats=stats_for(gt))


@pytest.mark.parametrize('iou_type', ['bbox', 'segm'])
def test_empty_results_give_zero_ap_with_a_warning(lvis_data, tmp_path, iou_type):
    gt, _ = lvis_data
    save_json([], tmp_path / 'res.json')
    for engine in ('hotcoco', 'lvis-api'):
        with pytest.warns(UserWarning, match='no detections'):
            m = evaluate_detections(gt, tmp_path / 'res.json', iou_type, stats=stats_for(gt), engine=engine)
        assert m['AP'] == 0.0 and m['bAP'] == 0.0 and m['meta']['num_detections'] == 0
        aps = [v['AP'] for v in m['per_category'].values()]
        assert set(aps) == {0.0, None}


# ---------------------------------------------------------------------------------------------------------------------
# Command line

def test_cli_writes_metrics(lvis_data, tmp_path, capsys):
    from simcal.cli import main
    gt, dets = lvis_data
    save_json(gt, tmp_path / 'gt.json'); save_json(dets, tmp_path / 'res.json')
    save_json([{'id': c, 'name': str(c), 'instance_count': n, 'image_count': 1} for c, n in stats_for(gt).items()],
              tmp_path / 'table.json')
    out = tmp_path / 'out' / 'metrics.json'
    assert main(['evaluate', str(tmp_path / 'gt.json'), str(tmp_path / 'res.json'), '--iou-type', 'segm',
                 '--stats', str(tmp_path / 'table.json'), '--out', str(out), '--bin-base', '5', '--bin-count', '2']) == 0
    printed = capsys.readouterr().out
    assert 'Average Precision' in printed and 'bin [0,5)' in printed and 'bAP' in printed
    m = json.loads(out.read_text())
    for k in LVIS_HEADLINE + ('AR', 'bins', 'bAP', 'per_category', 'meta'): assert k in m, k
    assert [b['label'] for b in m['bins']] == ['[0,5)', '[5,25)', '[25,inf)']
    assert m['meta']['iou_type'] == 'segm' and m['meta']['engine'] == 'hotcoco'
    assert set(m['per_category']['1']) >= {'AP', 'train_instances', 'bin', 'frequency'}
    # COCO fixture with the default table, the reference engine and a name for --stats
    out2 = tmp_path / 'coco.json'
    assert main(['evaluate', str(COCO100 / 'instances_val2014_100.json'),
                 str(COCO100 / 'instances_val2014_fakebbox100_results.json'), '--iou-type', 'bbox',
                 '--engine', 'pycocotools', '--stats', 'coco_lt', '--out', str(out2), '--quiet']) == 0
    m2 = json.loads(out2.read_text())
    assert abs(m2['AP'] - 0.5045806987249628) < TOL and 'eAP' in m2 and 'AR100' in m2


@pytest.mark.parametrize('change,msg', [(lambda d: d[3].update(score=float('nan')), "results[3]"),
                                        (lambda d: d[3].update(image_id=10 ** 6), "unknown image id"),
                                        (lambda d: d[3]['segmentation'].update(size=[3, 3]), "differs from its image")])
def test_cli_bad_input_exits_2_without_metrics(lvis_data, tmp_path, capsys, change, msg):
    from simcal.cli import main
    gt, dets = lvis_data
    dets = copy.deepcopy(dets); change(dets)
    save_json(gt, tmp_path / 'gt.json'); save_json(dets, tmp_path / 'res.json')
    save_json([{'id': c, 'name': f'cat{c}', 'instance_count': n, 'image_count': 1} for c, n in stats_for(gt).items()],
              tmp_path / 'table.json')
    out = tmp_path / 'metrics.json'
    code = main(['evaluate', str(tmp_path / 'gt.json'), str(tmp_path / 'res.json'), '--iou-type', 'segm',
                 '--stats', str(tmp_path / 'table.json'), '--out', str(out)])
    err = capsys.readouterr().err
    assert code == 2 and msg in err and 'res.json' in err, err
    assert not out.exists() and not list(tmp_path.glob('.metrics.json*'))
    # a ground truth without a matching shipped table and no --stats
    code = main(['evaluate', str(tmp_path / 'gt.json'), str(tmp_path / 'res.json'), '--iou-type', 'bbox', '--out', str(out)])
    assert code == 2 and '--stats' in capsys.readouterr().err and not out.exists()


# ---------------------------------------------------------------------------------------------------------------------
# In the test loop of a distributed run

def _dist_worker(rank, world, init_file, gt, parts, stats, out_dir):
    import torch.distributed as dist
    dist.init_process_group('gloo', init_method=f'file://{init_file}', rank=rank, world_size=world)
    try:
        ev = BinnedEvaluator(gt, iou_types=('bbox', 'segm'), stats=stats)
        for batch in parts[rank]: ev.process(batch)
        res = ev.evaluate()
        save_json({'rank': rank, 'metrics': res}, Path(out_dir) / f'rank{rank}.json')
    finally:
        dist.destroy_process_group()


def test_binned_evaluator_gathers_over_ranks(lvis_data, tmp_path):
    import torch.multiprocessing as mp
    gt, dets = lvis_data
    by_image = {}
    for d in dets: by_image.setdefault(d['image_id'], []).append(d)
    imgs = sorted(by_image)
    # rank 0 gets the even images, rank 1 the odd ones and (as a padding sampler would) a repeat of image imgs[0]
    parts = [[by_image[i] for i in imgs[0::2]], [by_image[i] for i in imgs[1::2]] + [by_image[imgs[0]]]]
    mp.spawn(_dist_worker, args=(2, str(tmp_path / 'init'), gt, parts, stats_for(gt), str(tmp_path)), nprocs=2)
    r0 = json.loads((tmp_path / 'rank0.json').read_text())['metrics']
    r1 = json.loads((tmp_path / 'rank1.json').read_text())['metrics']
    assert r1 is None
    for t in ('bbox', 'segm'):
        single = evaluate_detections(gt, dets, t, stats=stats_for(gt))
        for k in LVIS_HEADLINE + ('bAP',): assert r0[t][k] == single[k], (t, k)
        assert r0[t]['meta']['num_detections'] == len(dets)


def test_binned_evaluator_single_process(lvis_data):
    gt, dets = lvis_data
    ev = BinnedEvaluator(GroundTruth(gt), iou_types='bbox', stats=stats_for(gt))
    for k in range(0, len(dets), 97): ev.process(dets[k:k + 97])
    assert ev.evaluate()['bbox']['AP'] == evaluate_detections(gt, dets, 'bbox', stats=stats_for(gt))['AP']
    ev.reset()
    with pytest.warns(UserWarning, match='no detections'): assert ev.evaluate()['bbox']['AP'] == 0.0


# ---------------------------------------------------------------------------------------------------------------------
# Figure

def test_plot_bin_ap(lvis_data, tmp_path):
    import matplotlib; matplotlib.use('Agg')
    gt, dets = lvis_data
    named = {'baseline': evaluate_detections(gt, dets, 'bbox', stats=stats_for(gt)),
             'calibrated': evaluate_detections(gt, dets[: len(dets) // 2], 'bbox', stats=stats_for(gt)),
             'dual head': evaluate_detections(gt, dets, 'segm', stats=stats_for(gt))}
    fig = plot_bin_ap(named, title='AP per bin')
    ax = fig.axes[0]
    assert len(ax.patches) == 3 * 4 and ax.get_title() == 'AP per bin'
    heights = [p.get_height() for p in ax.patches]
    want = [b['AP'] * 100 for m in named.values() for b in m['bins']]
    assert np.allclose(heights, want, equal_nan=True)
    legend = [t.get_text() for t in fig.legends[0].get_texts()]  # below the axes, not over the bars
    assert legend[0].startswith('baseline') and f"bAP {named['baseline']['bAP'] * 100:.1f}" in legend[0]
    # the y axis fits the data in the unit shown (it ran to about 120 points whatever the APs were)
    top = np.nanmax(heights)
    assert 0 < top < ax.get_ylim()[1] <= 1.2 * top and ax.get_ylim()[0] == 0
    assert ax.get_xlim()[0] < -0.4 and ax.get_xlim()[1] > len(named['baseline']['bins']) - 0.6  # every bin shown
    fig_f = plot_bin_ap(named, points=False)
    assert np.nanmax([p.get_height() for p in fig_f.axes[0].patches]) < fig_f.axes[0].get_ylim()[1] <= 1.2 * top / 100
    import matplotlib.pyplot as plt
    _, own_ax = plt.subplots()
    assert plot_bin_ap(named, ax=own_ax).axes[0] is own_ax and own_ax.get_legend() is not None  # a given axes: its own legend
    png, js = save_figure(fig, tmp_path / 'fig' / 'bins.png', bin_ap_table(named))
    assert png.read_bytes()[:4] == b'\x89PNG' and json.loads(js.read_text())['dual head']['bAP'] == named['dual head']['bAP']
