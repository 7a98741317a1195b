"""Checks of simcal.model against the method specification (section 9 and 11) and torchvision's behaviour."""
import math

import pytest
import torch
from torch import nn
from torchvision.models import resnet as tv_resnet
from torchvision.ops import boxes as box_ops, misc as misc_nn_ops

from simcal.model import (PRESETS, AgnosticBoxPredictor, DetectorPreset, SimCalRoIHeads, build_detector,
                          build_mask_rcnn, load_backbone_weights)


# the numbers of spec section 9 (base detector, LVIS v0.5) and section 5 / 9 (COCO-LT), written out here
SPEC_LVIS = dict(num_classes=1231, backbone='resnet50', norm='frozen_bn', trainable_layers=3, fpn_channels=256,
                 anchor_sizes=(32, 64, 128, 256, 512), anchor_ratios=(0.5, 1.0, 2.0),
                 rpn_pre_nms_top_n_train=2000, rpn_post_nms_top_n_train=2000, rpn_pre_nms_top_n_test=1000,
                 rpn_post_nms_top_n_test=1000, rpn_nms_thresh=0.7, rpn_batch_size_per_image=256,
                 box_batch_size_per_image=512, box_positive_fraction=0.25, neg_iou_floor=0.1, box_head_dim=1024,
                 mask_head_convs=4, mask_head_channels=256, box_loss_beta=1.0, min_size=800, max_size=1333,
                 hflip_prob=0.5, momentum=0.9, weight_decay=1e-4, grad_clip=35.0, warmup_iters=500,
                 warmup_ratio=1 / 3, lr_gamma=0.1, epochs=12, lr_steps=(8, 11), images_per_gpu=2, base_lr=0.01,
                 base_batch=8, box_score_thresh=0.0, box_nms_thresh=0.5, box_detections_per_img=300)


@pytest.mark.parametrize('name,agnostic', [('lvis_r50_ag', True), ('lvis_r50', False)])
def test_lvis_presets_are_the_spec(name, agnostic):
    p = PRESETS[name]
    for k, v in SPEC_LVIS.items():
        assert getattr(p, k) == (pytest.approx(v) if isinstance(v, float) else v), k
    assert p.class_agnostic is agnostic
    assert p.lr_for(8) == pytest.approx(0.01) and p.lr_for(16) == pytest.approx(0.02)   # linear scaling


def test_coco_lt_preset_is_the_spec():
    p = PRESETS['coco_lt_r50_ag']
    assert (p.num_classes, p.base_lr, p.base_batch, p.images_per_gpu) == (81, 0.02, 16, 2)
    assert (p.box_score_thresh, p.box_detections_per_img, p.class_agnostic) == (0.05, 100, True)
    assert (p.epochs, p.lr_steps, p.neg_iou_floor, p.norm) == (12, (8, 11), 0.1, 'frozen_bn')


def test_demo_preset_is_small_and_from_scratch():
    p = PRESETS['demo']
    assert p.schedule_unit == 'iter' and p.iters <= 1500 and p.lr_steps[-1] < p.iters
    assert p.norm in ('bn', 'gn') and p.trainable_layers == 5 and not p.imagenet_backbone
    assert p.backbone == 'resnet18' and p.min_size <= 160 and p.fpn_channels <= 64
    assert (p.box_score_thresh, p.box_detections_per_img, p.neg_iou_floor) == (0.0, 300, 0.1)


def test_built_models_carry_the_preset():
    m = build_detector('lvis_r50')
    rh = m.roi_heads
    assert isinstance(rh, SimCalRoIHeads)
    assert (rh.box_predictor.cls_score.out_features, rh.box_predictor.bbox_pred.out_features) == (1231, 4 * 1231)
    assert rh.mask_predictor.mask_fcn_logits.out_channels == 1231
    assert (rh.score_thresh, rh.nms_thresh, rh.detections_per_img, rh.neg_iou_floor) == (0.0, 0.5, 300, 0.1)
    assert (rh.proposal_matcher.high_threshold, rh.proposal_matcher.low_threshold) == (0.5, 0.5)
    assert rh.box_roi_pool.output_size == (7, 7) and rh.mask_roi_pool.output_size == (14, 14)
    assert rh.box_roi_pool.sampling_ratio == 2
    assert (m.rpn.nms_thresh, m.rpn.fg_bg_sampler.batch_size_per_image, m.rpn.fg_bg_sampler.positive_fraction) == (0.7, 256, 0.5)
    assert (m.rpn.proposal_matcher.high_threshold, m.rpn.proposal_matcher.low_threshold) == (0.7, 0.3)
    # ImageNet normalisation (mmdet's mean/std in RGB, divided by 255)
    assert m.transform.image_mean == [0.485, 0.456, 0.406] and m.transform.image_std == [0.229, 0.224, 0.225]
    assert m.transform.size_divisible == 32
    c = build_detector('coco_lt_r50_ag')
    assert (c.roi_heads.score_thresh, c.roi_heads.detections_per_img) == (0.05, 100)
    assert c.roi_heads.box_predictor.bbox_pred.out_features == 4 and c.roi_heads.mask_predictor.mask_fcn_logits.out_channels == 1


