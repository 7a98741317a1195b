"""Checks of simcal.synth on the default dataset (40 classes, 800 + 200 images of 128 x 128) and on small sets:
determinism, the long tail over the SimCal synth bins, val coverage, the official LVIS API (loading and a perfect-result
evaluation), exact polygons (pycocotools area and box), image files, federated fields, count fields, the simcal.data
loader and the command line.

Tolerances: `area` must equal pycocotools' area of the polygon exactly; `bbox` must equal the polygon's extent to
1e-6; the box of the rasterised mask (pycocotools `toBbox`) must lie within 2 pixels of `bbox` on every side (a
pixel belongs to the mask when its centre is inside the polygon, so a sharp vertex such as a star tip can reach up to
about 1.7 pixels beyond the last covered pixel centre).
"""
import hashlib, io, json, contextlib, time
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pycocotools.mask as mask_utils
import pytest
from PIL import Image

from simcal.core import PROTOCOLS, bin_index
from simcal.synth import (COLOURS, design_synthetic, frequency_group, make_synthetic, synth_summary,
                          format_synth_summary)

F, M = PROTOCOLS['synth'].bin_base, PROTOCOLS['synth'].bin_count
SMALL = dict(num_classes=12, num_train=60, num_val=20, image_size=96)


def _digest(root):
    "sha256 of every file under root, by relative path."
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(Path(root).rglob('*')) if p.is_file()}


@pytest.fixture(scope='module')
def default_set(tmp_path_factory):
    "The default dataset, generated once; with its generation times."
    root = tmp_path_factory.mktemp('default') / 'synth'
    wall, cpu = time.perf_counter(), time.process_time()
    paths = make_synthetic(root, seed=0, progress=False)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    train, val = (json.loads(p.read_text()) for p in (paths.train_ann, paths.val_ann))
    return paths, train, val, wall, cpu


def test_default_generation_time(default_set):
    paths, train, val, wall, cpu = default_set
    print(f"\ndefault synthetic set: {wall:.1f} s wall, {cpu:.1f} s CPU (one core)")
    print(format_synth_summary(synth_summary(paths)))
    assert not paths.reused
    # the budget is 30 s of one core; CPU time of this process does not count other people's load
    assert cpu < 30, cpu


def test_same_seed_same_bytes_other_seed_other_bytes(default_set, tmp_path):
    paths = default_set[0]
    again = make_synthetic(tmp_path / 'again', seed=0, progress=False)
    a, b = _digest(paths.root), _digest(again.root)
    assert len(a) == 1000 + 2 and a == b
    s0 = make_synthetic(tmp_path / 's0', seed=0, progress=False, **SMALL)
    s1 = make_synthetic(tmp_path / 's1', seed=1, progress=False, **SMALL)
    d0, d1 = _digest(s0.root), _digest(s1.root)
    assert d0.keys() == d1.keys()
    assert d0['annotations/train.json'] != d1['annotations/train.json']
    assert d0['annotations/val.json'] != d1['annotations/val.json']
    differing = sum(d0[k] != d1[k] for k in d0 if k.startswith('images/'))
    assert differing == SMALL['num_train'] + SMALL['num_val']


def test_every_bin_holds_several_classes(default_set):
    _, train, _, _, _ = default_set
    counts = Counter(a['category_id'] for a in train['annotations'])
    bins = Counter(bin_index(counts.get(c['id'], 0), F, M) for c in train['categories'])
    assert len(train['categories']) == 40
    assert all(bins[b] >= 5 for b in range(M + 1)), bins
    # the rarest classes have 1-3 training instances, the head reaches well beyond f^m
    assert min(counts.values()) == 1
    assert max(c for c in counts.values() if bin_index(c, F, M) == 0) <= 3
    assert max(counts.values()) > 10 * F ** M


def test_every_class_in_val_with_enough_instances(default_set):
    _, train, val, _, _ = default_set
    vc = Counter(a['category_id'] for a in val['annotations'])
    assert {c['id'] for c in val['categories']} == set(vc)
    assert min(vc.values()) >= 4, vc
    # flatter than train: the rarest class in val has at least 1/20 of the most frequent one
    assert min(vc.values()) * 20 >= max(vc.values())


