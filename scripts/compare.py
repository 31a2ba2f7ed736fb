"""Compare the runtime with PyTorch: accuracy per component and end to end, speed, peak memory.

    python scripts/compare.py --bundle DIR [--model tiny|sd15|PATH] [--backend onnxruntime|tensorrt]
        [--precision fp32|fp16] [--size 512x512] [--steps N] [--runs N] [--out DIR]
        [--img2img STRENGTH [--mask]] [gates...]

--img2img S makes the end-to-end workload img2img at strength S (0 < S <= 1) from
export/init_images.py's init image at --size (diffusers' StableDiffusionImg2ImgPipeline on the
PyTorch side, the same random numbers on both); --mask adds its mask: inpainting
(StableDiffusionInpaintPipeline), required for a bundle with an inpainting UNet. The VAE encoder is
compared as a component whenever the bundle has one.

Writes report.md, report.json and PNG figures into --out (default out/compare). Exit code 0 when
every check passes, 1 when one fails, 2 on bad arguments, 3 on an unexpected error.
The code lives in export/compare/ (see its __init__ for the module map).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from export.compare.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
