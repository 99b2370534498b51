"""DINOv2 training losses: DINO on the CLS token, iBOT on masked patches, KoLeo on student CLS."""

from training.loss.dino_clstoken_loss import DINOLoss, sinkhorn_knopp
from training.loss.ibot_patch_loss import iBOTPatchLoss
from training.loss.koleo_loss import koleo_loss

__all__ = ["DINOLoss", "iBOTPatchLoss", "koleo_loss", "sinkhorn_knopp"]
