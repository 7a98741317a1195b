"""simcal.data: loaders on the real COCO fixture, LVIS-format files, bad inputs, COCO-LT rebuild, CLI."""
import contextlib, copy, io, json, math
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from simcal.core import InputError, table_path
from simcal.data import (LabelMap, CategoryStats, COCODataset, LVISDataset, load_detection_dataset, collate_detection,
                         rebuild_coco_lt, segmentation_to_mask)
from simcal.cli import main

DATA = Path(__file__).resolve().parent / 'data'
COCO_FILE = DATA / 'coco_val2014_100' / 'instances_val2014_100.json'


def blank(path, h, w, color=(0, 0, 0)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new('RGB', (w, h), color).save(path, quality=50)


def run_cli(argv):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err): rc = main(argv)
    return rc, out.getvalue(), err.getvalue()


# ---------------------------------------------------------------------------------------------- real COCO fixture
@pytest.fixture(scope='module')
def coco_raw():
    return json.loads(COCO_FILE.read_text())


@pytest.fixture(scope='module')
def coco_api():
    with contextlib.redirect_stdout(io.StringIO()): return COCO(str(COCO_FILE))


@pytest.fixture(scope='module')
def coco_images(tmp_path_factory, coco_raw):
    "Blank images of each record's size, named as the records say (no images ship with the fixture)."
    root = tmp_path_factory.mktemp('coco_img')
    for im in coco_raw['images']: blank(root / im['file_name'], im['height'], im['width'])
    return root


def test_coco_eval_mode_items(coco_raw, coco_images):
    ds = load_detection_dataset(COCO_FILE, coco_images)
    assert type(ds) is COCODataset
    assert len(ds) == len(coco_raw['images']) == 100
    assert ds.image_ids == [im['id'] for im in coco_raw['images']]
    assert ds.image_sizes() == [(im['height'], im['width']) for im in coco_raw['images']]
    # eval mode keeps every annotation of the file, crowd ones flagged
    n_ann = sum(len(ds._anns[k]) for k in range(len(ds)))
    assert n_ann == len(coco_raw['annotations']) == 839
    img, t = ds[0]
    im = coco_raw['images'][0]
    assert img.dtype == torch.float32 and tuple(img.shape) == (3, im['height'], im['width'])
    assert 0.0 <= float(img.min()) and float(img.max()) <= 1.0
    assert t['image_id'] == im['id']
    assert t['boxes'].dtype == torch.float32 and t['labels'].dtype == torch.int64 and t['masks'].dtype == torch.uint8
    anns = [a for a in coco_raw['annotations'] if a['image_id'] == im['id']]
    assert t['boxes'].shape == (len(anns), 4) and t['masks'].shape == (len(anns), im['height'], im['width'])


def test_targets_without_masks(coco_raw, coco_images):
    "masks=False (calibration, Props-GT): the same boxes, labels, crowd flags and recorded areas, no mask decoded."
    full = load_detection_dataset(COCO_FILE, coco_images, train=True)
    lean = load_detection_dataset(COCO_FILE, coco_images, train=True, masks=False)
    assert lean.image_ids == full.image_ids and len(lean) > 0
    for k in range(0, len(lean), 7):
        a, b = full.target(k), lean.target(k)
        assert 'masks' not in b and 'masks' in a
        for key in ('boxes', 'labels', 'iscrowd', 'area'): assert torch.equal(a[key], b[key]), key
        assert a['image_id'] == b['image_id']


def test_coco_boxes_xywh_to_xyxy_exact(coco_raw, coco_images):
    ds = COCODataset(COCO_FILE, coco_images)
    by_image = defaultdict(list)
    for a in coco_raw['annotations']: by_image[a['image_id']].append(a)
    checked = 0
    for k in (0, 7, 42, 99):
        t = ds.target(k)
        for row, a in zip(t['boxes'].tolist(), by_image[ds.image_ids[k]]):
            x, y, w, h = a['bbox']
            expect = np.array([x, y, x + w, y + h], dtype=np.float32).tolist()
            assert row == expect, (a['id'], row, expect)
            checked += 1
    assert checked > 10


def test_coco_masks_match_pycocotools(coco_raw, coco_api, coco_images):
    ds = COCODataset(COCO_FILE, coco_images)
    lm = ds.label_map
    rel_err, n_masks = [], 0
    for k in range(0, len(ds), 5):
        t = ds.target(k)
        anns = coco_api.loadAnns(coco_api.getAnnIds(imgIds=[ds.image_ids[k]]))
        assert len(anns) == len(t['masks'])
        for m, a, lab, area, crowd in zip(t['masks'], anns, t['labels'].tolist(), t['area'].tolist(),
                                          t['iscrowd'].tolist()):
            ref = coco_api.annToMask(a)
            assert int(m.sum()) == int(ref.sum()), a['id']
            assert np.array_equal(m.numpy(), ref)
            assert lm.category_id(lab) == a['category_id']
            assert crowd == a['iscrowd']
            assert area == pytest.approx(a['area'], rel=1e-6)
            if ref.sum() > 500: rel_err.append(abs(ref.sum() - a['area']) / a['area'])
            n_masks += 1
    assert n_masks > 100
    # decoded polygon masks and the annotated areas agree roughly (rasterisation differences only)
    assert np.median(rel_err) < 0.05 and max(rel_err) < 0.25


