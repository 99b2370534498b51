"""DINOv2 training losses: DINO on the CLS token, iBOT on masked patches, KoLeo on student CLS."""

from training.loss.dino_clstoken_loss import DINOLoss
from training.loss.ibot_patch_loss import iBOTPatchLoss
from training.loss.koleo_loss import koleo_loss
from training.loss.teacher_targets import TeacherTargets, sinkhorn_knopp

__all__ = ["DINOLoss", "TeacherTargets", "iBOTPatchLoss", "koleo_loss", "sinkhorn_knopp"]
