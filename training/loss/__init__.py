"""DINOv2 training losses: DINO on the CLS token, iBOT on masked patches, KoLeo on student CLS."""

from lvd.training.loss.dino_clstoken_loss import DINOLoss
from lvd.training.loss.ibot_patch_loss import iBOTPatchLoss
from lvd.training.loss.koleo_loss import koleo_loss
from lvd.training.loss.teacher_targets import TeacherTargets, sinkhorn_knopp

__all__ = ["DINOLoss", "TeacherTargets", "iBOTPatchLoss", "koleo_loss", "sinkhorn_knopp"]