def test_coco_crowd_handling(coco_raw, coco_images):
    crowd = [a for a in coco_raw['annotations'] if a['iscrowd']]
    assert len(crowd) == 9
    ev = COCODataset(COCO_FILE, coco_images, train=False)
    tr = COCODataset(COCO_FILE, coco_images, train=True)
    a = crowd[0]
    k_ev = ev.image_ids.index(a['image_id'])
    t = ev.target(k_ev)
    assert t['iscrowd'].sum().item() == sum(1 for b in coco_raw['annotations']
                                            if b['image_id'] == a['image_id'] and b['iscrowd'])
    # the crowd (uncompressed) RLE decodes as pycocotools decodes it; COCO's crowd `area` is only close to it
    crowd_rows = t['iscrowd'].nonzero().flatten().tolist()
    with contextlib.redirect_stdout(io.StringIO()): api = COCO(str(COCO_FILE))
    ref = api.annToMask(api.anns[a['id']])
    assert any(np.array_equal(t['masks'][r].numpy(), ref) for r in crowd_rows)
    assert abs(int(ref.sum()) - a['area']) / a['area'] < 0.15
    # train mode: no crowd in any target; the image keeps only its non-crowd annotations
    assert all(tr.target(k)['iscrowd'].sum().item() == 0 for k in range(len(tr)))
    if a['image_id'] in tr.image_ids:
        t2 = tr.target(tr.image_ids.index(a['image_id']))
        n_plain = sum(1 for b in coco_raw['annotations'] if b['image_id'] == a['image_id'] and not b['iscrowd']
                      and b['bbox'][2] >= 1 and b['bbox'][3] >= 1)
        assert len(t2['labels']) == n_plain
    # train mode keeps exactly the images with a usable (non-crowd, >= 1 px) box and a side >= 32
    usable = {b['image_id'] for b in coco_raw['annotations']
              if not b['iscrowd'] and b['bbox'][2] >= 1 and b['bbox'][3] >= 1}
    expect = [im['id'] for im in coco_raw['images'] if im['id'] in usable and min(im['height'], im['width']) >= 32]
    assert tr.image_ids == expect
    # statistics count non-crowd annotations only
    assert sum(ev.stats.instance_count) == len(coco_raw['annotations']) - 9


def test_coco_label_map_round_trip(coco_raw, coco_images):
    ids = sorted(c['id'] for c in coco_raw['categories'])
    assert len(ids) == 80 and ids[-1] == 90 and ids != list(range(1, 81))
    ds = COCODataset(COCO_FILE, coco_images)
    lm = ds.label_map
    assert lm.num_classes == 81 and len(lm) == 80
    assert lm.labels(ids) == list(range(1, 81))
    assert lm.category_ids_of(range(1, 81)) == ids
    assert lm == LabelMap.from_file(COCO_FILE) == CategoryStats.from_table(COCO_FILE).label_map
    assert lm.label_names[1] == 'person' and lm.label_names[80] == 'toothbrush'
    with pytest.raises(KeyError): lm.label(12)     # COCO has no category 12


def test_coco_class_to_indices(coco_api, coco_images):
    ds = COCODataset(COCO_FILE, coco_images, train=True)
    c2i = ds.class_to_indices()
    pos = {iid: k for k, iid in enumerate(ds.image_ids)}
    expect = {}
    for cid in coco_api.getCatIds():
        imgs = {a['image_id'] for a in coco_api.loadAnns(coco_api.getAnnIds(catIds=[cid], iscrowd=False))
                if a['bbox'][2] >= 1 and a['bbox'][3] >= 1}
        idx = sorted(pos[i] for i in imgs if i in pos)
        if idx: expect[ds.label_map.label(cid)] = idx
    assert c2i == expect
    # every listed image really holds the label
    for lab, idx in list(c2i.items())[:10]:
        for k in idx: assert lab in ds.target(k)['labels'].tolist()


def test_dataloader_and_mask_rcnn_forward(coco_images):
    "Items go through a DataLoader and torchvision's Mask R-CNN training step as they are."
    from torchvision.models.detection import maskrcnn_resnet50_fpn
    torch.manual_seed(0)
    ds = COCODataset(COCO_FILE, coco_images, train=True)
    dl = torch.utils.data.DataLoader(ds, batch_size=2, shuffle=False, collate_fn=collate_detection)
    images, targets = next(iter(dl))
    assert isinstance(images, list) and isinstance(targets, list) and len(images) == 2
    model = maskrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=ds.label_map.num_classes,
                                  min_size=128, max_size=192)
    model.train()
    losses = model(images, targets)
    assert {'loss_classifier', 'loss_box_reg', 'loss_mask'} <= set(losses)
    assert all(torch.isfinite(v) for v in losses.values())


