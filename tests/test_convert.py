"""Checks of simcal.convert on generated checkpoints with the release's key names and shapes (beyond-mask-rcnn.md
section 3), saved as the release saved them (PyTorch legacy format, {meta, state_dict, optimizer}): LVIS v0.5 1231-class
agnostic at full size (converted, loaded, run on a small image, with its 3fc_ft head attached), the class-wise
mapping at full size, COCO-LT 81 classes on a small backbone; every key of the reference table lands where the table
says; tampered files (missing key, wrong shape, extra key, contradicting config) fail naming the key."""
import json, warnings
from pathlib import Path

import pytest
import torch
import torchvision

def release_state_dict(num_classes=1231, # C + 1
                       agnostic=True, # r50-ag (4 box outputs, 1 mask channel) or r50 (4 x C+1, C+1)
                       depth=50, # ResNet depth of the backbone
                       fpn=256, fc=1024, mask_convs=4, mask_channels=256, # widths (the release's by default)
                       init=torch.randn, # how the tensors are filled
                      ) -> dict:
    "An mmdetection v1 Mask R-CNN state dict with the release's key names and shapes (beyond-mask-rcnn.md section 3)."
    torch.manual_seed(0)
    sd = {}
    body = getattr(torchvision.models, f'resnet{depth}')(weights=None)
    for k, v in body.state_dict().items():   # mmdet v1 ResNet: torchvision's names; BN counters included
        if not k.startswith('fc.'): sd['backbone.' + k] = v.clone() if k.endswith('num_batches_tracked') else (init(v.shape) * 0.05 if 'running_var' not in k else torch.rand(v.shape) + 0.5)
    chans = [64, 128, 256, 512] if depth < 50 else [256, 512, 1024, 2048]
    w = lambda *s: init(s) * 0.05
    for i, c in enumerate(chans):
        sd[f'neck.lateral_convs.{i}.conv.weight'], sd[f'neck.lateral_convs.{i}.conv.bias'] = w(fpn, c, 1, 1), w(fpn)
        sd[f'neck.fpn_convs.{i}.conv.weight'], sd[f'neck.fpn_convs.{i}.conv.bias'] = w(fpn, fpn, 3, 3), w(fpn)
    sd['rpn_head.rpn_conv.weight'], sd['rpn_head.rpn_conv.bias'] = w(fpn, fpn, 3, 3), w(fpn)
    sd['rpn_head.rpn_cls.weight'], sd['rpn_head.rpn_cls.bias'] = w(3, fpn, 1, 1), w(3)
    sd['rpn_head.rpn_reg.weight'], sd['rpn_head.rpn_reg.bias'] = w(12, fpn, 1, 1), w(12)
    sd['bbox_head.shared_fcs.0.weight'], sd['bbox_head.shared_fcs.0.bias'] = w(fc, fpn * 49), w(fc)
    sd['bbox_head.shared_fcs.1.weight'], sd['bbox_head.shared_fcs.1.bias'] = w(fc, fc), w(fc)
    sd['bbox_head.fc_cls.weight'], sd['bbox_head.fc_cls.bias'] = w(num_classes, fc), w(num_classes)
    r = 4 if agnostic else 4 * num_classes
    sd['bbox_head.fc_reg.weight'], sd['bbox_head.fc_reg.bias'] = w(r, fc), w(r)
    for i in range(mask_convs):
        sd[f'mask_head.convs.{i}.conv.weight'] = w(mask_channels, fpn if i == 0 else mask_channels, 3, 3)
        sd[f'mask_head.convs.{i}.conv.bias'] = w(mask_channels)
    sd['mask_head.upsample.weight'], sd['mask_head.upsample.bias'] = w(mask_channels, mask_channels, 2, 2), w(mask_channels)
    m = 1 if agnostic else num_classes
    sd['mask_head.conv_logits.weight'], sd['mask_head.conv_logits.bias'] = w(m, mask_channels, 1, 1), w(m)
    return sd

