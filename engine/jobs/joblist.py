"""The job list of a batch: which contents meet which styles, and where each result goes.

Inputs are files, folders (their images, not recursively) or glob patterns. Jobs are either
every content with every style set, or explicit rows of a CSV file. A job's identity is its
output's path inside the batch folder: the journal knows jobs by it.
"""

from __future__ import annotations

import csv
import glob
import string
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from PIL import Image

from ..config import StyleConfig
from ..errors import EngineError
from ..files import is_glob

DEFAULT_NAME = "{content}--{style}.{ext}"
NAME_FIELDS = ("content", "style", "ext")


class JobListError(EngineError):
    """A job list that cannot be built; the message names the input and what to do."""


@dataclass(frozen=True)
class JobSpec:
    """A job before its settings are known: the files and the output's name in the batch folder."""

    content: Path
    styles: tuple[Path, ...]  # one style, or several blended
    name: str  # output path relative to the batch folder, '/'-separated
    line: int = 0  # the CSV line it came from (0: not from a CSV)
    overrides: Mapping[str, str] = field(default_factory=dict)  # the CSV's extra columns, as written


@dataclass(frozen=True)
class Job:
    """One stylisation of a batch: plain data, sent as it is to whichever worker runs it."""

    key: str  # output path relative to the batch folder, '/'-separated: the job's name in the journal
    content: Path
    styles: tuple[Path, ...]
    output: Path
    cfg: StyleConfig

    @property
    def init(self) -> Path | None:
        """The init image file, when the settings name one."""
        from ..config import INIT_CHOICES

        return None if self.cfg.init in INIT_CHOICES else Path(self.cfg.init)

    @property
    def masks(self) -> tuple[Path, ...]:
        """The mask files the settings name (`StyleConfig.mask_files`)."""
        return self.cfg.mask_files()

    @property
    def inputs(self) -> tuple[Path, ...]:
        """Every file the job reads (never overwritten); the masks last, after the init image."""
        return (self.content, *self.styles, *((self.init,) if self.init else ()), *self.masks)


def image_suffixes() -> frozenset[str]:
    """Extensions Pillow can open, lower case with the dot."""
    return frozenset(ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN)


def expand_images(specs: Iterable[str | Path], *, what: str = "content", exclude: Path | None = None) -> list[Path]:
    """Files as given; a folder's image files (sorted, not hidden, not recursive); a glob's matching
    image files (sorted, `**` recursive). Files inside `exclude` (the batch folder: its results)
    are left out of folders and globs. Duplicates keep their first place."""
    suffixes = image_suffixes()
    skip = exclude.resolve() if exclude is not None else None

    def wanted(p: Path) -> bool:
        return p.is_file() and p.suffix.lower() in suffixes and not p.name.startswith(".") and (skip is None or p.resolve().parent != skip)

    out: list[Path] = []
    for spec in specs:
        text = str(spec)
        p = Path(text).expanduser()
        if p.is_file():
            found = [p]
        elif p.is_dir():
            found = sorted(q for q in p.iterdir() if wanted(q))
            if not found and skip is not None and p.resolve() == skip:
                raise JobListError(f"{what} folder {p} is the output folder, whose images are results, not inputs; give the output another folder (-o)")
            if not found:
                raise JobListError(f"{what} folder {p} has no images ({', '.join(sorted({'.png', '.jpg', '.jpeg', '.webp', '.tif'}))}, ...)")
        elif is_glob(text):
            found = sorted(q for q in (Path(m) for m in glob.glob(str(p), recursive=True)) if wanted(q))
            if not found:
                raise JobListError(f"{what} pattern {text!r} matches no image files")
        else:
            raise JobListError(f"{what} {text}: no such file or folder")
        out.extend(q for q in found if q not in out)
    return out


def style_sets(specs: Iterable[str], *, exclude: Path | None = None) -> list[tuple[Path, ...]]:
    """`--style` values: each file, folder entry or glob match is a style of its own; `a.jpg,b.jpg`
    (files only) is one blend of several images."""
    out: list[tuple[Path, ...]] = []
    for spec in specs:
        text = str(spec)
        if "," in text and not Path(text).expanduser().exists():
            parts = [s.strip() for s in text.split(",") if s.strip()]
            for part in parts:
                if not Path(part).expanduser().is_file():
                    why = "a folder or pattern" if is_glob(part) or Path(part).expanduser().is_dir() else "not a file"
                    raise JobListError(f"`style` {text}: {part} is {why}; a blend (a.jpg,b.jpg) takes image files", params=("style",))
            blend = tuple(Path(p).expanduser() for p in parts)
            if blend not in out:
                out.append(blend)
        else:
            for p in expand_images([text], what="style", exclude=exclude):
                if (p,) not in out:
                    out.append((p,))
    return out


def unique_stems(paths: Sequence[Path]) -> dict[Path, str]:
    """Each path's file stem; a stem shared by different files gets `-2`, `-3`... in order after
    the first, never landing on another file's stem."""
    taken = {p.stem for p in paths}
    out: dict[Path, str] = {}
    seen: set[str] = set()
    for p in paths:
        if p in out:
            continue
        stem = p.stem
        if stem in seen:
            n = 2
            while f"{stem}-{n}" in taken or f"{stem}-{n}" in seen:
                n += 1
            stem = f"{stem}-{n}"
        seen.add(stem)
        out[p] = stem
    return out


