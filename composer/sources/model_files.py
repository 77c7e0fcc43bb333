"""Which files a model folder may make composer read: a name found in a model folder (a shard an index names,
a tokenizer file, an adapter's weights) is opened only when it stays inside the folder's allowed root.

The rule (`model_file` applies it):

1. A name is a relative path inside the folder: never absolute, never with a `..` part. It may come from composer
   (a fixed name, a glob) or from inside a model's own files (an index's shard names), which a downloaded model
   controls, so `../../elsewhere.safetensors` or `/etc/passwd` in an index is refused before anything is opened.
2. Links followed, the file must lie inside the folder's root. For a hub snapshot
   (`.../models--org--name/snapshots/<commit>/...`) the root is the repository's cache folder `models--org--name`:
   every snapshot file is a link into its `blobs/`, which is fine, and nothing outside that repository is.
   Otherwise the root is the folder as the user named it, its own path resolved (a folder that is itself a
   link works).
3. A plain local folder (never a hub snapshot) is the user's own, and may be a folder of links to another
   model's files. So there, and only there:
   - a file read only as model data (`weights=True`: weights, an index, an adapter's config) may be a link
     anywhere. What it points at must parse as weights (or an index, whose own names still obey rule 1), so such
     a link can bring in another model's weights and nothing else;
   - a file whose bytes reach the output (config, tokenizer files, model card) may be a link into the folders
     the folder's weights resolve into (`also_inside`), and nowhere else: a `tokenizer.json` linking to
     `~/.ssh/id_rsa` is refused, a folder of links to a real model folder works.

A name that breaks the rule is a ComposerError naming the folder or the file that held the name, the name, and
where it points.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable
from pathlib import Path, PurePath

from composer.errors import ComposerError
from composer.files import kind_of

HUB_REPOSITORY_PREFIXES = ("models--", "datasets--", "spaces--")


def hub_repository(folder: Path) -> Path | None:
    """The hub cache repository folder (`models--org--name`) that `folder` (resolved) is a snapshot of or lies in."""
    parts = Path(os.path.realpath(folder)).parts
    for depth in range(len(parts) - 2, 0, -1):
        if parts[depth] == "snapshots" and parts[depth - 1].startswith(HUB_REPOSITORY_PREFIXES):
            return Path(*parts[:depth])
    return None


def model_file(
    folder: Path, name: str, *, named_in: Path | None = None, weights: bool = False, also_inside: Iterable[Path] = ()
) -> Path | None:
    """`folder / name` when it is a regular file that the rule above lets composer read, None when no file is there.

    `named_in` is the file the name was read from (an index), for the error; `weights` and `also_inside` are the
    widenings of rule 3, ignored for a hub snapshot."""
    path = folder / name
    target = Path(os.path.realpath(path))
    pure = PurePath(name)
    if pure.anchor or ".." in pure.parts:
        holder = f"{named_in} names" if named_in else f"Model folder {folder} holds the name"
        raise ComposerError(
            f"{holder} '{name}', which is not a plain name inside the model folder {folder} (it leads to {target}). A name "
            "in a model's files must be a file inside its folder (no absolute path, no '..'); composer refuses it, since a downloaded model "
            "could otherwise make it read any file on this machine. Fix or remove that entry."
        )
    repository = hub_repository(folder)
    if repository is not None:
        roots, where = [repository], f"its hub cache repository {repository}"
    else:
        extra = [Path(os.path.realpath(root)) for root in also_inside]
        roots = [Path(os.path.realpath(folder)), *extra]
        where = f"the model folder {folder}" + (
            f" and the folders its weights are in ({', '.join(map(str, extra))})" if extra else ""
        )
    if not (weights and repository is None) and not any(target.is_relative_to(root) for root in roots):
        named = f" (named in {named_in})" if named_in else ""
        raise ComposerError(
            f"{path}{named} leads through links to {target}, outside {where}. composer reads a model's files only from inside its "
            "folder, so that a downloaded model cannot make it read, or copy into its output, other files on this machine. "
            "If you made this link yourself, copy the file into the folder instead."
        )
    try:
        mode = target.stat().st_mode
    except OSError:
        return None
    if not stat.S_ISREG(mode):
        raise ComposerError(
            f"{path} is {kind_of(mode)}, not a regular file; a model folder's files must hold their data."
        )
    return path