def release_config(num_classes=1231, agnostic=True, depth=50) -> str:
    "The parts of an mmdetection v1 config that the converter reads (model section)."
    return (f"model = dict(\n    type='MaskRCNN',\n    backbone=dict(type='ResNet', depth={depth}, num_stages=4, frozen_stages=1),\n"
            f"    bbox_head=dict(type='SharedFCBBoxHead', num_fcs=2, num_classes={num_classes}, target_stds=[0.1, 0.1, 0.2, 0.2],\n"
            f"        reg_class_agnostic={agnostic}),\n"
            f"    mask_head=dict(type='FCNMaskHead', num_convs=4, num_classes={num_classes}, class_agnostic={agnostic}))\n")

def release_head_state_dict(num_classes=1231, kind='simple3fc', feat=256 * 49, hidden=1024, init=torch.randn) -> dict:
    "A release calibration head's state dict: `simple3fc` (feat_classifier.*) or `simple2fc` (feat_extractor.*)."
    torch.manual_seed(1)
    w = lambda *s: init(s) * 0.05
    if kind == 'simple3fc':
        return {'feat_classifier.fc1.weight': w(hidden, feat), 'feat_classifier.fc1.bias': w(hidden),
                'feat_classifier.fc2.weight': w(hidden, hidden), 'feat_classifier.fc2.bias': w(hidden),
                'feat_classifier.fc_classifier.weight': w(num_classes, hidden), 'feat_classifier.fc_classifier.bias': w(num_classes)}
    return {'feat_extractor.fc1.weight': w(hidden, feat), 'feat_extractor.fc1.bias': w(hidden),
            'feat_extractor.fc2.weight': w(num_classes, hidden), 'feat_extractor.fc2.bias': w(num_classes)}

def save_release(path, state, config=None, classes=None):
    "Save as the release's files: {'meta', 'state_dict', 'optimizer'} in PyTorch's legacy (pre-1.6) format."
    meta = {'mmdet_version': '1.0rc0+e5f3076', 'config': config} if config else {}
    if classes: meta['CLASSES'] = tuple(classes)
    obj = {'meta': meta, 'state_dict': state, 'optimizer': {'state': {}, 'param_groups': [{'lr': 0.01}]}}
    torch.save(obj, path, _use_new_zipfile_serialization=False)
    return path


from simcal.calibration import attach_calibration, load_calibration
from simcal.checkpoint import load_detector
from simcal.core import InputError, table_path
from simcal.convert import (UntrustedCheckpointWarning, configure_convert_parser, convert_mask_rcnn_state,
                            convert_mmdet_v1, inspect_mask_rcnn, run_convert)
from simcal.model import PRESETS, build_mask_rcnn

# the reference table (beyond-mask-rcnn.md section 3): mmdetection v1 prefix -> torchvision prefix
REFERENCE = [('backbone.conv1.', 'backbone.body.conv1.'), ('backbone.layer4.2.bn3.', 'backbone.body.layer4.2.bn3.'),
             ('backbone.layer1.0.downsample.0.', 'backbone.body.layer1.0.downsample.0.'),
             ('neck.lateral_convs.0.conv.', 'backbone.fpn.inner_blocks.0.0.'), ('neck.lateral_convs.3.conv.', 'backbone.fpn.inner_blocks.3.0.'),
             ('neck.fpn_convs.1.conv.', 'backbone.fpn.layer_blocks.1.0.'), ('rpn_head.rpn_conv.', 'rpn.head.conv.0.0.'),
             ('rpn_head.rpn_cls.', 'rpn.head.cls_logits.'), ('rpn_head.rpn_reg.', 'rpn.head.bbox_pred.'),
             ('bbox_head.shared_fcs.0.', 'roi_heads.box_head.fc6.'), ('bbox_head.shared_fcs.1.', 'roi_heads.box_head.fc7.'),
             ('bbox_head.fc_cls.', 'roi_heads.box_predictor.cls_score.'), ('bbox_head.fc_reg.', 'roi_heads.box_predictor.bbox_pred.'),
             ('mask_head.convs.0.conv.', 'roi_heads.mask_head.0.0.'), ('mask_head.convs.3.conv.', 'roi_heads.mask_head.3.0.'),
             ('mask_head.upsample.', 'roi_heads.mask_predictor.conv5_mask.'),
             ('mask_head.conv_logits.', 'roi_heads.mask_predictor.mask_fcn_logits.')]
SMALL = dict(depth=18, fpn=16, fc=32, mask_convs=1, mask_channels=16)
SMALL_LOAD = dict(min_size=64, max_size=64, rpn_pre_nms_top_n_test=50, rpn_post_nms_top_n_test=30, box_detections_per_img=20)