# ---------------------------------------------------------------------------------------------- LVIS-format files
def lvis_file(tmp_path, v1=True):
    "Four images (one without annotations), three categories, LVIS image-level fields."
    def img(i, split, h, w):
        r = {'id': i, 'height': h, 'width': w, 'neg_category_ids': [3], 'not_exhaustive_category_ids': [1],
             'license': 1, 'flickr_url': 'http://farm.example/x.jpg'}
        if v1: r['coco_url'] = f'http://images.cocodataset.org/{split}/{i:012d}.jpg'
        else: r['file_name'] = f'{i:012d}.jpg'
        return r
    images = [img(5, 'train2017', 48, 64), img(6, 'val2017', 64, 48), img(8, 'val2017', 40, 40),
              img(9, 'train2017', 40, 40)]
    poly = lambda x, y, w, h: [[x, y, x + w, y, x + w, y + h, x, y + h]]
    anns = [(1, 5, 2, [2, 3, 10, 5]), (2, 5, 1, [20, 20, 4, 4]), (3, 6, 2, [0, 0, 30, 40]), (4, 8, 3, [5, 5, 10, 10]),
            (5, 8, 2, [1, 1, 3, 3]), (6, 6, 2, [10, 10, 5, 5])]
    data = {'info': {'description': 'test'}, 'licenses': [],
            'images': images,
            'annotations': [{'id': k, 'image_id': i, 'category_id': c, 'bbox': b, 'area': b[2] * b[3],
                             'segmentation': poly(*b)} for k, i, c, b in anns],
            'categories': [{'id': 1, 'name': 'a', 'frequency': 'r', 'synset': 'a.n.01', 'image_count': 1,
                            'instance_count': 1},
                           {'id': 2, 'name': 'b', 'frequency': 'f', 'synset': 'b.n.01', 'image_count': 3,
                            'instance_count': 4},
                           {'id': 3, 'name': 'c', 'frequency': 'c', 'synset': 'c.n.01', 'image_count': 1,
                            'instance_count': 1}]}
    path = tmp_path / ('lvis_v1_small.json' if v1 else 'lvis_v05_small.json')
    path.write_text(json.dumps(data))
    root = tmp_path / 'images'
    for im in images:
        rel = im['coco_url'].split('/', 3)[-1] if v1 else im['file_name']
        blank(root / rel, im['height'], im['width'])
    return path, root, data


def test_lvis_v1_paths_and_fields(tmp_path):
    path, root, data = lvis_file(tmp_path, v1=True)
    ds = load_detection_dataset(path, root)
    assert type(ds) is LVISDataset
    assert [ds.image_path(k) for k in range(len(ds))] == [
        root / 'train2017/000000000005.jpg', root / 'val2017/000000000006.jpg', root / 'val2017/000000000008.jpg',
        root / 'train2017/000000000009.jpg']
    img, t = ds[1]
    assert tuple(img.shape) == (3, 64, 48)
    assert t['boxes'].tolist() == [[0, 0, 30, 40], [10, 10, 15, 15]]
    assert t['masks'][0].sum().item() == 30 * 40 and t['masks'][1].sum().item() == 25
    assert ds.image_info(0)['neg_category_ids'] == [3]
    assert ds.stats.instance_counts == {1: 1, 2: 4, 3: 1}
    assert ds.stats.frequency_groups() == {'r': [1], 'c': [3], 'f': [2]}
    assert ds.check_images(check_sizes=True) == 4
    # forcing file_name on a v1 file (no file_name) is an error naming the record and the field
    with pytest.raises(InputError, match=r"images\[0\] \(id=5\): field 'file_name'"):
        LVISDataset(path, root, path_field='file_name')


def test_lvis_v05_file_name_paths(tmp_path):
    path, root, _ = lvis_file(tmp_path, v1=False)
    ds = LVISDataset(path, root)
    assert ds.image_path(2) == root / '000000000008.jpg'
    assert ds[2][1]['labels'].tolist() == [3, 2]


def test_lvis_class_to_indices_and_train_filter(tmp_path):
    path, root, data = lvis_file(tmp_path)
    ev = LVISDataset(path, root)
    assert ev.class_to_indices() == {1: [0], 2: [0, 1, 2], 3: [2]}
    tr = LVISDataset(path, root, train=True)
    assert tr.image_ids == [5, 6, 8]                       # image 9 has no annotations
    assert tr.class_to_indices() == {1: [0], 2: [0, 1, 2], 3: [2]}
    # a box below 1 pixel is dropped in train mode, kept in eval mode
    d = copy.deepcopy(data)
    d['annotations'][3]['bbox'] = [5, 5, 0.5, 10]
    p2 = tmp_path / 'thin.json'; p2.write_text(json.dumps(d))
    assert LVISDataset(p2, root, train=True).class_to_indices() == {1: [0], 2: [0, 1, 2]}
    assert LVISDataset(p2, root).class_to_indices()[3] == [2]
    # zero-size boxes are refused unless allowed; allowed, an image holding only such boxes is dropped in train mode
    d['annotations'][0]['bbox'] = [2, 3, 0, 5]; d['annotations'][1]['bbox'] = [20, 20, 4, 0]
    p2.write_text(json.dumps(d))
    with pytest.raises(InputError, match=r"annotations\[0\] \(id=1\): field 'bbox': degenerate box"):
        LVISDataset(p2, root, train=True)
    assert LVISDataset(p2, root, train=True, allow=['degenerate-boxes']).image_ids == [6, 8]


