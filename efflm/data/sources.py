"""Data sources: the standard library's Python files, local text and jsonl files, a
prepared TFDS dataset (`tfds.py`), several of them in proportions (`mixture.py`), or
generated token ids (`mqar`).

Each source is a grain random-access data source (`__len__`, `__getitem__`) whose
items are documents (str; files are read when grain asks for one, not before) or, for
a source with its own `tokenizer`, rows of token ids.
"""

from __future__ import annotations

import dataclasses
import functools
import glob
import hashlib
import json
import os
import sysconfig
from dataclasses import dataclass, field

import numpy as np

from efflm.data.base import DataSource
from efflm.data.mixture import ConcatSource, Mixture
from efflm.data.mqar import Mqar
from efflm.data.tfds import Tfds
from efflm.errors import ConfigError, DataError

SPLITS = ("train", "val")


@functools.cache
def pycode_files() -> tuple[str, tuple[str, ...]]:
    """The stdlib folder and the relative paths of its .py files, sorted; no site-packages."""
    root = sysconfig.get_paths()["stdlib"]
    names = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if d not in ("site-packages", "dist-packages")]
        rel = os.path.relpath(folder, root).replace(os.sep, "/")
        names += [f if rel == "." else f"{rel}/{f}" for f in files if f.endswith(".py")]
    return root, tuple(sorted(names))


def is_validation(name: str, val_fraction: float) -> bool:
    """Whether the file `name` is held out: its md5 falls in the first `val_fraction`."""
    digest = int.from_bytes(hashlib.md5(name.encode("utf-8")).digest()[:8], "big")
    return digest < val_fraction * 2**64


class PyCodeSource:
    """Python files under `root`, one document each."""

    def __init__(self, root: str, names: list[str]):
        self.root, self.names = root, list(names)

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, index: int) -> str:
        path = os.path.join(self.root, self.names[index])
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read()


def num_held_out(n: int, val_fraction: float) -> int:
    """How many of n items (docs or chars) go to validation: about the fraction, but
    at least one on each side when n >= 2."""
    return 0 if n < 2 else min(n - 1, max(1, round(n * val_fraction)))


class FileSource:
    """Documents from local files, as segments (path, offsets, part):

    - offsets None: a text file is one document; part "all", "head" (all but the
      trailing `val_fraction` of its characters) or "tail" (that trailing part).
    - offsets an array: byte offsets of lines of a .jsonl file, one document each.
    """

    def __init__(self, segments: list, val_fraction: float):
        self.segments = [s for s in segments if s[1] is None or len(s[1])]
        self.val_fraction = val_fraction
        sizes = [1 if offsets is None else len(offsets) for _, offsets, _ in self.segments]
        self.starts = np.cumsum([0] + sizes)

    def __len__(self) -> int:
        return int(self.starts[-1])

    def __getitem__(self, index: int) -> str:
        if not 0 <= index < len(self):
            raise IndexError(f"document {index} of {len(self)}")
        seg = int(np.searchsorted(self.starts, index, side="right")) - 1
        path, offsets, part = self.segments[seg]
        if offsets is not None:
            with open(path, "rb") as f:
                f.seek(int(offsets[index - self.starts[seg]]))
                return json.loads(f.readline())["text"]
        with open(path, encoding="utf-8", errors="replace") as f:
            text = f.read()
        cut = len(text) - num_held_out(len(text), self.val_fraction)
        return {"all": text, "head": text[:cut], "tail": text[cut:]}[part]


def _files_in(folder: str) -> list[str]:
    """Files under `folder`, recursively, sorted; hidden files and folders skipped."""
    found = []
    for sub, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        found += [os.path.join(sub, f) for f in files if not f.startswith(".")]
    return sorted(found)


def expand_paths(patterns: list[str], key: str) -> list[str]:
    """Files named by `patterns`: files, folders (their files) or glob patterns."""
    out = []
    for pattern in patterns:
        if any(c in pattern for c in "*?["):
            matches = sorted(glob.glob(pattern, recursive=True))
            if not matches:
                raise DataError(f"{key}: pattern {pattern!r} matches no files; "
                                "check the path, or quote it so the shell does not expand it")
            for m in matches:
                out += _files_in(m) if os.path.isdir(m) else [m]
        elif os.path.isdir(pattern):
            inside = _files_in(pattern)
            if not inside:
                raise DataError(f"{key}: directory {pattern!r} has no files; put .txt or "
                                ".jsonl files in it or name files instead")
            out += inside
        elif os.path.isfile(pattern):
            out.append(pattern)
        else:
            raise DataError(f"{key}: {pattern!r} does not exist; give existing .txt or .jsonl "
                            "files, folders or glob patterns")
    return out


def jsonl_offsets(path: str, key: str) -> np.ndarray:
    """Byte offsets of the documents (non-blank lines) of a .jsonl file, each checked
    to be a JSON object with a string "text"."""
    offsets, offset = [], 0
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            if line.strip():
                try:
                    obj = json.loads(line)
                except ValueError:
                    obj = None
                if not (isinstance(obj, dict) and isinstance(obj.get("text"), str)):
                    raise DataError(f"{key}: {path!r} line {lineno} is not a JSON object with "
                                    'a string "text" field; each line must look like '
                                    '{"text": "..."}')
                offsets.append(offset)
            offset += len(line)
    return np.array(offsets, dtype=np.int64)


