"""Stand-ins shared by the tests: a two-stage view of the tiny Mask R-CNN (a cascade as only its adapter knows it)."""
import torch
from simcal.detector import MaskRCNNAdapter, ScoredBoxPredictor


class TwoStageAdapter(MaskRCNNAdapter):
    "The tiny Mask R-CNN seen as two stages: stage 2 re-samples the RoIs with its own seeds and reads the same features."
    num_stages = 2
    def _check_stage(self, stage): assert 0 <= stage < 2
    def sample_training_rois(self, images, targets, flips, seeds, **kw):
        s = super().sample_training_rois(images, targets, flips, seeds, **kw)
        s2 = super().sample_training_rois(images, targets, flips, [x + 1 for x in seeds], **kw)
        return {**s, 'stages': s['stages'] + s2['stages']}
    def install_scorer(self, scorer):
        super().install_scorer(scorer)
        self.model.roi_heads.box_predictor = TwoStagePredictor(self.model.roi_heads.box_predictor.box_predictor, scorer)


class TwoStagePredictor(ScoredBoxPredictor):
    "Both stages' logits and features (the same ones) to the scorer."
    def forward(self, x):
        box_features, roi_features = x
        logits, deltas = self.box_predictor(box_features)
        return torch.log(self.scorer([logits, logits], [roi_features, roi_features])), deltas