def test_imagenet_resnet50_weights_load(tmp_path):
    ref = tv_resnet.resnet50(weights=None)
    g = torch.Generator().manual_seed(0)
    for mod in ref.modules():     # non-trivial statistics and affine parameters, as in a trained network
        if isinstance(mod, nn.BatchNorm2d):
            mod.running_mean.normal_(generator=g); mod.running_var.uniform_(0.5, 2.0, generator=g)
            with torch.no_grad(): mod.weight.uniform_(0.5, 1.5, generator=g); mod.bias.normal_(generator=g)
    torch.save(ref.state_dict(), tmp_path / 'resnet50.pth')
    model = build_detector('lvis_r50_ag')
    load_backbone_weights(model, tmp_path / 'resnet50.pth')
    body = model.backbone.body.state_dict()
    for k, v in ref.state_dict().items():
        if k.startswith('fc.') or k.endswith('num_batches_tracked'): continue
        assert torch.equal(body[k], v), k
    # frozen BN, and the stem and res2 frozen (frozen_stages = 1); res3-res5 trainable
    assert all(isinstance(m, misc_nn_ops.FrozenBatchNorm2d) for n, m in model.backbone.body.named_modules() if 'bn' in n.split('.')[-1])
    trainable = {n.split('.')[0] for n, p in model.backbone.body.named_parameters() if p.requires_grad}
    assert trainable == {'layer2', 'layer3', 'layer4'}
    # frozen BN computes y = (x - mean) / sqrt(var + eps) * w + b with the loaded numbers
    bn, rbn = model.backbone.body.bn1, ref.bn1.eval()
    x = torch.randn(2, 64, 5, 5)
    torch.testing.assert_close(bn(x), rbn(x), rtol=1e-5, atol=1e-5)
    # the wrong depth, a wrapped checkpoint, a missing file
    torch.save(tv_resnet.resnet101(weights=None).state_dict(), tmp_path / 'r101.pth')
    with pytest.raises(ValueError, match='unexpected: layer3.10'): load_backbone_weights(model, tmp_path / 'r101.pth')
    torch.save({'state_dict': {'module.' + k: v for k, v in ref.state_dict().items()}}, tmp_path / 'wrapped.pth')
    load_backbone_weights(build_detector('lvis_r50_ag'), tmp_path / 'wrapped.pth')
    with pytest.raises(ValueError, match='not found'): load_backbone_weights(model, tmp_path / 'none.pth')


def _tiny(**kw):
    args = dict(backbone='resnet18', norm='gn', trainable_layers=5, fpn_channels=16, box_head_dim=32,
                mask_head_convs=1, mask_head_channels=16, min_size=64, max_size=64, anchor_sizes=(8, 16, 32, 64, 128))
    args.update(kw)
    return build_mask_rcnn(4, **args)


def test_neg_iou_floor_in_select_training_samples():
    torch.manual_seed(0)
    gt = torch.tensor([[20., 20., 40., 40.]])
    # 400 proposals sliding away from the box: IoUs from 1 down to 0
    shifts = torch.linspace(0, 40, 400)
    props = torch.stack([20 + shifts, 20 + shifts * 0.5, 40 + shifts, 40 + shifts * 0.5], 1)
    iou = box_ops.box_iou(gt, props)[0]
    assert (iou < 0.1).sum() > 100 and ((iou >= 0.1) & (iou < 0.5)).sum() > 50
    targets = [{'boxes': gt, 'labels': torch.tensor([2]), 'masks': torch.zeros(1, 96, 96, dtype=torch.uint8)}]
    for floor in (0.0, 0.1, 0.3):
        rh = _tiny(neg_iou_floor=floor, box_batch_size_per_image=512).roi_heads
        sampled, matched, labels, _ = rh.select_training_samples([props.clone()], targets)
        neg = labels[0] == 0
        ious = box_ops.box_iou(gt, sampled[0])[0]
        assert neg.sum() > 0
        if floor == 0.0: assert ious[neg].min() < 0.1        # torchvision: negatives down to IoU 0
        else:
            assert ious[neg].min() >= floor - 1e-6               # the release: none below the floor
            assert int(neg.sum()) == int(((iou >= floor) & (iou < 0.5)).sum())   # and all above it are kept
        assert ious[labels[0] > 0].min() >= 0.5
        assert (labels[0][labels[0] > 0] == 2).all()
    with pytest.raises(ValueError, match='neg_iou_floor'): _tiny(neg_iou_floor=0.7)


