"""What every converter shares: the entry protocol, the report, the driver (`convert`).

A reader (one module per benchmark) yields ``(source file, entry number, obj)`` for every source
entry it finds, in file order: ``obj`` is a dict in the medlvr record layout
(medlvr/data/records.py) or a ``Bad(field, reason)`` for an entry the reader itself cannot use.
The driver validates each dict like a JSONL line (images exist and are readable, boxes inside
the image, options contain the answer, unique ids), finds exact duplicates, and then either
skips and reports bad entries (the default) or, with ``strict``, fails naming the first.
"""
from __future__ import annotations

import csv
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, NamedTuple

from medlvr.data.records import FieldError, DataError, Record, parse_record, write_jsonl
from medlvr.imageio import parse_window

# How many bad entries the printed summary lists one by one; the report file lists all of them.
MAX_LISTED = 50


class Bad(NamedTuple):
    """A source entry a reader cannot use: the field it names and why."""

    field: str
    reason: str


class Skipped(NamedTuple):
    """One bad source entry: its file, its 1-based number in that file (0: the file as a whole),
    the field, the reason and, when the entry got that far, the record id it would have had."""

    file: str
    entry: int
    field: str
    reason: str
    id: str = ""


class Duplicate(NamedTuple):
    """An entry with the same split, image(s), question and answer as an earlier one (ids say
    which question of an entry, for layouts with several questions an entry)."""

    file: str
    entry: int
    id: str
    first_file: str
    first_entry: int
    first_id: str
    dropped: bool


@dataclass
class Options:
    """Every converter option in one place (each reader reads the ones it knows)."""

    split_fractions: tuple | None = None      # omnimedvqa: hash-split images instead of all "test"
    restricted: bool = False                  # omnimedvqa: also read QA_information/Restricted-access
    slake_roi: str = "question"               # slake: question | all | none
    vqa_rad_frames: str = "train"             # vqa-rad (OSF json): train | none
    keep_duplicates: bool = False             # pathvqa: keep exact duplicate triplets
    pmc_vqa_version: str = "auto"             # pmc-vqa: auto | 1 | 2
    pmc_vqa_test: str = "clean"               # pmc-vqa v1: clean (test_clean.csv) | full (test.csv)
    answers: str | None = None                # mmmu-med: JSON file of withheld test answers
    image_dir: Path | None = None             # where readers that unpack embedded images write them