def test_official_lvis_api_loads_and_scores_ground_truth_as_perfect(default_set):
    from lvis import LVIS, LVISEval, LVISResults
    paths, train, val, _, _ = default_set
    for p, d in ((paths.train_ann, train), (paths.val_ann, val)):
        gt = LVIS(str(p))
        assert len(gt.get_img_ids()) == len(d['images'])
        assert len(gt.get_ann_ids()) == len(d['annotations'])
        assert gt.get_cat_ids() == list(range(1, 41))
    # evaluating the val ground truth as detections must give AP 1 (lvis 0.5.3 needs np.float in its accumulate)
    if not hasattr(np, 'float'): np.float = float
    gt = LVIS(str(paths.val_ann))
    dets = [{'image_id': a['image_id'], 'category_id': a['category_id'], 'bbox': a['bbox'], 'score': 1.0}
            for a in val['annotations']]
    ev = LVISEval(gt, LVISResults(gt, dets), iou_type='bbox')
    with contextlib.redirect_stdout(io.StringIO()):
        ev.run()
    assert ev.results['AP'] == pytest.approx(1.0)
    for g in ('APr', 'APc', 'APf'): assert ev.results[g] == pytest.approx(1.0)


def test_polygons_areas_and_boxes(default_set):
    _, train, val, _, _ = default_set
    for d in (train, val):
        size = {im['id']: (im['height'], im['width']) for im in d['images']}
        for a in d['annotations']:
            h, w = size[a['image_id']]
            assert a['iscrowd'] == 0 and len(a['segmentation']) == 1 and len(a['segmentation'][0]) >= 6
            poly = np.reshape(a['segmentation'][0], (-1, 2))
            assert poly.min() >= 0 and poly[:, 0].max() <= w and poly[:, 1].max() <= h
            rle = mask_utils.merge(mask_utils.frPyObjects(a['segmentation'], h, w))
            assert float(mask_utils.area(rle)) == a['area'] and a['area'] > 0
            extent = [*poly.min(0), *(poly.max(0) - poly.min(0))]
            np.testing.assert_allclose(a['bbox'], extent, atol=1e-6)
            x, y, bw, bh = mask_utils.toBbox(rle)
            X, Y, W, H = a['bbox']
            assert max(abs(x - X), abs(y - Y), abs(x + bw - X - W), abs(y + bh - Y - H)) <= 2.0, (a['id'], a['bbox'])


def test_images_exist_with_stated_size_and_show_their_objects(default_set):
    paths, train, val, _, _ = default_set
    colour = {c['id']: c for c in train['categories']}
    rgb = {**{k: v[0] for k, v in COLOURS.items()}, **{v[1]: v[2] for v in COLOURS.values()}}
    solid = {c['id']: rgb[c['name'].split('_')[0]] for c in train['categories'] if c['name'].split('_')[1] == 'plain'}
    assert len(solid) >= 5
    for split, d in (('train', train), ('val', val)):
        on_disk = sorted(p.name for p in (paths.image_root / split).iterdir())
        assert on_disk == sorted(Path(im['file_name']).name for im in d['images'])
        anns = defaultdict(list)
        for a in d['annotations']: anns[a['image_id']].append(a)
        for im in d['images'][::10]:
            assert im['file_name'].startswith(f'{split}/') and im['coco_url'].endswith(im['file_name'])
            pil = Image.open(paths.image_root / im['file_name'])
            assert pil.format == 'PNG' and pil.mode == 'RGB' and pil.size == (im['width'], im['height']) == (128, 128)
            pix = np.asarray(pil).astype(float)
            # a plain object's pixels have its colour: the polygon is where the object was drawn
            for a in anns[im['id']]:
                if a['category_id'] not in solid: continue
                m = mask_utils.decode(mask_utils.frPyObjects(a['segmentation'], 128, 128))[..., 0].astype(bool)
                med = np.median(pix[m], axis=0)
                assert np.abs(med - solid[a['category_id']]).max() <= 30, (colour[a['category_id']]['name'], med)


def test_federated_fields(default_set):
    _, train, val, _, _ = default_set
    ids = {c['id'] for c in train['categories']}
    for d in (train, val):
        present = defaultdict(set)
        for a in d['annotations']: present[a['image_id']].add(a['category_id'])
        n_neg, n_ne = 0, 0
        for im in d['images']:
            neg, ne = set(im['neg_category_ids']), set(im['not_exhaustive_category_ids'])
            assert neg <= ids and not neg & present[im['id']], im['id']
            assert ne <= present[im['id']], im['id']   # not exhaustive: an annotated class with a missing instance
            n_neg += len(neg); n_ne += bool(ne)
        assert n_neg >= len(d['images']) and 0 < n_ne < 0.1 * len(d['images'])
    # every class is a verified negative somewhere in val (where its false positives count)
    assert set().union(*(im['neg_category_ids'] for im in val['images'])) == ids