def test_class_agnostic_and_classwise_outputs():
    torch.manual_seed(0)
    ag, cw = _tiny(class_agnostic=True).eval(), _tiny(class_agnostic=False).eval()
    feats = torch.randn(5, 32)
    with torch.no_grad():
        _, d_ag = ag.roi_heads.box_predictor(feats)
        _, d_cw = cw.roi_heads.box_predictor(feats)
        m_ag = ag.roi_heads.mask_predictor(torch.randn(5, 16, 14, 14))
    d_ag = d_ag.view(5, 4, 4)
    assert torch.equal(d_ag, d_ag[:, :1].expand(5, 4, 4)) and not torch.equal(d_cw.view(5, 4, 4)[:, 1], d_cw.view(5, 4, 4)[:, 2])
    assert torch.equal(m_ag[:, 1], m_ag[:, 3])
    # mmdet v1 initialisation of the box predictor
    pred = build_detector('lvis_r50_ag').roi_heads.box_predictor
    assert isinstance(pred, AgnosticBoxPredictor)
    assert pred.cls_score.weight.std().item() == pytest.approx(0.01, rel=0.05)
    assert pred.bbox_pred.weight.std().item() == pytest.approx(0.001, rel=0.1)


def test_paper_model_trains_a_step(tmp_path):
    torch.save(tv_resnet.resnet50(weights=None).state_dict(), tmp_path / 'r50.pth')
    torch.manual_seed(0)
    # the paper's model at a small image size, sampling 64 RoIs per image (not 512) to keep the mask head cheap
    model = build_detector('lvis_r50_ag', min_size=128, max_size=160, box_batch_size_per_image=64)
    load_backbone_weights(model, tmp_path / 'r50.pth')
    imgs = [torch.rand(3, 120, 150), torch.rand(3, 150, 120)]
    tg = [{'boxes': torch.tensor([[10., 10., 60., 70.], [70., 20., 140., 100.]]), 'labels': torch.tensor([5, 1230]),
           'masks': torch.zeros(2, 120, 150, dtype=torch.uint8)},
          {'boxes': torch.tensor([[5., 30., 100., 140.]]), 'labels': torch.tensor([17]), 'masks': torch.ones(1, 150, 120, dtype=torch.uint8)}]
    losses = model(imgs, tg)
    assert set(losses) == {'loss_classifier', 'loss_box_reg', 'loss_mask', 'loss_objectness', 'loss_rpn_box_reg'}
    assert all(torch.isfinite(v) and v > 0 for v in losses.values())
    sum(losses.values()).backward()
    body = model.backbone.body
    assert body.conv1.weight.grad is None and body.layer1[0].conv1.weight.grad is None
    assert body.layer2[0].conv1.weight.grad is not None and body.layer2[0].conv1.weight.grad.abs().sum() > 0
    # inference keeps 300 detections per image at score threshold 0 (50 proposals x 1230 classes compete for them;
    # the paper's 1000 proposals make this step take a minute on a CPU)
    # (boxes only here: 300 masks of the paper's 4x256 mask head cost half a minute on a CPU)
    model.eval()
    model.rpn._pre_nms_top_n['testing'] = model.rpn._post_nms_top_n['testing'] = 50
    model.roi_heads.mask_roi_pool = None
    with torch.no_grad(): out = model(imgs)
    assert [len(o['boxes']) for o in out] == [300, 300]
    assert all(o['scores'].min() > 0 and o['labels'].min() >= 1 for o in out)


def test_preset_overrides_and_round_trip():
    p = PRESETS['lvis_r50_ag']
    assert p.replace(iters=90000).lr_steps == (60000, 82500)
    assert DetectorPreset.from_dict(p.to_dict()) == p
    with pytest.raises(ValueError, match='exactly one of epochs and iters'): p.replace(iters=10, epochs=2)
    with pytest.raises(ValueError, match='norm'): p.replace(norm='ln')
