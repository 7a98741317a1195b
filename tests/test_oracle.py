"""Checks of simcal.oracle (Props-GT) on a tiny Mask R-CNN whose RPN is replaced by fixed proposals: ground-truth
proposals give AP 1.0 for every class through simcal.evaluate, unmatched proposals never become detections, boxes
still come from the model's regression, the three scores, the detector restored afterwards, and bad input.
"""
import json

import numpy as np
import pytest
import torch
from torch import nn
from torchvision.ops import box_iou

from simcal.core import InputError
from simcal.detector import as_detector
from simcal.evaluate import evaluate_detections
from simcal.inference import detections_to_results
from simcal.data import LabelMap, load_detection_dataset
from simcal.model import PRESETS, build_mask_rcnn
from simcal.oracle import PropsGT, PropsGTScorer, add_oracle_arguments, match_proposals, run_oracle, run_props_gt

TINY = dict(fpn_channels=16, box_head_dim=32, mask_head_convs=1, mask_head_channels=16, min_size=64, max_size=64)


class FixedProposals(nn.Module):
    "A stand-in RPN: the proposals of call k are `per_call[k]` (one tensor per image, in the resized frame)."
    def __init__(self, per_call):
        super().__init__()
        self.per_call, self.calls = per_call, 0

    def forward(self, images, features, targets=None):
        out = self.per_call[self.calls % len(self.per_call)]
        self.calls += 1
        return [b.clone().float() for b in out], {}


def tiny(num_classes, agnostic=True, zero_regression=True, seed=0):
    torch.manual_seed(seed)
    preset = PRESETS['demo'].replace(class_agnostic=agnostic, **TINY)
    model = build_mask_rcnn(num_classes, **preset.model_kwargs()).eval()
    if zero_regression:
        with torch.no_grad():
            model.roi_heads.box_predictor.bbox_pred.weight.zero_()
            model.roi_heads.box_predictor.bbox_pred.bias.zero_()
    return model


def lvis_gt(images, anns, cat_ids):
    return {'images': [{'id': i, 'file_name': f'{i}.png', 'height': h, 'width': w, 'neg_category_ids': [],
                        'not_exhaustive_category_ids': []} for i, (h, w) in images.items()],
            'annotations': [{'id': k + 1, 'image_id': i, 'category_id': c, 'bbox': b, 'area': b[2] * b[3],
                             'segmentation': [[b[0], b[1], b[0] + b[2], b[1], b[0] + b[2], b[1] + b[3], b[0], b[1] + b[3]]]}
                            for k, (i, c, b) in enumerate(anns)],
            'categories': [{'id': c, 'name': f'c{c}', 'frequency': 'r'} for c in cat_ids]}


def xyxy(b): return [b[0], b[1], b[0] + b[2], b[1] + b[3]]