@dataclass
class ConvertReport:
    """What one conversion read, wrote, skipped and dropped; printed as the summary and written
    (as JSON) beside the output file."""

    dataset: str
    out: str
    root: str = ""
    layouts: list = field(default_factory=list)         # the source layouts read (names in docs/data.md)
    total: int = 0                                      # source entries seen (before filters)
    counts: dict = field(default_factory=dict)          # split -> records written
    skipped: list = field(default_factory=list)         # Skipped(file, entry, field, reason)
    filtered: int = 0                                   # dropped by design (sum of filtered_by)
    filtered_by: dict = field(default_factory=dict)     # reason -> entries dropped by design
    duplicates: list = field(default_factory=list)      # Duplicate(...)
    rois: int = 0
    boxes_clipped: int = 0                              # boxes cut to the image bounds
    notes: list = field(default_factory=list)           # layout choices worth knowing (files ignored, ...)
    options: dict = field(default_factory=dict)
    report_file: str = ""

    @property
    def n_bad(self) -> int:
        return len(self.skipped)

    @property
    def written(self) -> int:
        return sum(self.counts.values())

    def filter(self, reason: str, n: int = 1) -> None:
        """Count ``n`` entries dropped by design (not bad: e.g. SLAKE's Chinese questions)."""
        self.filtered += n
        self.filtered_by[reason] = self.filtered_by.get(reason, 0) + n

    def note(self, text: str) -> None:
        if text not in self.notes:
            self.notes.append(text)

    def to_json(self) -> dict:
        return {
            "dataset": self.dataset, "root": self.root, "out": self.out, "layouts": list(self.layouts),
            "options": self.options, "source_entries": self.total, "written": self.written,
            "counts": dict(sorted(self.counts.items())), "rois": self.rois, "boxes_clipped": self.boxes_clipped,
            "bad": [s._asdict() for s in self.skipped],
            "filtered": dict(self.filtered_by),
            "duplicates": [d._asdict() for d in self.duplicates],
            "notes": list(self.notes),
        }

    def __str__(self) -> str:
        n_dup = len(self.duplicates)
        dropped = sum(d.dropped for d in self.duplicates)
        head = (f"{self.dataset} [{', '.join(self.layouts) or '?'}] -> {self.out}: {self.written} records "
                f"({', '.join(f'{k}: {v}' for k, v in sorted(self.counts.items()))}) from {self.total} source entries, "
                f"{self.rois} ROI boxes, {self.n_bad} bad skipped, {self.filtered} filtered out by design")
        if n_dup:
            head += f", {n_dup} exact duplicates ({dropped} dropped, {n_dup - dropped} kept)"
        lines = [head]
        lines += [f"  filtered: {n} ({reason})" for reason, n in self.filtered_by.items()]
        if self.boxes_clipped:
            lines.append(f"  {self.boxes_clipped} ROI boxes extended past their image and were clipped to it")
        lines += [f"  note: {t}" for t in self.notes]
        for s in self.skipped[:MAX_LISTED]:
            where = (f"{s.file}:{s.entry}" if s.entry else s.file) + (f" ({s.id})" if s.id else "")
            lines.append(f"  {where}: field '{s.field}': {s.reason} (skipped)")
        if self.n_bad > MAX_LISTED:
            by = {}
            for s in self.skipped[MAX_LISTED:]:
                by[(s.file, s.field)] = by.get((s.file, s.field), 0) + 1
            lines.append(f"  ... and {self.n_bad - MAX_LISTED} more bad entries"
                         + (f", all listed in {self.report_file}" if self.report_file else "") + ":")
            lines += [f"    {n} in {f} (field '{fld}')" for (f, fld), n in sorted(by.items())]
        # Dropped duplicates are listed like bad entries; kept ones only counted (the report lists them).
        gone = [d for d in self.duplicates if d.dropped]
        for d in gone[:MAX_LISTED]:
            lines.append(f"  {d.file}:{d.entry} ({d.id}): exact duplicate of {d.first_file}:{d.first_entry} "
                         f"({d.first_id}), dropped")
        if len(gone) > MAX_LISTED:
            lines.append(f"  ... and {len(gone) - MAX_LISTED} more dropped duplicates"
                         + (f", all listed in {self.report_file}" if self.report_file else ""))
        if n_dup - dropped:
            lines.append(f"  {n_dup - dropped} exact duplicates kept (this benchmark's published counts include them)"
                         + (f", listed in {self.report_file}" if self.report_file else ""))
        if self.report_file:
            lines.append(f"  report: {self.report_file}")
        return "\n".join(lines)


# --- small helpers the readers share -------------------------------------------------------------

def text(v) -> str:
    """A source value as stripped text ("" for None; numbers as written: 4 -> "4")."""
    if v is None:
        return ""
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    return str(v).strip()


def answer_type_of(v) -> str:
    """The source's answer type as "open" / "closed" ("" when it names neither)."""
    t = text(v).lower()
    return t if t in ("open", "closed") else ""


def closed_if_yes_no(answer: str) -> str:
    """answer_type for benchmarks whose closed questions are the yes/no ones (PathVQA)."""
    return "closed" if text(answer).lower() in ("yes", "no") else "open"


def hash_split(key: str, fractions) -> str:
    """Deterministic split from a key (an image path: all questions on an image stay together)."""
    u = int.from_bytes(hashlib.sha1(key.encode("utf-8")).digest()[:8], "big") / 2.0**64
    a, b, _ = fractions
    return "train" if u < a else ("val" if u < a + b else "test")


class FileBad(Exception):
    """A source file that cannot be read at all (reported as entry 0 of that file)."""

    def __init__(self, field: str, reason: str):
        self.field, self.reason = field, reason
        super().__init__(reason)


def read_json(path: Path):
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise FileBad("<file>", f"not UTF-8 text ({e})") from None
    except json.JSONDecodeError as e:
        raise FileBad("<json>", f"invalid JSON: {e.msg}: line {e.lineno} column {e.colno}") from None


def read_json_list(path: Path) -> list:
    data = read_json(path)
    if not isinstance(data, list):
        raise FileBad("<file>", f"expected a JSON list of entries, got {type(data).__name__}")
    return data


def read_jsonl(path: Path) -> Iterator[tuple[int, object]]:
    """(line number, decoded object or Bad) for every non-empty line."""
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                yield i, json.loads(line)
            except json.JSONDecodeError as e:
                yield i, Bad("<json>", f"invalid JSON: {e.msg}: column {e.colno}")


def read_csv(path: Path) -> tuple[list[str], list[dict]]:
    """Header and rows of a CSV file (the csv module's quoting; a BOM is dropped); FileBad when
    it cannot be read."""
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            reader = csv.DictReader(f)
            rows = list(reader)
            return list(reader.fieldnames or []), rows
    except (UnicodeDecodeError, OSError) as ex:
        raise FileBad("<file>", f"unreadable CSV ({ex})") from None