def test_transforms_applied(tmp_path):
    path, root, _ = lvis_file(tmp_path)
    def flip(image, target):
        w = image.shape[-1]
        b = target['boxes'].clone(); b[:, [0, 2]] = w - target['boxes'][:, [2, 0]]
        return image.flip(-1), {**target, 'boxes': b, 'masks': target['masks'].flip(-1)}
    ds = LVISDataset(path, root, transforms=flip)
    _, t = ds[0]
    assert t['boxes'].tolist()[0] == [64 - 12, 3, 64 - 2, 8]


def test_external_label_map(tmp_path):
    path, root, _ = lvis_file(tmp_path)
    ds = LVISDataset(path, root, label_map=LabelMap([1, 2, 3, 4]))
    assert ds.label_map.num_classes == 5
    with pytest.raises(InputError, match='not in the given label map'):
        LVISDataset(path, root, label_map=LabelMap([1, 2]))


# ---------------------------------------------------------------------------------------------- category statistics
def test_stats_tables():
    lvis = CategoryStats.from_table('lvis_v0.5')
    assert lvis.bin_sizes(10, 3) == [294, 453, 302, 181]
    assert lvis.bin_sizes(10, 3, among=CategoryStats.from_table('lvis_v0.5_val').present()) == [67, 298, 284, 181]
    bins = lvis.bin_of(10, 3)
    assert sum(bins[c] == 0 for c in lvis.ids) == 294 and bins[1] == 0 and bins[4] == 3   # acorn: 2, airplane: 1978
    v1 = CategoryStats.from_table('lvis_v1')
    assert len(v1) == 1203 and sum(v1.instance_count) == 1270141
    assert {g: len(v) for g, v in v1.frequency_groups().items()} == {'r': 337, 'c': 461, 'f': 405}
    lt = CategoryStats.from_table('coco_lt')
    assert lt.bin_sizes(20, 3) == [4, 24, 32, 20] and sum(lt.instance_count) == 666493
    assert lt.frequency_groups() == {'r': [], 'c': [], 'f': []}
    assert lt.names_by_id[90] == 'toothbrush' and lt.instance_counts[90] == 15
    # a table given by path reads the same as the shipped one
    same = CategoryStats.from_table(DATA / 'lvis_v0.5_categories_train_stats.json')
    assert same.instance_counts == lvis.instance_counts and same.frequency == lvis.frequency
    assert 'r/c/f 454/461/315' in repr(lvis)
    with pytest.raises(ValueError, match='not in these statistics'): lt.bin_sizes(20, 3, among={1, 12})


def test_stats_counted_from_annotations(tmp_path):
    path, _, data = lvis_file(tmp_path)
    s = CategoryStats.from_table(path)
    assert s.instance_counts == {1: 1, 2: 4, 3: 1} and s.image_counts == {1: 1, 2: 3, 3: 1}
    assert s.frequency == ('r', 'f', 'c')
    # COCO crowd annotations are not instances
    d = copy.deepcopy(data)
    for c in d['categories']: c.pop('frequency')
    for im in d['images']: im.pop('neg_category_ids'); im.pop('not_exhaustive_category_ids')
    d['annotations'][2]['iscrowd'] = d['annotations'][5]['iscrowd'] = 1     # both category-2 annotations of image 6
    p = tmp_path / 'coco_like.json'; p.write_text(json.dumps(d))
    s = CategoryStats.from_table(p)
    assert s.instance_counts == {1: 1, 2: 2, 3: 1} and s.image_counts == {1: 1, 2: 2, 3: 1} and not s.has_frequency
    assert type(load_detection_dataset(p, tmp_path)) is COCODataset


# ---------------------------------------------------------------------------------------------- bad inputs
def _mutate(data, how):
    d = copy.deepcopy(data); how(d); return d