def convert(src, dst, **kw):
    with pytest.warns(UntrustedCheckpointWarning, match='trusted source'):
        return convert_mmdet_v1(src, dst, **kw)


def check_reference_rows(state, model_state, rows=REFERENCE):
    n = 0
    for s, t in rows:
        for p in ('weight', 'bias', 'running_mean', 'running_var'):
            if s + p in state:
                assert t + p in model_state, t + p
                assert torch.equal(model_state[t + p].float(), state[s + p].float()), (s + p, t + p)
                n += 1
    return n


@pytest.fixture(scope='module')
def lvis_ag(tmp_path_factory):
    "The release's LVIS v0.5 r50-ag files at full size (1231 classes), converted."
    d = tmp_path_factory.mktemp('lvis_ag')
    state = release_state_dict(1231, agnostic=True)
    names = [r['name'] for r in json.loads(table_path('lvis_v0.5').read_text())]
    src = save_release(d / 'epoch_12.pth', state, release_config(1231, True), classes=names)
    rep = convert(src, d / 'r50_ag.pth')
    head = release_head_state_dict(1231, 'simple3fc')
    hrep = convert(save_release(d / '3fc_ft.pth', head), d / 'r50_ag_3fc_ft.pth')
    return d, state, rep, head, hrep


def test_lvis_agnostic_full_size_converts_loads_and_runs(lvis_ag):
    d, state, rep, head, hrep = lvis_ag
    # every source tensor mapped or reported; only the BN counters dropped; the optimizer reported
    assert rep['mapped'] + len(rep['dropped']) == len(state)
    assert rep['dropped'] and all(k.endswith('num_batches_tracked') for k in rep['dropped'])
    assert len(rep['dropped']) == sum(k.endswith('num_batches_tracked') for k in state) == 53   # ResNet-50's BN layers
    assert rep['not_converted'] == ['optimizer'] and rep['preset'] == 'lvis_r50_ag'
    assert rep['architecture'] == {'num_classes': 1231, 'class_agnostic': True, 'backbone': 'resnet50', 'fpn_channels': 256,
                                   'box_head_dim': 1024, 'mask_head_convs': 4, 'mask_head_channels': 256}
    assert rep['config_says']['reg_class_agnostic'] is True and rep['config_says']['num_classes'] == [1231]
    # the converted file reads with weights_only=True
    raw = torch.load(d / 'r50_ag.pth', map_location='cpu', weights_only=True)
    assert raw['meta']['legacy_mmdet_v1'] is True and raw['meta']['converted_from']['sha256'] == rep['sha256']
    model, meta = load_detector(d / 'r50_ag.pth', **SMALL_LOAD)
    assert meta['num_classes'] == 1231 and meta['category_ids'] == list(range(1, 1231))
    assert meta['class_agnostic'] is True and meta['preset'] == 'lvis_r50_ag'
    assert meta['instance_counts'][0] == 2 and len(meta['instance_counts']) == 1230     # acorn: 2 training instances
    assert model.roi_heads.box_predictor.bbox_pred.weight.shape == (4, 1024)
    assert model.roi_heads.mask_predictor.mask_fcn_logits.weight.shape == (1, 256, 1, 1)
    assert check_reference_rows(state, model.state_dict()) == 34   # every row of the table, weights and biases
    assert all(torch.equal(model.state_dict()['backbone.body.' + k[len('backbone.'):]].float(), v.float())
               for k, v in state.items() if k.startswith('backbone.') and not k.endswith('num_batches_tracked'))
    with torch.no_grad(): out = model([torch.rand(3, 48, 72)])[0]
    assert out['masks'].shape[1:] == (1, 48, 72) and len(out['boxes']) == len(out['scores']) <= 20
    # the 3fc_ft head: a simcal calibration checkpoint that attaches to the converted detector
    assert hrep['simcal_kind'] == '3fc_ft' and hrep['dual_threshold'] == 100 and hrep['mapped'] == 6
    ck = load_calibration(d / 'r50_ag_3fc_ft.pth')
    assert ck['feature_shape'] == [256, 7, 7] and ck['num_classes'] == 1231 and ck['hidden'] == 1024
    assert torch.equal(ck['head']['fc6.weight'], head['feat_classifier.fc1.weight'])
    assert torch.equal(ck['head']['cls_score.bias'], head['feat_classifier.fc_classifier.bias'])
    assert ck['instance_counts'][:2] == [0, 2]
    attach_calibration(model, d / 'r50_ag_3fc_ft.pth', category_ids=meta['category_ids'])
    with torch.no_grad(): out = model([torch.rand(3, 48, 72)])[0]
    assert out['masks'].shape[1:] == (1, 48, 72)