def _writable_ext(path: Path) -> str:
    """The content's own extension when Pillow can write an RGB image in it, else png."""
    from ..images import writes_rgb  # images imports torch; `nst batch --help` does not

    ext = path.suffix.lower()
    fmt = Image.registered_extensions().get(ext)
    return ext[1:] if fmt is not None and fmt in Image.SAVE and writes_rgb(fmt) else "png"


def check_name_template(template: str) -> None:
    """Raise JobListError for a `--name` with unknown fields or no file name."""
    try:
        fields = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
    except ValueError as e:
        raise JobListError(f"`name` {template!r}: {e}", params=("name",)) from None
    bad = [f for f in fields if f not in NAME_FIELDS]
    if bad:
        raise JobListError(f"`name` {template!r}: unknown field {{{bad[0]}}}; use {', '.join('{' + f + '}' for f in NAME_FIELDS)}", params=("name",))


def output_name(template: str, *, content: str, style: str, ext: str) -> str:
    """The template filled in and checked: a relative path inside the batch folder."""
    name = template.format(content=content, style=style, ext=ext)
    return relative_name(name, what=f"`name` {template!r} gives {name!r}")


def relative_name(name: str, *, what: str) -> str:
    """`name` as a '/'-separated path that stays inside the batch folder, or JobListError."""
    p = PurePosixPath(name.replace("\\", "/"))
    if not name.strip() or p.is_absolute() or ".." in p.parts or not p.name:
        raise JobListError(f"{what}: an output must be a file name inside the output folder", params=("name", "jobs"))
    return str(p)


def job_grid(contents: Sequence[Path], styles: Sequence[tuple[Path, ...]], *, name: str = DEFAULT_NAME) -> list[JobSpec]:
    """Every content with every style set, named by `name` (fields {content}, {style}, {ext})."""
    check_name_template(name)
    c_stems = unique_stems(contents)
    s_stems = unique_stems([p for s in styles for p in s])
    specs = []
    for c in contents:
        for s in styles:
            style = "+".join(s_stems[p] for p in s)
            specs.append(JobSpec(c, tuple(s), output_name(name, content=c_stems[c], style=style, ext=_writable_ext(c))))
    check_unique(specs)
    return specs


def check_unique(specs: Sequence[JobSpec]) -> None:
    """Two jobs may not write one output."""
    seen: dict[str, JobSpec] = {}
    for s in specs:
        if s.name in seen:
            o = seen[s.name]
            where = f" (lines {o.line} and {s.line})" if s.line else f" ({o.content.name} with {'+'.join(p.name for p in o.styles)}, and {s.content.name} with {'+'.join(p.name for p in s.styles)})"
            raise JobListError(f"two jobs would both write {s.name}{where}; give each its own output (`name` with {{content}} and {{style}})", params=("name",))
        seen[s.name] = s


def _column(name: str) -> str:
    return name.strip().lstrip("-").replace("-", "_").lower()


def read_jobs_csv(path: Path, *, name: str = DEFAULT_NAME) -> list[JobSpec]:
    """Rows `content,style,output` plus optional columns that override options for that row.

    Relative paths are relative to the CSV file's folder; `style` may list several images
    (`"a.jpg,b.jpg"`, quoted) to blend them; an empty `output` is named by `name`. Extra
    columns are returned as written (`JobSpec.overrides`); empty cells override nothing.
    """
    path = Path(path)
    if not path.is_file():
        raise JobListError(f"`jobs` {path}: no such file", params=("jobs",))
    base = path.parent
    try:
        with path.open(newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            columns = [_column(c) for c in (reader.fieldnames or [])]
            missing = [c for c in ("content", "style") if c not in columns]
            if missing:
                raise JobListError(f"`jobs` {path}: no {' or '.join(missing)} column (the header needs content,style[,output,...])", params=("jobs",))
            if len(set(columns)) != len(columns):
                raise JobListError(f"`jobs` {path}: a column appears twice in the header", params=("jobs",))
            rows = [(reader.line_num, {_column(k): (v or "").strip() for k, v in row.items() if k is not None}) for row in reader]
    except (UnicodeDecodeError, csv.Error) as e:
        raise JobListError(f"`jobs` {path}: not a readable CSV file ({e})", params=("jobs",)) from None
    check_name_template(name)
    specs = []
    for line, row in rows:
        if not any(row.values()):
            continue
        if not row.get("content") or not row.get("style"):
            raise JobListError(f"`jobs` {path}, line {line}: content and style are required", params=("jobs",))
        content = _resolve(base, row["content"], f"`jobs` {path}, line {line}: content")
        styles = tuple(_resolve(base, s.strip(), f"`jobs` {path}, line {line}: style") for s in row["style"].split(",") if s.strip())
        out = row.get("output", "")
        if out:
            out = relative_name(out, what=f"`jobs` {path}, line {line}: output {out!r}")
        else:
            out = output_name(name, content=content.stem, style="+".join(p.stem for p in styles), ext=_writable_ext(content))
        extra = {k: v for k, v in row.items() if k not in ("content", "style", "output") and v != ""}
        specs.append(JobSpec(content, styles, out, line, extra))
    if not specs:
        raise JobListError(f"`jobs` {path}: no rows", params=("jobs",))
    check_unique(specs)
    return specs


def _resolve(base: Path, text: str, what: str) -> Path:
    p = Path(text).expanduser()
    p = p if p.is_absolute() else base / p
    if not p.is_file():
        raise JobListError(f"{what} {text}: no such file ({p})", params=("jobs",))
    return p