@pytest.mark.parametrize('agnostic', [True, False])
def test_ground_truth_proposals_give_ap_one_for_every_class(agnostic):
    # two images of different sizes (both resized by the detector), five categories with non-contiguous ids
    cat_ids = [3, 7, 11, 12, 40]
    sizes = {1: (96, 128), 2: (128, 80)}
    anns = [(1, 3, [8, 8, 30, 30]), (1, 7, [60, 20, 60, 60]), (1, 3, [20, 50, 30, 40]), (1, 40, [90, 70, 30, 20]),
            (2, 11, [4, 4, 40, 40]), (2, 12, [10, 60, 60, 50]), (2, 7, [50, 10, 25, 30])]
    gt = lvis_gt(sizes, anns, cat_ids)
    lm = LabelMap(cat_ids)
    model = tiny(len(cat_ids) + 1, agnostic)
    per_image, targets, images = {}, [], []
    for i, (h, w) in sizes.items():
        boxes = torch.tensor([xyxy(b) for j, _, b in anns if j == i], dtype=torch.float32)
        labels = torch.tensor([lm.label(c) for j, c, _ in anns if j == i])
        s = min(64 / h, 64 / w)
        # the ground truth, in the frame of the resized image, and a proposal that matches nothing
        per_image[i] = torch.cat([boxes * s, torch.tensor([[0., 0., 3., 3.]])])
        targets.append({'boxes': boxes, 'labels': labels}); images.append(torch.rand(3, h, w))
    model.rpn = FixedProposals([[per_image[1], per_image[2]]])
    with PropsGT(model) as oracle:
        outputs = oracle(images, targets)
    records = [r for out, i in zip(outputs, sizes) for r in detections_to_results(out, i, lm)]
    assert len(records) == len(anns)
    assert all(r['score'] == 1.0 for r in records)
    m = evaluate_detections(gt, records, iou_type='bbox', protocol='synth', stats={c: 5 for c in cat_ids})
    aps = {int(c): v['AP'] for c, v in m['per_category'].items()}
    assert sorted(aps) == cat_ids
    assert all(abs(ap - 1.0) < 1e-9 for ap in aps.values()), aps
    # the same detector without the oracle (random weights) is far from it: the check has teeth
    plain = [r for out, i in zip(model(images), sizes) for r in detections_to_results(out, i, lm)]
    model.rpn.calls = 0
    m0 = evaluate_detections(gt, plain, iou_type='bbox', protocol='synth', stats={c: 5 for c in cat_ids})
    assert m0['AP'] < 0.9


@pytest.mark.parametrize('score', ['one', 'iou', 'fg_prob'])
def test_unmatched_proposals_never_become_detections(score):
    gt = torch.tensor([[10., 10., 40., 40.]])
    # IoU with the ground truth: 0.486, 0.43, 0 - all background
    near = torch.tensor([[10., 10., 40., 40. + 30 * (1 / 0.49 - 1) + 0.5]])
    assert box_iou(near, gt).item() < 0.5
    props = torch.cat([near, torch.tensor([[10., 10., 40., 80.], [45., 45., 60., 60.]])])
    model = tiny(4)
    model.rpn = FixedProposals([[props]])
    with PropsGT(model, score=score) as oracle:
        out, = oracle([torch.rand(3, 64, 64)], [{'boxes': gt, 'labels': torch.tensor([2])}])
        assert len(out['boxes']) == 0 and len(out['masks']) == 0
        # an image without ground truth: nothing either
        out, = oracle([torch.rand(3, 64, 64)], [{'boxes': torch.zeros((0, 4)), 'labels': torch.zeros(0, dtype=torch.long)}])
        assert len(out['boxes']) == 0
    # the boundary: IoU exactly 0.5 matches
    half = torch.tensor([[10., 10., 40., 70.]])       # 900 / 1800
    assert box_iou(half, torch.tensor([[10., 10., 40., 40.]])).item() == 0.5
    model.rpn = FixedProposals([[half]])
    with PropsGT(model, score=score) as oracle:
        out, = oracle([torch.rand(3, 64, 64)], [{'boxes': gt, 'labels': torch.tensor([2])}])
    assert out['labels'].tolist() == [2]