def test_lvis_classwise_full_size_mapping():
    state = release_state_dict(1231, agnostic=False, init=torch.zeros)
    arch = inspect_mask_rcnn(state)
    assert arch['class_agnostic'] is False and arch['num_classes'] == 1231
    target = build_mask_rcnn(1231, **PRESETS['lvis_r50'].model_kwargs()).state_dict()
    mapped, dropped = convert_mask_rcnn_state(state, target)
    assert set(mapped) == set(target)
    assert mapped['roi_heads.box_predictor.bbox_pred.weight'].shape == (4924, 1024)
    assert mapped['roi_heads.mask_predictor.mask_fcn_logits.weight'].shape == (1231, 256, 1, 1)
    assert len(mapped) + len(dropped) == len(state)


@pytest.mark.parametrize('agnostic', [True, False])
def test_coco_lt_81_classes_converts_and_runs(tmp_path, agnostic):
    state = release_state_dict(81, agnostic=agnostic, **SMALL)
    src = save_release(tmp_path / 'epoch_12.pth', state, release_config(81, agnostic, depth=18))
    rep = convert(src, tmp_path / 'coco_lt.pth')
    assert rep['preset'] == 'coco_lt_r50_ag' and rep['mapped'] + len(rep['dropped']) == len(state)
    assert rep['overrides']['backbone'] == 'resnet18' and rep['overrides'].get('class_agnostic', True) == agnostic
    model, meta = load_detector(tmp_path / 'coco_lt.pth', **SMALL_LOAD)
    coco_ids = [r['coco_category_id'] for r in json.loads(table_path('coco_lt').read_text())]
    assert meta['category_ids'] == sorted(coco_ids) and meta['category_ids'][-1] == 90 and meta['class_agnostic'] is agnostic
    small_rows = [r for r in REFERENCE if not any(x in r[0] for x in ('layer4.2', 'mask_head.convs.3', 'layer1.0.downsample'))]   # not in a ResNet-18
    assert check_reference_rows(state, model.state_dict(), small_rows) == 27
    with torch.no_grad(): out = model([torch.rand(3, 60, 80)])[0]
    assert out['masks'].shape[1:] == (1, 60, 80)
    hrep = convert(save_release(tmp_path / 'cal.pth', release_head_state_dict(81, 'simple2fc', feat=16 * 49, hidden=32)),
                   tmp_path / 'cal_simcal.pth')
    assert hrep['simcal_kind'] == '2fc_rand' and hrep['dual_threshold'] == 400
    attach_calibration(model, tmp_path / 'cal_simcal.pth', category_ids=meta['category_ids'])
    with torch.no_grad(): model([torch.rand(3, 60, 80)])


def _without(sd, k): return {a: b for a, b in sd.items() if a != k}


@pytest.mark.parametrize('tamper, message', [
    (lambda sd: _without(sd, 'bbox_head.shared_fcs.1.weight'), "missing key in the source checkpoint: bbox_head.shared_fcs.1.weight"),
    (lambda sd: _without(sd, 'backbone.layer2.1.bn1.running_mean'), "missing key in the source checkpoint: backbone.layer2.1.bn1.running_mean"),
    (lambda sd: _without(sd, 'mask_head.upsample.bias'), "field 'mask_head.upsample.bias'"),
    (lambda sd: {**sd, 'rpn_head.rpn_cls.weight': torch.zeros(6, 16, 1, 1)}, "wrong shape in the source checkpoint: rpn_head.rpn_cls.weight (6, 16, 1, 1)"),
    (lambda sd: {**sd, 'neck.fpn_convs.0.conv.weight': torch.zeros(16, 16, 1, 1)}, "field 'neck.fpn_convs.0.conv.weight'"),
    (lambda sd: {**sd, 'bbox_head.fc_extra.weight': torch.zeros(3)}, "unexpected key in the source checkpoint: bbox_head.fc_extra.weight"),
    (lambda sd: {**sd, 'neck.fpn_convs.4.conv.weight': torch.zeros(3)}, "field 'neck.fpn_convs.4.conv.weight'"),
    (lambda sd: {**sd, 'bbox_head.fc_reg.weight': torch.zeros(8, 32)}, "field 'bbox_head.fc_reg.weight'"),
])
def test_tampered_detector_fails_naming_the_key(tmp_path, tamper, message):
    state = tamper(release_state_dict(5, **SMALL))
    src = save_release(tmp_path / 'bad.pth', state, release_config(5, depth=18))
    with pytest.raises(InputError, match=message.replace('(', r'\(').replace(')', r'\)')):
        convert(src, tmp_path / 'out.pth', stats=tiny_stats(tmp_path))
    assert not (tmp_path / 'out.pth').exists()