def test_count_fields_and_frequency_groups(default_set):
    _, train, val, _, _ = default_set
    train_images = defaultdict(set)
    for a in train['annotations']: train_images[a['category_id']].add(a['image_id'])
    for d in (train, val):
        inst = Counter(a['category_id'] for a in d['annotations'])
        imgs = defaultdict(set)
        for a in d['annotations']: imgs[a['category_id']].add(a['image_id'])
        for c in d['categories']:
            assert c['instance_count'] == inst[c['id']] and c['image_count'] == len(imgs[c['id']]), c['name']
            # LVIS: frequency groups come from the training images (1-4 / 5-16 / >16 here), in both files
            assert c['frequency'] == frequency_group(len(train_images[c['id']]), F)
            assert c['synset'].endswith('.n.01') and c['name']
    assert [c['id'] for c in train['categories']] == list(range(1, 41))
    assert sorted(c['name'] for c in train['categories']) == [c['name'] for c in train['categories']]
    groups = Counter(c['frequency'] for c in train['categories'])
    assert all(groups[g] >= 5 for g in 'rcf'), groups
    img_ids = [im['id'] for d in (train, val) for im in d['images']]
    ann_ids = [a['id'] for d in (train, val) for a in d['annotations']]
    assert len(set(img_ids)) == len(img_ids) == 1000 and len(set(ann_ids)) == len(ann_ids)
    assert train['info']['parameters']['seed'] == 0 and train['info']['split'] == 'train'


def test_counts_follow_the_plan(default_set):
    _, train, val, _, _ = default_set
    design = design_synthetic(seed=0)
    for d, counts in ((train, design.train_counts), (val, design.val_counts)):
        inst = Counter(a['category_id'] for a in d['annotations'])
        assert [inst[cid] for cid in design.category_ids] == counts


def test_simcal_data_loads_an_item(default_set):
    data = pytest.importorskip('simcal.data')
    paths, train, _, _, _ = default_set
    ds = data.LVISDataset(paths.train_ann, paths.image_root, train=True)
    assert len(ds) == len(train['images'])
    image, target = ds[3]
    im = ds.image_info(3)
    anns = [a for a in train['annotations'] if a['image_id'] == im['id']]
    assert tuple(image.shape) == (3, 128, 128) and 0 <= float(image.min()) and float(image.max()) <= 1
    assert target['boxes'].shape == (len(anns), 4) and target['masks'].shape == (len(anns), 128, 128)
    boxes = sorted(tuple(np.round([x, y, x + w, y + h], 3)) for x, y, w, h in (a['bbox'] for a in anns))
    assert sorted(tuple(np.round(b, 3)) for b in target['boxes'].tolist()) == boxes
    assert sorted(target['masks'].sum((1, 2)).tolist()) == sorted(a['area'] for a in anns)
    names = {c['id']: c['name'] for c in train['categories']}
    assert sorted(ds.label_map.category_ids_of(target['labels'].tolist())) == sorted(a['category_id'] for a in anns)
    assert set(names) == set(ds.label_map.category_ids)


def test_command_line(tmp_path, capsys):
    from simcal.cli import main
    out = tmp_path / 'cli'
    args = ['data', 'synth', '--out', str(out), '--seed', '3', '--num-classes', '12', '--num-train', '60',
            '--num-val', '20', '--image-size', '96', '--no-progress']
    assert main(args) == 0
    text = capsys.readouterr().out
    assert 'wrote' in text and '[0,4)' in text and 'r/c/f' in text
    assert json.loads((out / 'annotations' / 'val.json').read_text())['info']['seed'] == 3
    assert main(args) == 0 and 'reusing' in capsys.readouterr().out
    assert main(args[:4] + ['--seed', '4'] + args[6:]) == 2       # other content, no --force
    assert '--force' in capsys.readouterr().err
    assert main(args[:4] + ['--seed', '4', '--force'] + args[6:]) == 0
    assert json.loads((out / 'annotations' / 'val.json').read_text())['info']['seed'] == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ['cli']   # no temporary folders left
