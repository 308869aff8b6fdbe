"""Image data: webdataset shards -> batches of {"image" (B,3,R,R) in [0,1], "key", "label"}.

- `ImageDataModule`: the training data (infinite, shuffled, augmented) and val/test data
  (deterministic, each image once across ranks); what `conf/data/*.yaml` instantiate.
- `make_eval_loader`: centre-cropped batches of any folder of images or shards.
- `write_shards` / `resolve_shards`: shard files on disk (`data/make_shards.py` uses them).
- `build_demo_shards` / `ensure_demo_shards`: offline demo data from scikit-image photos.
- `VideoDataModule` / `DemoVideoDataModule`, `make_video_train_loader` / `make_video_eval_loader`:
  the same for video clips, {"video" (B,T,3,R,R), "key", "text"} (data/video.py; demo_video.py
  builds the offline demo videos).
- `SkipCounter`: how many unreadable samples were skipped (`.skipped`); every loader has
  one (`datamodule.skip_counter`, `loader.skip_counter`).

Names are imported on first use, so the command-line tools (`python -m
tokenizers_vis.data.demo`, `data/make_shards.py`) do not pay for importing Lightning.
"""

from importlib import import_module
from typing import TYPE_CHECKING

_EXPORTS = {
    "ImageDataModule": "datamodule",
    "DemoDataModule": "datamodule",
    "build_demo_shards": "demo",
    "ensure_demo_shards": "demo",
    "VideoDataModule": "video_datamodule",
    "DemoVideoDataModule": "video_datamodule",
    "build_demo_video_shards": "demo_video",
    "ensure_demo_video_shards": "demo_video",
    "make_video_eval_loader": "video",
    "make_video_train_loader": "video",
    "CorruptSampleWarning": "pipeline",
    "SkipCounter": "pipeline",
    "make_eval_loader": "pipeline",
    "make_train_loader": "pipeline",
    "resolve_shards": "shards",
    "write_shards": "shards",
}
__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:
    from tokenizers_vis.data.datamodule import DemoDataModule, ImageDataModule
    from tokenizers_vis.data.demo import build_demo_shards, ensure_demo_shards
    from tokenizers_vis.data.pipeline import CorruptSampleWarning, SkipCounter, make_eval_loader, make_train_loader
    from tokenizers_vis.data.shards import resolve_shards, write_shards
    from tokenizers_vis.data.video import make_video_eval_loader, make_video_train_loader
    from tokenizers_vis.data.video_datamodule import DemoVideoDataModule, VideoDataModule
    from tokenizers_vis.data.demo_video import build_demo_video_shards, ensure_demo_video_shards


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