def tiny_stats(d):
    p = Path(d) / 'tiny_stats.json'
    p.write_text(json.dumps([{'id': i, 'name': f'c{i}', 'frequency': 'r', 'image_count': i, 'instance_count': 10 * i} for i in (1, 2, 3, 4)]))
    return str(p)


def test_tampered_config_heads_and_stats(tmp_path):
    state = release_state_dict(5, **SMALL)
    src = save_release(tmp_path / 'cfg.pth', state, release_config(5, agnostic=False, depth=18))
    with pytest.raises(InputError, match=r"field 'meta.config'.*reg_class_agnostic=False"):
        convert(src, tmp_path / 'out.pth', stats=tiny_stats(tmp_path))
    src = save_release(tmp_path / 'nostats.pth', state, release_config(5, depth=18))
    with pytest.raises(InputError, match='pass the training statistics'): convert(src, tmp_path / 'out.pth')
    src = save_release(tmp_path / 'classes.pth', state, release_config(5, depth=18), classes=['a', 'b'])
    with pytest.raises(InputError, match="field 'meta.CLASSES'"): convert(src, tmp_path / 'out.pth', stats=tiny_stats(tmp_path))
    head = release_head_state_dict(5, 'simple3fc', feat=16 * 49, hidden=32)
    for bad, message in ((_without(head, 'feat_classifier.fc2.bias'), "field 'feat_classifier.fc2.bias'"),
                         ({**head, 'feat_classifier.fc3.weight': torch.zeros(2)}, "unexpected key.*feat_classifier.fc3.weight"),
                         ({**head, 'feat_classifier.fc2.weight': torch.zeros(32, 31)}, "wrong shape.*feat_classifier.fc2.weight"),
                         ({**head, 'feat_classifier.fc1.weight': torch.zeros(32, 16 * 49 + 1)}, "field 'feat_classifier.fc1.weight'")):
        with pytest.raises(InputError, match=message):
            convert(save_release(tmp_path / 'h.pth', bad), tmp_path / 'hout.pth', stats=tiny_stats(tmp_path))
    assert not (tmp_path / 'out.pth').exists() and not (tmp_path / 'hout.pth').exists()
    with pytest.raises(InputError, match='1230 categories but the checkpoint classifies 4'):
        convert(save_release(tmp_path / 'h.pth', head), tmp_path / 'hout.pth', stats='lvis_v0.5')


def test_command_line(tmp_path, capsys):
    import argparse
    p = argparse.ArgumentParser(); configure_convert_parser(p)
    state = release_state_dict(5, **SMALL)
    src = save_release(tmp_path / 'epoch_12.pth', state, release_config(5, depth=18))
    args = p.parse_args(['mmdet-v1', str(src), '--out', str(tmp_path / 'models' / 'm.pth'), '--stats', tiny_stats(tmp_path)])
    with pytest.warns(UntrustedCheckpointWarning): assert run_convert(args) == 0
    printed = capsys.readouterr().out
    assert f"{len(state) - 20} tensors converted, 20 dropped (num_batches_tracked)" in printed and 'optimizer' in printed
    model, meta = load_detector(tmp_path / 'models' / 'm.pth')
    assert meta['instance_counts'] == [10, 20, 30, 40] and meta['legacy_mmdet_v1'] is True
    with pytest.raises(SystemExit): p.parse_args(['mmdet-v2', str(src), '--out', str(tmp_path / 'x.pth')])