BAD_CASES = [
    # (name, mutation, substrings the message must hold besides the file name)
    ('no images key', lambda d: d.pop('images'), ["missing top-level key 'images'"]),
    ('no annotations key', lambda d: d.pop('annotations'), ["missing top-level key 'annotations'"]),
    ('no categories key', lambda d: d.pop('categories'), ["missing top-level key 'categories'"]),
    ('no bbox', lambda d: d['annotations'][2].pop('bbox'), ["annotations[2] (id=3)", "field 'bbox'", 'missing']),
    ('no category_id', lambda d: d['annotations'][1].pop('category_id'), ["annotations[1] (id=2)", "field 'category_id'"]),
    ('no image_id', lambda d: d['annotations'][0].pop('image_id'), ["annotations[0] (id=1)", "field 'image_id'"]),
    ('no segmentation', lambda d: d['annotations'][4].pop('segmentation'), ["annotations[4] (id=5)", "field 'segmentation'"]),
    ('bbox 3 numbers', lambda d: d['annotations'][0].update(bbox=[1, 2, 3]), ["annotations[0] (id=1)", "field 'bbox'", '4 finite']),
    ('bbox string', lambda d: d['annotations'][0].update(bbox=[1, 2, '3', 4]), ["annotations[0] (id=1)", "field 'bbox'"]),
    ('bbox NaN', lambda d: d['annotations'][0].update(bbox=[1, 2, float('nan'), 4]), ["annotations[0] (id=1)", "field 'bbox'"]),
    ('bbox inf', lambda d: d['annotations'][0].update(bbox=[1, float('inf'), 3, 4]), ["annotations[0] (id=1)", "field 'bbox'"]),
    ('bbox negative w', lambda d: d['annotations'][3].update(bbox=[1, 2, -3, 4]), ["annotations[3] (id=4)", "field 'bbox'", '>= 0']),
    ('bbox negative h', lambda d: d['annotations'][3].update(bbox=[1, 2, 3, -4]), ["annotations[3] (id=4)", "field 'bbox'", '>= 0']),
    ('unknown category', lambda d: d['annotations'][5].update(category_id=77), ["annotations[5] (id=6)", "field 'category_id'", '77']),
    ('unknown image', lambda d: d['annotations'][5].update(image_id=1234), ["annotations[5] (id=6)", "field 'image_id'", '1234']),
    ('duplicate image id', lambda d: d['images'][1].update(id=5), ["images[1] (id=5)", "field 'id'", 'duplicate']),
    ('duplicate annotation id', lambda d: d['annotations'][4].update(id=1), ["annotations[4] (id=1)", "field 'id'", 'duplicate']),
    ('duplicate category id', lambda d: d['categories'][2].update(id=1), ["categories[2] (id=1)", "field 'id'", 'duplicate']),
    ('segmentation number', lambda d: d['annotations'][1].update(segmentation=5), ["annotations[1] (id=2)", "field 'segmentation'"]),
    ('RLE without size', lambda d: d['annotations'][1].update(segmentation={'counts': 'abc'}), ["annotations[1] (id=2)", "field 'segmentation'"]),
    ('iscrowd 2', lambda d: d['annotations'][1].update(iscrowd=2), ["annotations[1] (id=2)", "field 'iscrowd'"]),
    ('bad frequency', lambda d: d['categories'][0].update(frequency='x'), ["categories[0] (id=1)", "field 'frequency'"]),
    ('image without height', lambda d: d['images'][2].pop('height'), ["images[2] (id=8)", "field 'height'"]),
    ('image without path', lambda d: d['images'][3].pop('coco_url'), ["images[3] (id=9)", "field 'coco_url'"]),
    ('coco_url unusable', lambda d: d['images'][3].update(coco_url='x.jpg'), ["images[3] (id=9)", "field 'coco_url'"]),
    # the checks every reader shares (simcal.checks.check_ground_truth)
    ('degenerate box', lambda d: d['annotations'][3].update(bbox=[1, 2, 0, 4]), ["annotations[3] (id=4)", "field 'bbox'", 'degenerate box', '--allow degenerate-boxes']),
    ('polygon of 2 points', lambda d: d['annotations'][0].update(segmentation=[[1, 1, 5, 1]]), ["annotations[0] (id=1)", "field 'segmentation'", 'at least 3 points']),
    ('polygon odd coordinates', lambda d: d['annotations'][0].update(segmentation=[[1, 1, 5, 1, 5, 5, 1]]), ["annotations[0] (id=1)", "field 'segmentation'", '7 coordinates']),
    ('no polygon', lambda d: d['annotations'][0].update(segmentation=[]), ["annotations[0] (id=1)", "field 'segmentation'", 'no polygon']),
    ('annotation id 0', lambda d: d['annotations'][2].update(id=0), ["annotations[2] (id=0)", "field 'id'", 'positive integer']),
    ('unknown negative category', lambda d: d['images'][0].update(neg_category_ids=[77]), ["images[0] (id=5)", "field 'neg_category_ids'", '77']),
]

def test_statistics_read_box_only_files_as_the_evaluator_does(tmp_path):
    "Counting instances needs no masks: a file without segmentations is read by `data stats` as by `evaluate`."
    path, root, data = lvis_file(tmp_path)
    p = tmp_path / 'boxes.json'
    p.write_text(json.dumps(_mutate(data, lambda d: [a.pop('segmentation') for a in d['annotations']])))
    assert CategoryStats.from_table(p).instance_counts == {1: 1, 2: 4, 3: 1}
    with pytest.raises(InputError, match="field 'segmentation'"): LVISDataset(p, root)


