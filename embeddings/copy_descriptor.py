"""A hand-built copy-detection descriptor with no learned weights: the offline stand-in for SSCD.

(B, 3, S, S) ImageNet-normalised images in (the whole picture resized to S x S, no centre crop:
the embed stage's `PreprocessConfig.whole`, set for this arch), (B, DIM) L2-normalised vectors out;
the cosine of two vectors says how likely one image is an edited copy of the other. Steps, and the
edits each serves:
  1. uniform borders (padding, the transparent margin of an icon composited on white by the
     decoder; a side only when its trimmed band is flat on average, not a sky) are trimmed, twice (the second pass, after a first trim, reads the border colour a
     few pixels in, past the band resampling blends with the cut-off padding), and the content box
     is resampled to GRID x GRID: padding, rescaling, icons drawn at several sizes;
  2. blocks computed on the content, in opponent colours: a zero-mean grey thumbnail (layout),
     cell means of the three channels relative to the image's mean (colour layout), gradient
     orientation histograms over a grid of cells (shapes and edges), a global orientation histogram
     at two scales (texture, unmoved by crops) and a global colour histogram (soft bins); the
     histograms are square-rooted and centred so unrelated images sit near zero cosine;
  3. each block is computed on the image and on its mirror image and summed (flip invariance),
     L2-normalised, weighted and concatenated.
Coarse grids tolerate crops, small rotations and overlays; JPEG and colour jitter move every block
only a little. What it misses most: crops of low-contrast pictures and of textures (see
benchmarks/dedup_quality.py). Built in-process by the model spec's arch "copy_descriptor".
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from lvd.embeddings.preprocess import IMAGENET_MEAN, IMAGENET_STD
from lvd.schemas.job_spec import COPY_DESCRIPTOR_SIZE, detector_dedup_thresholds

# The cosine above which two descriptors are copies, chosen on the real-image corpus
# (benchmarks/dedup_quality.py): the job spec's default dedup.threshold when this detector runs.
THRESHOLD = detector_dedup_thresholds("copy_descriptor")[0]
# The input the descriptor is measured with: the whole image resized to SIZE x SIZE (the job spec's
# default copy detector uses it).
SIZE = COPY_DESCRIPTOR_SIZE
GRID = 48  # the content box is resampled to GRID x GRID before the blocks are computed
DIM = 320  # output width (a multiple of 64, as PQ64 indexes need)


def compose_boxes(outer: torch.Tensor, inner: torch.Tensor) -> torch.Tensor:
    """The box `inner` (coordinates in [-1, 1] of the resampled `outer` box) in the outer image's frame."""
    cx = (outer[:, 0] + outer[:, 2]) / 2
    cy = (outer[:, 1] + outer[:, 3]) / 2
    hx = (outer[:, 2] - outer[:, 0]) / 2
    hy = (outer[:, 3] - outer[:, 1]) / 2
    return torch.stack(
        [cx + hx * inner[:, 0], cy + hy * inner[:, 1], cx + hx * inner[:, 2], cy + hy * inner[:, 3]], dim=1
    )


