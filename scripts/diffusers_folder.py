"""Write a bundle's source model (preset + seed, or a diffusers folder) as a diffusers folder, so a
peer's exporter (Optimum, optimum-intel) starts from exactly the bundle's weights. Atomic: written
under a temp name, renamed into place; a folder already there is kept.

    .venv/bin/python scripts/diffusers_folder.py bundles/sd15 bundles/sd15-diffusers
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

from export.models import load_bundle_model, save_diffusers_folder


def main(bundle: Path, folder: Path) -> int:
    if (folder / "model_index.json").is_file():
        return 0
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    save_diffusers_folder(load_bundle_model(bundle), tmp)
    os.replace(tmp, folder)
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: diffusers_folder.py BUNDLE_DIR OUT_FOLDER")
    sys.exit(main(Path(sys.argv[1]), Path(sys.argv[2])))