def csv_rows(path: Path) -> list[dict]:
    return read_csv(path)[1]


def entries(path: Path, load: Callable[[Path], list]) -> Iterator[tuple[Path, int, object]]:
    """(file, entry number, raw entry) of a file of entries; an unreadable file yields one
    Bad as entry 0 instead (so one broken file of many never costs the others)."""
    try:
        data = load(path)
    except FileBad as e:
        yield path, 0, Bad(e.field, e.reason)
        return
    for i, e in enumerate(data, start=1):
        yield path, i, e


def not_an_object(e) -> Bad | None:
    return None if isinstance(e, dict) else Bad("<entry>", f"expected an object, got {type(e).__name__}")


def objects(path: Path, load: Callable[[Path], list], convert: Callable[[dict, int], Iterable]
            ) -> Iterator[tuple[Path, int, object]]:
    """(file, entry number, out) for every ``out`` that ``convert(entry, number)`` yields (records,
    or Bads; nothing for a filtered entry). An unreadable file, or an entry that is not an
    object, is passed on as its Bad without calling ``convert``."""
    for src, i, e in entries(path, load):
        bad = e if isinstance(e, Bad) else not_an_object(e)
        for out in ((bad,) if bad else convert(e, i)):
            yield src, i, out


def first_existing(candidates: Iterable[Path]) -> Path:
    """The first candidate that exists, else the first one (so a 'not found' names a real guess)."""
    cands = list(candidates)
    for c in cands:
        if c.exists():
            return c
    return cands[0]


def find_root(root: Path, markers: Iterable[str], subdirs: Iterable[str]) -> Path:
    """``root`` itself when one of ``markers`` (relative paths) is in it, else the first of the
    usual sub-folders (``subdirs``, e.g. the folder a zip unpacks to) that has one."""
    markers = list(markers)
    for base in [root] + [root / s for s in subdirs]:
        if any((base / m).exists() for m in markers):
            return base
    return root


# --- the driver ----------------------------------------------------------------------------------

def report_path(out) -> Path:
    """The report file beside the output: data/slake.jsonl -> data/slake.report.json."""
    out = Path(out)
    return out.with_name(out.stem + ".report.json") if out.suffix else out.with_name(out.name + ".report.json")


def run(dataset: str, reader, drop_duplicates: bool, root, out, opts: Options, *, strict: bool,
        window: str | None, option_summary: dict) -> ConvertReport:
    parse_window(window)
    root = Path(root).resolve()
    if not root.is_dir():
        raise FileNotFoundError(f"root: not a directory: {root}")
    out = Path(out)
    report = ConvertReport(dataset=dataset, out=str(out), root=str(root), options=option_summary)
    records: list[Record] = []
    seen_ids: set[str] = set()
    seen_triplets: dict[tuple, tuple[str, int, str]] = {}
    for src, entry, obj in reader(root, opts, report):
        report.total += 1
        rid = obj.get("id", "") if isinstance(obj, dict) else ""
        try:
            if isinstance(obj, Bad):
                raise FieldError(obj.field, obj.reason)
            if window:
                obj["window"] = window
            rec = parse_record(obj, base_dir=root, default_source=dataset, default_id=f"{dataset}-{report.total}")
        except FieldError as bad:
            report.skipped.append(Skipped(str(src), entry, bad.field, bad.message, str(rid)))
            continue
        key = (rec.split, tuple(rec.images), tuple(rec.slices), rec.question, rec.answer)
        if key in seen_triplets:
            first = seen_triplets[key]
            drop = drop_duplicates and not opts.keep_duplicates
            report.duplicates.append(Duplicate(str(src), entry, rec.id, *first, drop))
            if drop:
                continue
        else:
            seen_triplets[key] = (str(src), entry, rec.id)
        if rec.id in seen_ids:
            report.skipped.append(Skipped(str(src), entry, "id", f"duplicate id {rec.id!r}", rec.id))
            continue
        seen_ids.add(rec.id)
        records.append(rec)
        report.counts[rec.split] = report.counts.get(rec.split, 0) + 1
        report.rois += len(rec.rois)
    if strict and report.skipped:
        s = report.skipped[0]
        more = f" (and {report.n_bad - 1} more bad entries)" if report.n_bad > 1 else ""
        raise DataError(s.file, s.entry, s.field, f"(entry {s.entry}) {s.reason}{more}")
    write_jsonl(out, records)
    rp = report_path(out)
    report.report_file = str(rp)
    rp.write_text(json.dumps(report.to_json(), indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    return report
