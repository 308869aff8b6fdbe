"""Official (released) formats: a registry beside the tokenizer registry of models/base.py.

Each `models/*_official.py` describes one released layout as an `OfficialFormat` and registers it
when imported (models/__init__.py imports them all): how to recognise a folder or file in that
layout, how to load it as one of our tokenizers (config conversion + one documented weight
mapping + a strict load), how to write one of ours back (where the release can express it), and
the names of released checkpoints (presets) with how to fetch each. `models.loading.load_tokenizer`
asks this registry and knows no model by name.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from tokenizers_vis.models.base import Tokenizer

# resolve(cache_dir) -> the folder or file of a released checkpoint, fetched under cache_dir.
PresetResolver = Callable[[Path], Path]


@dataclass(frozen=True)
class OfficialFormat:
    """One released layout.

    name: short unique name ("titok", "tokenflow", ...).
    recognise(path) -> bool: whether a folder (or file) is in this layout; cheap, reads no weights.
    load(path, **options) -> Tokenizer: our tokenizer, in eval mode, from such a folder (or file).
    save(tokenizer, path, **options) -> Path: writes one of ours in this layout; None where the
        release cannot be written back.
    presets: released checkpoint names -> resolver(cache_dir) giving the folder (or file) `load` reads.
    """

    name: str
    recognise: Callable[[Path], bool]
    load: Callable[..., Tokenizer]
    save: Callable[..., Path] | None = None
    presets: Mapping[str, PresetResolver] = field(default_factory=dict)


_FORMATS: dict[str, OfficialFormat] = {}


def register_official_format(fmt: OfficialFormat) -> OfficialFormat:
    """Add `fmt` to the registry; its name and preset names must be new."""
    if fmt.name in _FORMATS:
        raise ValueError(f"an official format named {fmt.name!r} is already registered")
    taken = {preset: other.name for other in _FORMATS.values() for preset in other.presets}
    clashes = sorted(set(fmt.presets) & set(taken))
    if clashes:
        raise ValueError(f"preset names {clashes} of {fmt.name!r} are already those of {taken[clashes[0]]!r}")
    _FORMATS[fmt.name] = fmt
    return fmt


def unregister_official_format(name: str) -> OfficialFormat:
    """Remove and return the format `name` (tests, or replacing a format)."""
    if name not in _FORMATS:
        raise KeyError(f"no official format named {name!r}; registered: {sorted(_FORMATS)}")
    return _FORMATS.pop(name)


def official_formats() -> tuple[OfficialFormat, ...]:
    """The registered formats, in registration order."""
    return tuple(_FORMATS.values())


def get_official_format(name: str) -> OfficialFormat:
    if name not in _FORMATS:
        raise KeyError(f"no official format named {name!r}; registered: {sorted(_FORMATS)}")
    return _FORMATS[name]


def find_official_format(path: str | os.PathLike) -> OfficialFormat | None:
    """The one registered format that recognises `path`, or None (e.g. a folder of ours).

    Raises ValueError when several do: layouts must be told apart by what they hold."""
    path = Path(path)
    matches = [fmt for fmt in _FORMATS.values() if fmt.recognise(path)]
    if len(matches) > 1:
        raise ValueError(f"{path} is recognised by several official formats: {[fmt.name for fmt in matches]}")
    return matches[0] if matches else None


def find_preset(name: str) -> tuple[OfficialFormat, PresetResolver] | None:
    """(format, resolver) of a released checkpoint name, or None when no format has that preset."""
    for fmt in _FORMATS.values():
        if name in fmt.presets:
            return fmt, fmt.presets[name]
    return None


def link_released_file(repo_id: str, filename: str, folder: Path, advice: str, link_name: str | None = None) -> Path:
    """`folder/link_name` (default `filename`) as a link to `repo_id/filename` in the Hub cache
    (downloaded when the network allows): how presets lay a released file into an official folder.
    An OSError naming the `hf download` command, then `advice` (what else the folder needs), when the
    file cannot be had."""
    from huggingface_hub import hf_hub_download

    try:
        weights = Path(hf_hub_download(repo_id, filename))
    except Exception as err:  # offline / missing: say what to do
        raise OSError(f"could not download {repo_id}/{filename} ({err}). Download it where there is network "
                      f"(`hf download {repo_id} {filename} --local-dir DIR`) {advice}") from err
    target = folder / (link_name or filename)
    if target.is_symlink() and not target.exists():  # a stale link to an emptied cache
        target.unlink()
    if not target.exists():
        target.symlink_to(weights)
    return target