def test_boxes_come_from_the_model_and_the_three_scores():
    model = tiny(4, agnostic=False, zero_regression=False)
    with torch.no_grad():   # class-wise regression: class 3 shifts its box right by 0.1 of its width (dx = 1 at weight 10)
        model.roi_heads.box_predictor.bbox_pred.weight.zero_()
        b = model.roi_heads.box_predictor.bbox_pred.bias
        b.zero_(); b[4 * 3] = 1.0
    gt = torch.tensor([[10., 10., 30., 30.], [40., 30., 60., 60.]]); labels = torch.tensor([3, 1])
    props = torch.tensor([[10., 10., 30., 32.], [40., 30., 60., 60.]])
    model.rpn = FixedProposals([[props]])
    img = torch.rand(3, 64, 64)
    outs = {}
    for score in ('one', 'iou', 'fg_prob'):
        with PropsGT(model, score=score) as oracle:
            outs[score], = oracle([img], [{'boxes': gt, 'labels': labels}])
    o = outs['one']
    by_label = {int(l): bx for l, bx in zip(o['labels'], o['boxes'])}
    assert sorted(by_label) == [1, 3]
    assert torch.allclose(by_label[3], props[0] + torch.tensor([2., 0., 2., 0.]), atol=1e-4)   # 0.1 x width 20
    assert torch.allclose(by_label[1], props[1], atol=1e-4)
    ious = box_iou(props, gt).diagonal()
    got = {int(l): float(s) for l, s in zip(outs['iou']['labels'], outs['iou']['scores'])}
    assert got == pytest.approx({3: float(ious[0]), 1: float(ious[1])}, abs=1e-6) and got[3] < 1.0
    # fg_prob: 1 - the model's own background probability for these proposals
    det = as_detector(model)
    with torch.no_grad():
        il, _ = model.transform([img])
        feats = model.backbone(il.tensors)
        logits = det.original_logits(model.roi_heads.box_roi_pool(feats, [props], il.image_sizes))
    fg = 1 - logits.softmax(1)[:, 0]
    got = {int(l): float(s) for l, s in zip(outs['fg_prob']['labels'], outs['fg_prob']['scores'])}
    assert got == pytest.approx({3: float(fg[0]), 1: float(fg[1])}, abs=1e-5)


def test_detector_is_restored_and_a_calibration_scorer_survives():
    model = tiny(4)
    model.rpn = FixedProposals([[torch.tensor([[10., 10., 30., 30.]])]])
    det = as_detector(model)
    img = torch.rand(3, 64, 64)
    before = model([img])[0]
    with PropsGT(model):
        pass
    assert det.scorer() is None and type(model.roi_heads.box_predictor).__name__ != 'ScoredBoxPredictor'
    after = model([img])[0]
    assert torch.equal(before['scores'], after['scores']) and torch.equal(before['labels'], after['labels'])

    class Uniform(nn.Module):
        def forward(self, logits, feats): return torch.full_like(logits[0], 1.0 / logits[0].shape[1])
    mine = Uniform()
    det.install_scorer(mine)
    with PropsGT(model) as oracle:
        out, = oracle([img], [{'boxes': torch.tensor([[10., 10., 30., 30.]]), 'labels': torch.tensor([2])}])
    assert out['labels'].tolist() == [2] and out['scores'].tolist() == [1.0]
    assert det.scorer() is mine


def test_run_props_gt_over_a_dataset_and_crowd(tmp_path):
    from PIL import Image
    (tmp_path / 'img').mkdir()
    sizes = {1: (64, 64), 2: (64, 64)}
    anns = [(1, 1, [4, 4, 20, 24]), (1, 2, [30, 30, 30, 30]), (2, 2, [10, 10, 40, 30])]
    gt = lvis_gt(sizes, anns, [1, 2])
    gt['annotations'].append({'id': 9, 'image_id': 2, 'category_id': 1, 'bbox': [50, 50, 12, 12], 'area': 144,
                              'iscrowd': 1, 'segmentation': [[50, 50, 62, 50, 62, 62, 50, 62]]})
    for i in sizes: Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(tmp_path / 'img' / f'{i}.png')
    (tmp_path / 'gt.json').write_text(json.dumps(gt))
    ds = load_detection_dataset(tmp_path / 'gt.json', tmp_path / 'img')
    props = [[torch.tensor([xyxy(b) for j, _, b in anns if j == i] + [[50., 50., 62., 62.]])] for i in sizes]
    model = tiny(3)
    model.rpn = FixedProposals(props)
    res = run_props_gt(model, ds, progress=False)
    assert sorted((r['image_id'], r['category_id']) for r in res) == [(1, 1), (1, 2), (2, 2)]   # the crowd box: none
    m = evaluate_detections(tmp_path / 'gt.json', res, iou_type='bbox', protocol='synth', stats={1: 3, 2: 30})
    assert all(abs(v['AP'] - 1.0) < 1e-9 for v in m['per_category'].values())
    model.rpn.calls = 0
    res = run_oracle('props-gt', model, ds, score='one', progress=False, max_dets=1)
    assert len(res) == 2   # one per image
    assert model.roi_heads.detections_per_img == PRESETS['demo'].box_detections_per_img   # restored
    with pytest.raises(ValueError, match='score threshold >= 0'): run_props_gt(model, ds, score_thresh=-0.5, progress=False)
    with pytest.raises(ValueError, match='unknown oracle'): run_oracle('label-gt', model, ds)