@pytest.mark.parametrize('name,how,parts', BAD_CASES, ids=[c[0] for c in BAD_CASES])
def test_bad_annotation_file(tmp_path, name, how, parts):
    path, root, data = lvis_file(tmp_path)
    bad = tmp_path / 'bad_ann.json'
    bad.write_text(json.dumps(_mutate(data, how)))
    with pytest.raises(InputError) as e: LVISDataset(bad, root)
    msg = str(e.value)
    assert str(bad) in msg
    for p in parts: assert p in msg, (p, msg)
    # the same file through the statistics reader gives the same error (image records aside)
    if not name.startswith('image') and not name.startswith('coco_url') and name != 'no segmentation':
        with pytest.raises(InputError) as e2: CategoryStats.from_table(bad)
        assert str(e2.value) == msg


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(InputError, match='not found') as e: LVISDataset(tmp_path / 'nope.json', tmp_path)
    assert 'nope.json' in str(e.value)
    p = tmp_path / 'broken.json'; p.write_text('{"images": [1, 2,')
    with pytest.raises(InputError, match='malformed JSON at line 1') as e: load_detection_dataset(p, tmp_path)
    assert 'broken.json' in str(e.value)
    p.write_text('[1, 2]')
    with pytest.raises(InputError, match='JSON object'): COCODataset(p, tmp_path)
    with pytest.raises(InputError, match='not a category table'): CategoryStats.from_table('coco_lt_image_ids')
    with pytest.raises(InputError, match='not a shipped table name'): CategoryStats.from_table('lvis_v3')
    t = tmp_path / 'table.json'
    t.write_text(json.dumps([{'id': 1, 'name': 'a', 'image_count': 1, 'instance_count': 2},
                             {'id': 2, 'name': 'b', 'image_count': 1}]))
    with pytest.raises(InputError, match=r"record \[1\]: field 'instance_count'"): CategoryStats.from_table(t)
    t.write_text(json.dumps([{'id': 1, 'name': 'a', 'image_count': 1, 'instance_count': -2}]))
    with pytest.raises(InputError, match=r"record \[0\]: field 'instance_count'"): CategoryStats.from_table(t)


def test_image_file_problems(tmp_path):
    path, root, data = lvis_file(tmp_path)
    ds = LVISDataset(path, root)
    (root / 'val2017/000000000008.jpg').unlink()
    with pytest.raises(InputError) as e: ds[2]
    msg = str(e.value)
    assert str(path) in msg and 'val2017/000000000008.jpg' in msg and "images[2] (id=8): field 'coco_url'" in msg
    with pytest.raises(InputError, match=r'1 of 4 image files not found') as e: ds.check_images()
    assert '000000000008.jpg' in str(e.value) and 'images[2] (id=8)' in str(e.value)
    # the CLI reports it as a one-line error, exit code 2
    rc, out, err = run_cli(['data', 'stats', str(path), '--image-root', str(root)])
    assert rc == 2 and '000000000008.jpg' in err
    # an image whose size differs from its record
    blank(root / 'val2017/000000000008.jpg', 30, 40)
    with pytest.raises(InputError, match=r"images\[2\] \(id=8\): field 'height/width'"): ds[2]
    with pytest.raises(InputError, match='differ in size'): ds.check_images(check_sizes=True)
    # a file that is not an image
    (root / 'val2017/000000000008.jpg').write_bytes(b'not an image')
    with pytest.raises(InputError, match='cannot decode image'): ds[2]


RLE_CASES = [
    # (name, RLE of annotations[3] (image 8, 40 x 40), substrings of the message)
    ('size of another image', lambda: _rle(np.ones((10, 10), np.uint8)), ['RLE size [10, 10] differs from its image']),
    ('garbage counts', lambda: {'size': [40, 40], 'counts': 'garbage!'}, ['do not decode', 'alphabet']),
    ('counts past the image', lambda: {'size': [40, 40], 'counts': _rle(np.ones((40, 40), np.uint8))['counts'] + '1'},
     ['cover 1601 pixels', '40 x 40 = 1600']),
    ('string ending inside a number', lambda: {'size': [40, 40], 'counts': '0T3o'}, ['do not decode', 'ends inside']),
    ('uncompressed counts short', lambda: {'size': [40, 40], 'counts': [100, 200]}, ['cover 300 pixels']),
    ('negative uncompressed count', lambda: {'size': [40, 40], 'counts': [1700, -100]}, ['>= 0']),
]

def _rle(m):
    r = mask_utils.encode(np.asfortranarray(m)); r['counts'] = r['counts'].decode(); return r

@pytest.mark.parametrize('name,rle,parts', RLE_CASES, ids=[c[0] for c in RLE_CASES])
def test_bad_rle_refused_before_any_decoding(tmp_path, name, rle, parts):
    "An RLE that does not decode or does not fit its image: an error when the file is read, for every reader."
    path, root, data = lvis_file(tmp_path)
    bad = tmp_path / 'rle.json'
    bad.write_text(json.dumps(_mutate(data, lambda d: d['annotations'][3].update(segmentation=rle()))))
    for read in (lambda: LVISDataset(bad, root, train=True), lambda: CategoryStats.from_table(bad)):
        with pytest.raises(InputError) as e: read()
        msg = str(e.value)
        assert str(bad) in msg and "annotations[3] (id=4): field 'segmentation'" in msg, msg
        for p in parts: assert p in msg, (p, msg)


