"""Training-patch augmentation for IKD-MIL (our choice: the authors' code uses none).

Label-preserving for histology: tissue has no orientation (random flips and
90° rotations, on the uint8 patches) and stain and scanner vary (mild
brightness/contrast/saturation jitter and HED stain jitter, Tellez et al.
2019, on the float patches). Everything is drawn per patch from an explicit
generator, so a seeded run repeats. The weak label is an image-level label,
so geometric transforms need no mask handling.

The colour jitter is FBTA's (:class:`fbta.features.augment.Augment`, the
same stain vectors and ranges); geometry is done here on the uint8 patches.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from fbta.features.augment import Augment


def geometric(x: Tensor, gen: torch.Generator) -> Tensor:
    """Per-patch random horizontal/vertical flips and 90° rotations of uint8 B×H×W×3 (square) patches."""
    flips = torch.randint(0, 2, (len(x), 2), generator=gen)
    rots = torch.randint(0, 4, (len(x),), generator=gen)
    out = []
    for img, (fh, fv), k in zip(x, flips.tolist(), rots.tolist()):
        if fh:
            img = img.flip(1)
        if fv:
            img = img.flip(0)
        out.append(torch.rot90(img, k, (0, 1)) if k else img)
    return torch.stack(out)


def colour(x: Tensor, amount: float, hed_sigma: float, gen: Optional[torch.Generator] = None) -> Tensor:
    """Mild colour jitter of a float B×3×H×W batch in [0, 1]: HED stain jitter, then brightness, contrast and
    saturation factors in U(1 ± ``amount``); returns a new tensor clamped to [0, 1]."""
    jitter = Augment(flip=False, rot90=False, brightness=amount, contrast=amount, saturation=amount, hue=0.0,
                     hed_sigma=hed_sigma)
    return jitter(x.clone(), gen)