def test_bad_input():
    model = tiny(3)
    model.rpn = FixedProposals([[torch.tensor([[10., 10., 30., 30.]])]])
    img = torch.rand(3, 64, 64)
    with PropsGT(model) as oracle:
        with pytest.raises(InputError, match="field 'labels'"): oracle([img], [{'boxes': torch.zeros((0, 4))}])
        with pytest.raises(InputError, match='3-way classifier'):
            oracle([img], [{'boxes': torch.tensor([[10., 10., 30., 30.]]), 'labels': torch.tensor([5])}])
        with pytest.raises(ValueError, match='1 images and 2 targets'): oracle([img], [{}, {}])
    with pytest.raises(RuntimeError, match='context manager'):
        PropsGT(model)([img], [{'boxes': torch.zeros((0, 4)), 'labels': torch.zeros(0, dtype=torch.long)}])
    with pytest.raises(ValueError, match='unknown Props-GT score'): PropsGT(model, score='max')
    with pytest.raises(TypeError, match='no detector adapter'): PropsGT(nn.Linear(2, 2))
    sc = PropsGTScorer()
    sc.set_matches([torch.tensor([[0., 0., 5., 5.]])], [torch.zeros((0, 4))], [torch.zeros(0, dtype=torch.long)])
    with pytest.raises(RuntimeError, match='RPN gave 1 proposals'): sc([torch.zeros(2, 3)], [None])
    with pytest.raises(ValueError, match='iou_thresh'): match_proposals(torch.zeros((1, 4)), torch.zeros((1, 4)), torch.ones(1), 1.5)
    import argparse
    p = argparse.ArgumentParser(); add_oracle_arguments(p)
    assert p.parse_args([]).oracle is None and p.parse_args([]).oracle_score == 'one'
    with pytest.raises(SystemExit): p.parse_args(['--oracle', 'cls-gt'])


def test_legacy_iou_matching_is_mmdet_v1s_formula():
    # mmdet v1 bbox_overlaps: areas and intersections of pixel-index boxes, w = x2 - x1 + 1
    def v1_iou(a, b):
        iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]) + 1); ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]) + 1)
        area = lambda r: (r[2] - r[0] + 1) * (r[3] - r[1] + 1)
        return iw * ih / (area(a) + area(b) - iw * ih)
    g = torch.Generator().manual_seed(0)
    gt = torch.tensor([[10., 10., 30., 30.], [5., 40., 60., 62.]])
    xy = torch.randint(0, 50, (200, 2), generator=g).float()
    props = torch.cat([xy, xy + torch.randint(1, 40, (200, 2), generator=g).float()], 1)
    labels, ious = match_proposals(props, gt, torch.tensor([1, 2]), legacy_iou=True)
    want = torch.tensor([max(v1_iou(p.tolist(), q.tolist()) for q in gt) for p in props])
    assert torch.allclose(ious, want, atol=1e-6)
    assert labels.tolist() == [0 if w < 0.5 else 1 + max(range(2), key=lambda k: v1_iou(p.tolist(), gt[k].tolist()))
                               for p, w in zip(props, want.tolist())]
    # the boundary moves: 441 / 882 = 0.5 with "+1", 400 / 820 < 0.5 without
    p = torch.tensor([[10., 10., 30., 51.]])
    assert match_proposals(p, gt[:1], torch.tensor([3]), legacy_iou=True)[0].item() == 3
    assert match_proposals(p, gt[:1], torch.tensor([3]))[0].item() == 0