def test_invalid_polygons_allowed_are_dropped_as_detectron2_does(tmp_path):
    path, root, data = lvis_file(tmp_path)
    bad = tmp_path / 'poly.json'
    bad.write_text(json.dumps(_mutate(data, lambda d: d['annotations'][3]['segmentation'].append([1, 1, 5, 5]))))
    with pytest.raises(InputError, match='at least 3 points'): LVISDataset(bad, root)
    ds = LVISDataset(bad, root, allow=['invalid-polygons'])
    assert int(ds[2][1]['masks'][0].sum()) == int(LVISDataset(path, root)[2][1]['masks'][0].sum()) == 100


def test_segmentation_to_mask_forms():
    h, w = 12, 10
    m = np.zeros((h, w), np.uint8); m[2:7, 3:9] = 1
    rle = mask_utils.encode(np.asfortranarray(m))
    assert np.array_equal(segmentation_to_mask(rle, h, w), m)
    rle_str = dict(rle, counts=rle['counts'].decode())
    assert np.array_equal(segmentation_to_mask(rle_str, h, w), m)
    # uncompressed RLE (column-major run lengths), as COCO crowd annotations have
    flat = m.flatten(order='F'); runs, cur, n = [], 0, 0
    for v in flat:
        if v != cur: runs.append(n); cur, n = v, 0
        n += 1
    runs.append(n)
    assert np.array_equal(segmentation_to_mask({'counts': runs, 'size': [h, w]}, h, w), m)
    poly = [[3, 2, 9, 2, 9, 7, 3, 7]]
    assert segmentation_to_mask(poly, h, w).sum() == int(mask_utils.decode(
        mask_utils.merge(mask_utils.frPyObjects(poly, h, w))).sum())
    with pytest.raises(ValueError, match='at least 3 points'): segmentation_to_mask([[1, 1, 5, 5]], h, w)
    assert segmentation_to_mask([[1, 1, 5, 5]], h, w, drop_invalid_polygons=True).sum() == 0  # dropped when asked


# ---------------------------------------------------------------------------------------------- COCO-LT rebuild
def coco_train_stub(tmp_path):
    "A COCO-style train file: 6 images, 3 classes, one crowd annotation."
    rows = [(1, 1, 0), (1, 1, 0), (1, 18, 0), (2, 18, 0), (2, 1, 1), (3, 90, 0), (4, 90, 0), (4, 1, 0), (5, 18, 0),
            (6, 1, 0)]
    data = {'info': {'year': 2017}, 'licenses': [{'id': 1, 'name': 'x'}],
            'images': [{'id': i, 'height': 20, 'width': 20, 'file_name': f'{i:012d}.jpg'} for i in range(1, 7)],
            'annotations': [{'id': 100 + k, 'image_id': i, 'category_id': c, 'bbox': [1, 1, 5, 5], 'area': 25.0,
                             'segmentation': [[1, 1, 6, 1, 6, 6, 1, 6]], 'iscrowd': z}
                            for k, (i, c, z) in enumerate(rows)],
            'categories': [{'id': 1, 'name': 'person'}, {'id': 18, 'name': 'dog'}, {'id': 90, 'name': 'toothbrush'}]}
    p = tmp_path / 'instances_train2017.json'; p.write_text(json.dumps(data))
    return p, data


def test_coco_lt_rebuild_passes(tmp_path):
    src, data = coco_train_stub(tmp_path)
    table = {'1': [1, 4], '18': [1, 2], '90': [4]}
    out = tmp_path / 'out' / 'coco_lt.json'
    res = rebuild_coco_lt(src, out, image_ids=table, expected={1: 3, 18: 2, 90: 1})
    got = json.loads(out.read_text())
    assert [im['id'] for im in got['images']] == [1, 2, 4]
    assert sorted(a['id'] for a in got['annotations']) == [a['id'] for a in data['annotations']
                                                         if a['image_id'] in (1, 2, 4)]
    assert got['categories'] == data['categories'] and got['licenses'] == data['licenses']
    assert res['instance_counts'] == {1: 3, 18: 2, 90: 1} and res['images'] == 3 and res['annotations'] == 7
    # the result loads as a COCO dataset with the full label map
    assert COCODataset(out, tmp_path).label_map.num_classes == 4
    # the table may also be a file in the shipped layout
    tfile = tmp_path / 'ids.json'; tfile.write_text(json.dumps({'image_ids': table}))
    rebuild_coco_lt(src, tmp_path / 'again.json', image_ids=tfile, expected={1: 3, 18: 2, 90: 1})
    assert json.loads((tmp_path / 'again.json').read_text()) == got