def file_source(patterns: list[str], key: str, val_fraction: float, split: str) -> FileSource:
    """Documents of the files named by `patterns`: split "all", or "train" / "val" for
    all but / only the trailing `val_fraction` of each file."""
    segments = []
    for path in expand_paths(patterns, key):
        if path.endswith(".jsonl"):
            offsets = jsonl_offsets(path, key)
            if not len(offsets):
                raise DataError(f"{key}: {path!r} has no documents; a .jsonl file needs at "
                                'least one line like {"text": "..."}')
            cut = len(offsets) - num_held_out(len(offsets), val_fraction)
            offsets = {"all": offsets, "train": offsets[:cut], "val": offsets[cut:]}[split]
            segments.append((path, offsets, "all"))
        else:
            if os.path.getsize(path) == 0:
                raise DataError(f"{key}: {path!r} is empty; each file must hold at least "
                                "one document (or leave it out)")
            segments.append((path, None, {"all": "all", "train": "head", "val": "tail"}[split]))
    return FileSource(segments, val_fraction)


@dataclass
class FilesSettings:
    """`data.files`: .txt files (one document each) and .jsonl files (one {"text": ...}
    per line), as files, folders or glob patterns."""

    paths: list[str] = field(default_factory=list)
    # Validation files; empty: the trailing data.val_fraction of each training file.
    val_paths: list[str] = field(default_factory=list)


class PyCode(DataSource):
    """`data.source=pycode`: the Python files of the interpreter's standard library, a
    data.val_fraction of them (by a hash of the name) held out for validation."""

    @staticmethod
    def open(cfg, split: str):
        root, names = pycode_files()
        held_out = split == "val"
        source = PyCodeSource(root, [n for n in names
                                     if is_validation(n, cfg.val_fraction) == held_out])
        return source, f"the standard library at {root} with data.val_fraction={cfg.val_fraction}"


class Files(DataSource):
    """`data.source=files`: local text and jsonl files (`data.files.*`)."""

    settings = FilesSettings
    resumable = ("paths", "val_paths")  # a resume may point at other files

    @staticmethod
    def validate_config(cfg) -> None:
        if not cfg.files.paths:
            raise ConfigError("data.source=files needs data.files.paths, e.g. "
                              "data.files.paths=[corpus/a.txt,corpus/b.jsonl]")

    @staticmethod
    def open(cfg, split: str):
        own = cfg.files
        if not own.paths:
            raise DataError("data.source=files needs data.files.paths, e.g. "
                            "data.files.paths=[corpus/a.txt,corpus/b.jsonl]")
        if own.val_paths:
            patterns, key = ((own.val_paths, "data.files.val_paths") if split == "val"
                             else (own.paths, "data.files.paths"))
            return file_source(patterns, key, cfg.val_fraction, "all"), key
        return (file_source(own.paths, "data.files.paths", cfg.val_fraction, split),
                f"data.files.paths with data.val_fraction={cfg.val_fraction} (a .jsonl file "
                "with a single line gives no validation document); set data.files.val_paths")


# `data.source` -> the source.
SOURCES = {"pycode": PyCode, "files": Files, "mqar": Mqar, "tfds": Tfds, "mixture": Mixture}


def mixture_parts(cfg) -> list | None:
    """A mixture's parts, (source name, weight, data config), each checked to be a
    source of text (with its own settings valid); None for a single source."""
    parts = SOURCES[cfg.source].components(cfg)
    for name, _, sub in parts or ():
        key = f"data.mixture.sources entry {name!r}"
        if name not in SOURCES or SOURCES[name].components(sub) is not None:
            text = [s for s in SOURCES if SOURCES[s].tokenizer(sub) is None
                    and SOURCES[s].components(dataclasses.replace(sub, source=s)) is None]
            raise ConfigError(f"{key} is not a source of text; choose among: "
                              f"{', '.join(text)}")
        if SOURCES[name].tokenizer(sub) is not None:
            raise ConfigError(f"{key}: {name} yields token ids, not text; a mixture mixes "
                              "text sources")
        SOURCES[name].validate_config(sub)
    return parts


def make_source(cfg, split: str):
    """The documents of `split` ("train" or "val") that `cfg` (a DataConfig) names; of a
    mixture, its sources' documents one after another."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if cfg.source not in SOURCES:
        raise DataError(f"data.source={cfg.source!r} is not a valid choice; choose one of: "
                        f"{', '.join(SOURCES)}")
    parts = mixture_parts(cfg)
    if parts:
        return ConcatSource([make_source(sub, split) for _, _, sub in parts])
    source, where = SOURCES[cfg.source].open(cfg, split)
    if not len(source):
        name = "training" if split == "train" else "validation"
        raise DataError(f"no {name} documents in {where}")
    return source
