"""The medlvr JSONL format: one record per question, validated line by line.

One line:

    {"id": "synth-000017", "images": ["images/000017.png"], "question": "Is there a lesion?",
     "options": ["yes", "no"] | null, "answer": "yes",
     "rois": [{"image": 0, "box": [x0, y0, x1, y1]}], "split": "train",
     "source": "synth", "qtype": "presence"}

- images: paths, relative to the JSONL file's directory or absolute; at least one. An entry is a
  path string or {"path": ..., "slice": k} for a 3-D source (multi-frame DICOM, DICOM series
  folder, NIfTI volume, multi-page TIFF). Formats: medlvr/imageio/reader.py.
- window: optional; a windowing preset or "W/L" pair for images without a window of their own
  (medlvr/imageio/windowing.py).
- rois: optional; boxes in pixels of the ORIGINAL image `images[image]`, x0 < x1, y0 < y1, inside
  the image. Records without ROI are fine (stage 1 skips their alignment term).
- options: optional; when given they must contain the answer.
- id, split, source, qtype: strings; split defaults to "train", source to the file stem, qtype to "".
- answer_type, modality, body_part, meta: optional, what a benchmark's evaluation breaks results
  down by. answer_type is "open" or "closed" (read case-insensitively; "" when unknown); modality
  and body_part are the source's own labels (e.g. SLAKE "CT" / "Lung", VQA-RAD organ "CHEST");
  meta is a flat {string: string} object of further source attributes (e.g. a MedXpertQA
  "medical_task", an MMMU "subfield"). All four are written only when set, so older JSONL (and
  readers that ignore them) are unaffected.

`load_jsonl` raises `DataError` (file:line:field) on the first bad record, or with skip_bad=True
skips bad records, counts them and lists each one in the returned `BadReport`.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from medlvr.imageio import ImageReadError, parse_window, probe_image

SPLITS = ("train", "val", "test")
ANSWER_TYPES = ("open", "closed")
OPTIONAL_FIELDS = ("answer_type", "modality", "body_part", "meta")


class DataError(ValueError):
    """A bad record: `file`, `line` (1-based) and `field` say where, the message says what."""

    def __init__(self, file, line: int, field_name: str, message: str):
        self.file, self.line, self.field = str(file), line, field_name
        super().__init__(f"{file}:{line}: field '{field_name}': {message}")


@dataclass(frozen=True)
class ROI:
    image: int                                  # index into Record.images
    box: tuple[float, float, float, float]      # x0, y0, x1, y1 in pixels of the original image


@dataclass
class Record:
    id: str
    images: list[str]
    question: str
    options: list[str] | None
    answer: str
    rois: list[ROI] = field(default_factory=list)
    split: str = "train"
    source: str = ""
    qtype: str = ""
    slices: list[int | None] = field(default_factory=list)   # per image; empty = no slice indices
    window: str | None = None                                  # preset or "W/L" (medlvr.imageio)
    answer_type: str = ""                                      # "open" / "closed" / "" (unknown)
    modality: str = ""                                         # the source's modality label
    body_part: str = ""                                        # the source's body part / organ label
    meta: dict[str, str] = field(default_factory=dict)         # further source attributes

    def slice_of(self, i: int) -> int | None:
        """Slice index of images[i] (None for a 2-D image)."""
        return self.slices[i] if self.slices else None

    def to_json(self, *, relative_to: Path | None = None) -> dict:
        d = asdict(self)
        del d["slices"]  # written into the image entries below
        window = d.pop("window")
        paths = [_relpath(p, relative_to) for p in self.images] if relative_to is not None else list(self.images)
        d["images"] = [p if self.slice_of(i) is None else {"path": p, "slice": self.slice_of(i)}
                       for i, p in enumerate(paths)]
        d["rois"] = [{"image": r.image, "box": [float(v) for v in r.box]} for r in self.rois]
        if window is not None:
            d["window"] = window
        for name in OPTIONAL_FIELDS:  # written only when set: older readers and files stay as they were
            if not d[name]:
                del d[name]
        return d


def _relpath(p: str, base: Path) -> str:
    try:
        return Path(p).resolve().relative_to(base.resolve()).as_posix()
    except ValueError:
        return str(p)


@dataclass
class BadReport:
    """What `load_jsonl(skip_bad=True)` skipped: one (line, field, message) per bad record."""

    file: str
    total: int = 0
    skipped: list[tuple[int, str, str]] = field(default_factory=list)

    @property
    def n_bad(self) -> int:
        return len(self.skipped)

    @property
    def n_good(self) -> int:
        return self.total - self.n_bad

    def __str__(self) -> str:
        head = f"{self.file}: {self.n_good} good, {self.n_bad} bad of {self.total} records"
        return "\n".join([head] + [f"  {self.file}:{ln}: field '{f}': {m} (skipped)" for ln, f, m in self.skipped])


def image_size(path: str, index: int | None = None) -> tuple[int, int]:
    """(width, height) of slice ``index`` of an image, from its header (no decode; cached).
    Raises medlvr.imageio.ImageReadError for a file that cannot be read."""
    return probe_image(path, index=index).size


def _str_field(obj: dict, name: str, *, required: bool, default: str = "") -> str:
    if name not in obj or obj[name] is None:
        if required:
            raise FieldError(name, "missing")
        return default
    v = obj[name]
    if not isinstance(v, (str, int)) or isinstance(v, bool):
        raise FieldError(name, f"expected a string, got {type(v).__name__}")
    return str(v)


class FieldError(Exception):
    """One field of one record is bad: what :func:`parse_record` raises (the converters raise it
    too, for fields of their sources), turned into a DataError or a skipped entry by the caller."""

    def __init__(self, field_name: str, message: str):
        self.field, self.message = field_name, message


def parse_record(obj, *, base_dir: Path, default_source: str, default_id: str, check_images: bool = True) -> Record:
    """Validate one decoded JSON object and build its Record; raises FieldError(field, message)."""
    if not isinstance(obj, dict):
        raise FieldError("<record>", f"expected a JSON object, got {type(obj).__name__}")
    rid = _str_field(obj, "id", required=False, default=default_id)
    question = _str_field(obj, "question", required=True)
    if not question.strip():
        raise FieldError("question", "empty")
    answer = _str_field(obj, "answer", required=True)
    if not answer.strip():
        raise FieldError("answer", "empty")
    names, slices = _image_entries(obj.get("images"))
    paths = [str(p if Path(p).is_absolute() else (base_dir / p)) for p in names]
    window = obj.get("window")
    try:
        parse_window(window)
    except ValueError as e:
        raise FieldError("window", str(e).removeprefix("window: ")) from None
    sizes = _image_sizes(paths, slices) if check_images else [None] * len(paths)
    options = _options(obj.get("options"), answer)
    rois = _rois(obj.get("rois") or [], sizes)
    split = _str_field(obj, "split", required=False, default="train")
    if split not in SPLITS:
        raise FieldError("split", f"expected one of {SPLITS}, got {split!r}")
    return Record(
        id=rid, images=paths, question=question, options=list(options) if options is not None else None,
        answer=answer, rois=rois, split=split,
        source=_str_field(obj, "source", required=False, default=default_source),
        qtype=_str_field(obj, "qtype", required=False, default=""),
        slices=slices if any(k is not None for k in slices) else [], window=window or None,
        answer_type=_answer_type(obj.get("answer_type")),
        modality=_str_field(obj, "modality", required=False, default=""),
        body_part=_str_field(obj, "body_part", required=False, default=""),
        meta=_meta(obj.get("meta")),
    )


def _answer_type(v) -> str:
    """The "answer_type" field: absent/"" (unknown), or open / closed in any case."""
    if v is None or v == "":
        return ""
    if not isinstance(v, str) or v.strip().lower() not in ANSWER_TYPES:
        raise FieldError("answer_type", f"expected one of {ANSWER_TYPES} (or absent), got {v!r}")
    return v.strip().lower()


def _meta(v) -> dict[str, str]:
    """The "meta" field: absent, or a flat object of string keys and string (or number) values."""
    if v is None:
        return {}
    if not isinstance(v, dict):
        raise FieldError("meta", f"expected an object of strings, got {type(v).__name__}")
    out = {}
    for k, x in v.items():
        if not isinstance(x, (str, int, float)) or isinstance(x, bool):
            raise FieldError(f"meta.{k}", f"expected a string, got {type(x).__name__}")
        out[str(k)] = str(x)
    return out


def _image_entries(images) -> tuple[list[str], list[int | None]]:
    """The "images" field: (paths as written, slice index or None of each)."""
    if images is None:
        raise FieldError("images", "missing")
    if not isinstance(images, list) or not images:
        raise FieldError("images", f"expected a non-empty list of paths, got {images!r}")
    names, slices = [], []
    for i, entry in enumerate(images):
        name, k = entry, None
        if isinstance(entry, dict):
            name, k = entry.get("path"), entry.get("slice")
            if set(entry) - {"path", "slice"}:
                raise FieldError(f"images[{i}]", f"expected keys 'path' and 'slice', got {sorted(entry)}")
            if k is not None and (not isinstance(k, int) or isinstance(k, bool) or k < 0):
                raise FieldError(f"images[{i}].slice", f"expected an int >= 0, got {k!r}")
        if not isinstance(name, str) or not name:
            raise FieldError(f"images[{i}]", f"expected a path or {{\"path\": ..., \"slice\": k}}, got {entry!r}")
        names.append(name)
        slices.append(k)
    return names, slices


def _image_sizes(paths: list[str], slices: list[int | None]) -> list[tuple[int, int] | None]:
    """(width, height) of each image (slice), read from its header; a missing or unreadable
    file is a bad record."""
    sizes: list[tuple[int, int] | None] = []
    for i, p in enumerate(paths):
        if not Path(p).exists():
            raise FieldError(f"images[{i}]", f"file not found: {p}")
        try:
            sizes.append(image_size(p, slices[i]))
        except ImageReadError as e:
            where = f"images[{i}].slice" if e.field == "slice" else f"images[{i}]"
            raise FieldError(where, str(e)) from None
    return sizes


def _options(options, answer: str) -> list[str] | None:
    """The "options" field: None, or 2 to 26 non-empty strings of which the answer is one."""
    if options is None:
        return None
    if not isinstance(options, list) or len(options) < 2 or not all(isinstance(o, str) and o.strip() for o in options):
        raise FieldError("options", f"expected null or a list of >= 2 non-empty strings, got {options!r}")
    if len(options) > 26:
        raise FieldError("options", f"expected at most 26 options, got {len(options)}")
    from medlvr.data.answers import normalize_answer

    if normalize_answer(answer) not in [normalize_answer(o) for o in options]:
        raise FieldError("answer", f"{answer!r} is not one of the options {options!r}")
    return options


def _rois(rois_raw, sizes: list[tuple[int, int] | None]) -> list[ROI]:
    """The "rois" field: boxes in pixels of the image they name, inside it when its size is known."""
    if not isinstance(rois_raw, list):
        raise FieldError("rois", f"expected a list, got {type(rois_raw).__name__}")
    rois: list[ROI] = []
    for j, r in enumerate(rois_raw):
        where = f"rois[{j}]"
        if not isinstance(r, dict) or "box" not in r:
            raise FieldError(where, f"expected {{'image': int, 'box': [x0, y0, x1, y1]}}, got {r!r}")
        img = r.get("image", 0)
        if not isinstance(img, int) or isinstance(img, bool) or not 0 <= img < len(sizes):
            raise FieldError(f"{where}.image", f"expected an image index in [0, {len(sizes)}), got {img!r}")
        box = r["box"]
        if (not isinstance(box, (list, tuple)) or len(box) != 4
                or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in box)):
            raise FieldError(f"{where}.box", f"expected 4 numbers [x0, y0, x1, y1], got {box!r}")
        x0, y0, x1, y1 = (float(v) for v in box)
        if not (x0 < x1 and y0 < y1):
            raise FieldError(f"{where}.box", f"expected x0 < x1 and y0 < y1, got {box!r}")
        if x0 < 0 or y0 < 0:
            raise FieldError(f"{where}.box", f"negative coordinate in {box!r}")
        if sizes[img] is not None:
            w, h = sizes[img]
            if x1 > w or y1 > h:
                raise FieldError(f"{where}.box", f"{box!r} outside image {img} of size {w}x{h} (width x height)")
        rois.append(ROI(image=img, box=(x0, y0, x1, y1)))
    return rois


def load_jsonl(path, *, skip_bad: bool = False, split: str | None = None, check_images: bool = True,
               window: str | None = None) -> tuple[list[Record], BadReport]:
    """Read and validate a JSONL file -> (records, report).

    A bad record raises DataError naming file:line:field, unless skip_bad, then it is skipped,
    counted in report.n_bad and listed in report.skipped (never silently). Duplicate ids are bad.
    `split` keeps only records of that split (after validation: a bad line is reported even
    when its split would have been filtered out). `window` (e.g. --window on the command line)
    is given to records that name none.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"path: no such JSONL file: {path}")
    if split is not None and split not in SPLITS:
        raise ValueError(f"split: expected None or one of {SPLITS}, got {split!r}")
    parse_window(window)
    report = BadReport(file=str(path))
    records: list[Record] = []
    seen: set[str] = set()
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            report.total += 1
            try:
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise FieldError("<json>", f"invalid JSON: {e.msg}: column {e.colno}") from None
                rec = parse_record(obj, base_dir=path.parent, default_source=path.stem,
                                   default_id=f"{path.stem}-{lineno}", check_images=check_images)
                if rec.id in seen:
                    raise FieldError("id", f"duplicate id {rec.id!r}")
                seen.add(rec.id)
            except FieldError as bad:
                if not skip_bad:
                    raise DataError(path, lineno, bad.field, bad.message) from None
                report.skipped.append((lineno, bad.field, bad.message))
                continue
            if rec.window is None:
                rec.window = window or None
            if split is None or rec.split == split:
                records.append(rec)
    return records, report


def load_split(path, split: str, *, skip_bad: bool = False, window: str | None = None) -> list[Record]:
    """The validated records of one split, for the training and eval commands: prints the
    skipped-record report when there is one, and refuses an empty split."""
    records, report = load_jsonl(path, skip_bad=skip_bad, split=split, window=window)
    if report.n_bad:
        print(report)
    if not records:
        raise ValueError(f"--data: no records with split == {split!r} in {path}")
    return records


def write_jsonl(path, records: list[Record]) -> None:
    """Write records with image paths relative to the file's directory when they lie under it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r.to_json(relative_to=path.parent), ensure_ascii=False) + "\n")

__all__ = ["ROI", "Record", "BadReport", "DataError", "FieldError", "load_jsonl", "write_jsonl", "parse_record",
           "image_size", "SPLITS", "ANSWER_TYPES", "OPTIONAL_FIELDS"]