def test_coco_lt_rebuild_mismatch_writes_nothing(tmp_path):
    src, _ = coco_train_stub(tmp_path)
    out = tmp_path / 'coco_lt.json'
    with pytest.raises(InputError) as e:
        rebuild_coco_lt(src, out, image_ids={'1': [1, 4], '18': [1, 2], '90': [4]}, expected={1: 5, 18: 2, 90: 2})
    msg = str(e.value)
    assert 'person (id 1): expected 5, got 3' in msg and 'toothbrush (id 90): expected 2, got 1' in msg
    assert 'dog' not in msg and '2 classes' in msg and str(src) in msg
    assert not out.exists() and list(tmp_path.glob('.coco_lt.json*')) == []
    # counts that only match with the crowd annotation counted: the message says so, and count_crowd rebuilds
    with pytest.raises(InputError, match='count_crowd=True'):
        rebuild_coco_lt(src, out, image_ids={'1': [1, 2]}, expected={1: 3, 18: 2})
    rebuild_coco_lt(src, out, image_ids={'1': [1, 2]}, expected={1: 3, 18: 2}, count_crowd=True)
    assert out.exists()


def test_coco_lt_rebuild_missing_image(tmp_path):
    src, _ = coco_train_stub(tmp_path)
    out = tmp_path / 'coco_lt.json'
    with pytest.raises(InputError) as e:
        rebuild_coco_lt(src, out, image_ids={'1': [1, 4, 4242], '18': [2]}, expected={1: 3, 18: 2})
    assert '1 of the 4 COCO-LT image ids' in str(e.value) and '4242' in str(e.value) and "field 'images'" in str(e.value)
    assert not out.exists()
    with pytest.raises(InputError, match='category ids not in'):
        rebuild_coco_lt(src, out, image_ids={'5': [1]}, expected={})


def test_coco_lt_shipped_tables(tmp_path):
    "The shipped id table and counts agree; the default expected counts are the shipped ones."
    ids = json.loads(table_path('coco_lt_image_ids').read_text())['image_ids']
    lt = CategoryStats.from_table('coco_lt')
    assert len(ids) == 80 and len(set().union(*map(set, ids.values()))) == 99411
    assert {int(k): len(v) for k, v in ids.items()} == lt.image_counts
    src, _ = coco_train_stub(tmp_path)
    with pytest.raises(InputError) as e:
        rebuild_coco_lt(src, tmp_path / 'x.json', image_ids={'1': [1]})
    assert 'person (id 1): expected 262465, got 2' in str(e.value)
    # via the CLI: one-line error, exit code 2, nothing written
    t = tmp_path / 'ids.json'; t.write_text(json.dumps({'1': [1]}))
    rc, out, err = run_cli(['data', 'coco-lt', '--instances', str(src), '--out', str(tmp_path / 'y.json'),
                            '--image-ids', str(t)])
    assert rc == 2 and 'expected 262465, got 2' in err and not (tmp_path / 'y.json').exists()


# ---------------------------------------------------------------------------------------------- CLI
def _rows(text):
    return {l.split()[0]: [int(x) for x in l.split()[1:]] for l in text.splitlines()
            if l.startswith('  ') and l.split()[1].isdigit()}


def test_cli_stats_lvis():
    rc, out, err = run_cli(['data', 'stats', 'lvis_v0.5'])
    assert rc == 0, err
    rows = _rows(out)
    assert [rows[b] for b in ('[0,10)', '[10,100)', '[100,1000)', '[1000,inf)', 'total')] == [[294], [453], [302], [181], [1230]]
    assert [rows[g] for g in 'rcf'] == [[454], [461], [315]]
    assert '693,958 instances' in out


def test_cli_stats_val_coco_and_custom_bins():
    rc, out, _ = run_cli(['data', 'stats', 'lvis_v0.5', '--val', 'lvis_v0.5_val'])
    assert rc == 0 and _rows(out)['[0,10)'] == [294, 67] and _rows(out)['total'] == [1230, 830]
    rc, out, _ = run_cli(['data', 'stats', 'coco_lt'])
    rows = _rows(out)
    assert rc == 0 and [rows[b] for b in ('[0,20)', '[20,400)', '[400,8000)', '[8000,inf)')] == [[4], [24], [32], [20]]
    rc, out, _ = run_cli(['data', 'stats', 'lvis_v0.5', '--bin-base', '8', '--val', 'lvis_v0.5_val'])
    assert rc == 0 and [_rows(out)[b][1] for b in ('[0,8)', '[8,64)', '[64,512)', '[512,inf)')] == [51, 250, 276, 253]
    rc, out, _ = run_cli(['data', 'stats', str(COCO_FILE), '--bin-base', '20'])
    assert rc == 0 and '830 instances' in out and _rows(out)['total'] == [80]


def test_cli_stats_errors(tmp_path):
    rc, out, err = run_cli(['data', 'stats', str(tmp_path / 'missing.json')])
    assert rc == 2 and 'missing.json' in err and 'not found' in err
    rc, out, err = run_cli(['data', 'stats', 'coco_lt', '--val', 'lvis_v0.5_val'])
    assert rc == 2 and 'lvis_v0.5_val' in err


def test_cli_help_texts():
    import argparse
    from simcal.data import configure_stats_parser, configure_coco_lt_parser
    for conf in (configure_stats_parser, configure_coco_lt_parser):
        p = argparse.ArgumentParser(); conf(p)
        for a in p._actions:
            if a.dest != 'help': assert a.help and len(a.help) > 10, a.dest