class CopyDescriptor(nn.Module):
    """See the module docstring. The *_weight arguments weigh the blocks against each other; the
    defaults were chosen on the corpus of `lvd.jobs.copy_corpus` (seeds 0-4)."""

    def __init__(
        self,
        thumb_weight: float = 0.5,
        colour_weight: float = 0.6,
        hog_weight: float = 1.0,
        hist_weight: float = 1.5,
        trim_tolerance: float = 0.08,
        hist_bins: int = 4,
        thumb_size: int = 8,
        cells: int = 4,
        texture_weight: float = 0.5,
        inner_ring_inset: int = 2,
        flat_border: float | None = 0.02,  # None: trim whatever lies within trim_tolerance
    ) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1))
        # RGB -> (intensity, red-green, yellow-blue) opponent colours.
        opp = torch.tensor([[1 / 3, 1 / 3, 1 / 3], [0.5, -0.5, 0.0], [0.25, 0.25, -0.5]], dtype=torch.float32)
        self.register_buffer("opponent", opp)
        raw = [thumb_weight, colour_weight, hog_weight, hist_weight, texture_weight]
        total = math.sqrt(sum(w * w for w in raw))
        self.weights = [w / total for w in raw]
        self.trim_tolerance = trim_tolerance
        self.hist_bins = hist_bins
        self.thumb_size = thumb_size
        self.cells = cells
        self.inner_ring_inset = inner_ring_inset
        self.flat_border = flat_border

    # -------------------------------------------------------------- step 1: trim and resample

    @staticmethod
    def border_colour(rgb: torch.Tensor, inset: int = 0) -> torch.Tensor:
        """(B, 3) median colour of the ring of pixels `inset` pixels in from the edge."""
        a, z = inset, rgb.shape[-1] - 1 - inset
        ring = [
            rgb[:, :, a, a : z + 1],
            rgb[:, :, z, a : z + 1],
            rgb[:, :, a : z + 1, a],
            rgb[:, :, a : z + 1, z],
        ]
        return torch.cat(ring, dim=2).median(dim=2).values

    def content_boxes(self, rgb: torch.Tensor, inset: int = 0) -> torch.Tensor:
        """(B, 4) boxes (x0, y0, x1, y1) in [-1, 1] of what is left after trimming uniform borders:
        rows/columns at the edge whose pixels all lie close to the border colour. The border colour is
        taken `inset` pixels in, and the outermost `inset` rows and columns are trimmed whatever they
        hold: after a first trim and resampling, they are a blend of the cut-off border and the content."""
        b, _, h, w = rgb.shape
        border = self.border_colour(rgb, inset).view(b, 3, 1, 1)
        far = (rgb - border).abs().amax(dim=1) > self.trim_tolerance  # (B, H, W)
        if inset:
            far[:, :inset] = far[:, -inset:] = False
            far[:, :, :inset] = far[:, :, -inset:] = False
        rows = far.float().mean(dim=2) > 0.01  # (B, H) a row with content
        cols = far.float().mean(dim=1) > 0.01
        idx_h = torch.arange(h, device=rgb.device).float()
        idx_w = torch.arange(w, device=rgb.device).float()
        big = float(max(h, w))
        y0 = torch.where(rows, idx_h, big).amin(dim=1)
        y1 = torch.where(rows, idx_h, -1.0).amax(dim=1)
        x0 = torch.where(cols, idx_w, big).amin(dim=1)
        x1 = torch.where(cols, idx_w, -1.0).amax(dim=1)
        if self.flat_border is not None:  # a side is trimmed only when its band is flat on average
            dev = (rgb - border).abs().amax(dim=1)  # (B, H, W)
            y0, y1 = self._flat_bands(dev.mean(dim=2), y0, y1, inset)
            x0, x1 = self._flat_bands(dev.mean(dim=1), x0, x1, inset)
        # Nothing but border (a blank image) or a tiny box: keep the whole image.
        small = ((y1 - y0) < 0.2 * h) | ((x1 - x0) < 0.2 * w)
        y0 = torch.where(small, 0.0, y0)
        x0 = torch.where(small, 0.0, x0)
        y1 = torch.where(small, h - 1.0, y1)
        x1 = torch.where(small, w - 1.0, x1)
        return torch.stack(
            [
                (x0 - 0.5) / w * 2 - 1 + 1 / w,
                (y0 - 0.5) / h * 2 - 1 + 1 / h,
                (x1 + 0.5) / w * 2 - 1 + 1 / w,
                (y1 + 0.5) / h * 2 - 1 + 1 / h,
            ],
            dim=1,
        )

    def _flat_bands(
        self, line_dev: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, inset: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Undo the trim of a side whose trimmed band is not flat: (lo, hi) content rows (or columns)
        of each image, given each line's mean distance to the border colour (B, n). Padding is flat;
        a sky or a low-contrast field that stays within the trim tolerance is not, and trimming it
        would cut a different box from each copy."""
        n = line_dev.shape[1]
        csum = torch.cat([torch.zeros_like(line_dev[:, :1]), line_dev.cumsum(dim=1)], dim=1)
        edge = torch.full_like(lo, float(inset))
        lo_c = torch.clamp(lo, min=inset, max=n - inset)
        head = (csum.gather(1, lo_c.long()[:, None])[:, 0] - csum[:, inset]) / torch.clamp(lo_c - edge, min=1)
        hi_c = torch.clamp(hi + 1, min=inset, max=n - inset)
        tail = (csum[:, n - inset] - csum.gather(1, hi_c.long()[:, None])[:, 0]) / torch.clamp(
            n - inset - hi_c, min=1
        )
        lo = torch.where(head > self.flat_border, torch.minimum(lo, edge), lo)
        hi = torch.where(tail > self.flat_border, torch.maximum(hi, n - 1 - edge), hi)
        return lo, hi

    def resample(self, rgb: torch.Tensor, boxes: torch.Tensor, size: int) -> torch.Tensor:
        """Each image's box, low-passed (box filter of the size that maps onto one output pixel),
        resampled to size x size."""
        b, _, h, _ = rgb.shape
        k = max(1, int(h // size))
        if k > 1:
            rgb = F.avg_pool2d(rgb, k, stride=1, padding=k // 2, count_include_pad=False)
        x0, y0, x1, y1 = boxes[:, 0], boxes[:, 1], boxes[:, 2], boxes[:, 3]
        theta = torch.zeros(b, 2, 3, device=rgb.device)
        theta[:, 0, 0] = (x1 - x0) / 2
        theta[:, 0, 2] = (x1 + x0) / 2
        theta[:, 1, 1] = (y1 - y0) / 2
        theta[:, 1, 2] = (y1 + y0) / 2
        grid = F.affine_grid(theta, [b, 3, size, size], align_corners=False)
        return F.grid_sample(rgb, grid, mode="bilinear", padding_mode="border", align_corners=False)

    # -------------------------------------------------------------- step 2: blocks

    def orientations(self, grey: torch.Tensor) -> torch.Tensor:
        """(B, 8, H-2, W-2) gradient magnitude soft-assigned to 8 unsigned orientation bins."""
        gx = grey[:, :, 1:-1, 2:] - grey[:, :, 1:-1, :-2]
        gy = grey[:, :, 2:, 1:-1] - grey[:, :, :-2, 1:-1]
        mag = torch.sqrt(gx * gx + gy * gy + 1e-12)
        ang = torch.remainder(torch.atan2(gy, gx), math.pi) / math.pi * 8  # [0, 8)
        bins = torch.arange(8, device=grey.device, dtype=grey.dtype).view(1, 8, 1, 1)
        dist = torch.remainder(ang - bins + 4, 8) - 4  # circular distance to each bin centre
        return torch.clamp(1 - dist.abs(), min=0) * mag

    def blocks(self, opp: torch.Tensor) -> list[torch.Tensor]:
        """Unnormalised blocks of (B, 3, GRID, GRID) opponent-colour images."""
        b = opp.shape[0]
        grey = opp[:, :1]
        thumb = F.adaptive_avg_pool2d(grey, self.thumb_size).flatten(1)
        thumb = thumb - thumb.mean(dim=1, keepdim=True)
        cells = F.adaptive_avg_pool2d(opp, self.cells)  # (B, 3, 4, 4)
        colour = (cells - cells.mean(dim=(2, 3), keepdim=True)).flatten(1)
        # Orientation histograms over cells x cells, and over the whole image at two scales.
        soft = self.orientations(grey)
        hog = F.adaptive_avg_pool2d(soft, self.cells)  # (B, 8, 4, 4)
        fine = soft.mean(dim=(2, 3))
        coarse = self.orientations(F.avg_pool2d(grey, 2)).mean(dim=(2, 3))
        texture = torch.sqrt(torch.cat([fine, coarse], dim=1))
        texture = texture - texture.mean(dim=1, keepdim=True)
        hog = torch.sqrt(hog)
        hog = hog - hog.mean(dim=1, keepdim=True)  # per cell: which orientations, not how much edge
        hog = hog.flatten(1)
        # Global histogram of opponent colours: soft bins, HIST_BINS per axis.
        n = self.hist_bins
        centres = torch.arange(n, device=opp.device, dtype=opp.dtype).view(1, n, 1, 1)
        axes = [
            torch.clamp(opp[:, 0], 0.0, 1.0) * (n - 1),
            torch.clamp(opp[:, 1] + 0.5, 0.0, 1.0) * (n - 1),
            torch.clamp(opp[:, 2] + 0.5, 0.0, 1.0) * (n - 1),
        ]
        soft = [torch.clamp(1 - (a.unsqueeze(1) - centres).abs(), min=0).flatten(2) for a in axes]
        joint = torch.einsum("bip,bjp,bkp->bijk", soft[0], soft[1], soft[2]) / soft[0].shape[-1]
        hist = torch.sqrt(joint.reshape(b, -1))
        hist = hist - hist.mean(dim=1, keepdim=True)
        return [thumb, colour, hog, hist, texture]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rgb = x.float() * self.std + self.mean
        # Twice: a padded copy loses its padding in the first pass and then, like the original, any
        # uniform margin of its own picture in the second.
        first = self.content_boxes(rgb)
        once = self.resample(rgb, first, rgb.shape[-1])
        # Only a first trim leaves a blended outer band to look past; an untrimmed image has none.
        trimmed_once = (first.abs() < 0.999).any(dim=1, keepdim=True)
        inner = torch.where(
            trimmed_once, self.content_boxes(once, self.inner_ring_inset), self.content_boxes(once)
        )
        content = self.resample(rgb, compose_boxes(first, inner), GRID)
        opp = torch.einsum("oc,bchw->bohw", self.opponent, content)
        straight = self.blocks(opp)
        mirrored = self.blocks(torch.flip(opp, dims=[3]))
        parts: list[torch.Tensor] = []
        for i in range(len(straight)):
            block = straight[i] + mirrored[i]
            parts.append(F.normalize(block, dim=1) * self.weights[i])
        out = torch.cat(parts, dim=1)
        pad = DIM - out.shape[1]
        if pad > 0:
            out = F.pad(out, [0, pad])
        return F.normalize(out, dim=1)
