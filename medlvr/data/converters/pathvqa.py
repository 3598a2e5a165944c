"""PathVQA (He et al., 2020): questions on pathology textbook and PEIR images.

Layouts (paths relative to --root, or to a ``pvqa/`` folder inside it); the first one found is
read, the others are named in the report:

- ``pathvqa-qa-pkl`` (the authors' Google Drive release, as the Hugging Face mirror's
  processing script reads it): ``qas/<split>/<split>_qa.pkl`` (or ``.json``), lists of
  {image, question, answer}; images ``images/<split>/<image>.jpg``.
- ``pathvqa-vqa-pkl`` (what the official baselines read, UCSD-AI4H/PathVQA
  ``baselines/method{1,2}``): ``qas/<split>_vqa.pkl``, lists of {img_id, question_id, sent,
  label: {answer: score}, answer_type, question_type}; the answer is the first label.
- ``pathvqa-lxmert-json`` (the per-image dumps of the released pickles in
  UCSD-AI4H/PathVQA ``baselines/method1/saved/lxmert/``): ``pvqa_<split>.json`` (also under
  ``lxmert/`` or ``saved/lxmert/``), lists of {img_id, sentf: {pvqa: [question, ...]},
  labelf: {pvqa: [{answer: 1}, ...]}}; one entry per image, so the entry number names the
  image and the question's position in it.

Splits train / val / test (19,755 / 6,279 / 6,761 QA pairs as published). The release holds
exact duplicate (image, question, answer) triplets (101 / 20 / 42); they are listed in the
report and dropped unless ``--keep-duplicates`` (19,654 / 6,259 / 6,719 unique, the counts of
the Hugging Face mirror). Closed questions are the yes/no ones (answer_type).

The .pkl files are Python pickles: convert only files from a source you trust.
"""
from __future__ import annotations

import pickle
from pathlib import Path

from ._base import Bad, ConvertReport, FileBad, Options, closed_if_yes_no, find_root, first_existing, objects, \
    read_json_list, text

NAME = "pathvqa"
DROP_DUPLICATES = True
SPLITS = ("train", "val", "test")


def _load_pickle(path: Path) -> list:
    try:
        with open(path, "rb") as fh:
            data = pickle.load(fh)  # the published format; see the module docstring
    except Exception as e:  # a truncated or foreign pickle raises anything
        raise FileBad("<file>", f"unreadable pickle ({type(e).__name__}: {e})") from None
    if not isinstance(data, list):
        raise FileBad("<file>", f"expected a pickled list of entries, got {type(data).__name__}")
    return data


def _load(path: Path) -> list:
    return _load_pickle(path) if path.suffix == ".pkl" else read_json_list(path)


def _image(root: Path, split: str, name: str) -> list[str]:
    if not name:
        return []
    d = root / "images" / split
    if Path(name).suffix:
        return [str(d / name)]
    return [str(first_existing(d / f"{name}{ext}" for ext in (".jpg", ".png", ".jpeg", ".JPG")))]


def _rec(rid, images, question, answer, split, qtype="", atype="") -> dict:
    answer = text(answer)
    return {"id": rid, "images": images, "question": text(question), "answer": answer, "options": None,
            "split": split, "source": "pathvqa",
            "qtype": qtype or ("yes/no" if closed_if_yes_no(answer) == "closed" else "open"),
            "answer_type": atype or closed_if_yes_no(answer)}


def _qa_pkl(root: Path, files):
    for split, f in files:
        yield from objects(f, _load, lambda e, i, split=split: [_rec(
            f"pathvqa-{split}-{i}", _image(root, split, text(e.get("image"))), e.get("question"), e.get("answer"),
            split)])


def _first_label(label):
    if isinstance(label, dict) and label:
        return next(iter(label))
    return label if isinstance(label, str) else None


def _vqa_pkl(root: Path, files):
    for split, f in files:
        def one(e, i, split=split):
            ans = _first_label(e.get("label"))
            if ans is None:
                yield Bad("label", f"expected {{answer: score}}, got {e.get('label')!r}")
                return
            at = text(e.get("answer_type")).lower()
            atype = "closed" if at in ("yes/no", "closed") else ("open" if at in ("other", "open") else "")
            qid = text(e.get("question_id")) or f"{split}-{i}"
            yield _rec(f"pathvqa-{qid}", _image(root, split, text(e.get("img_id"))), e.get("sent"), ans, split,
                       qtype=text(e.get("question_type")), atype=atype)

        yield from objects(f, _load, one)


def _lxmert(root: Path, files):
    for split, f in files:
        def one(e, i, split=split):
            img = text(e.get("img_id"))
            qs = (e.get("sentf") or {}).get("pvqa") or []
            ls = (e.get("labelf") or {}).get("pvqa") or []
            if len(qs) != len(ls):
                yield Bad("labelf", f"{len(qs)} questions but {len(ls)} labels for {img!r}")
                return
            for k, (q, lab) in enumerate(zip(qs, ls)):
                ans = _first_label(lab)
                yield (Bad(f"labelf.pvqa[{k}]", f"expected {{answer: score}}, got {lab!r}") if ans is None else
                       _rec(f"pathvqa-{img or f'{split}-{i}'}-{k}", _image(root, split, img), q, ans, split))

        yield from objects(f, read_json_list, one)


def read(root: Path, opts: Options, report: ConvertReport):
    root = find_root(root, ["qas", "pvqa_train.json", "lxmert/pvqa_train.json", "saved/lxmert/pvqa_train.json"],
                     ["pvqa", "PathVQA", "data/pvqa"])
    layouts = []
    qa = [(s, f) for s in SPLITS for f in (root / "qas" / s / f"{s}_qa.pkl", root / "qas" / s / f"{s}_qa.json")
          if f.is_file()]
    qa = [(s, f) for k, (s, f) in enumerate(qa) if s not in [x for x, _ in qa[:k]]]  # .pkl before .json
    if qa:
        layouts.append(("pathvqa-qa-pkl", _qa_pkl, qa))
    vqa = [(s, root / "qas" / f"{s}_vqa.pkl") for s in SPLITS if (root / "qas" / f"{s}_vqa.pkl").is_file()]
    if vqa:
        layouts.append(("pathvqa-vqa-pkl", _vqa_pkl, vqa))
    for base in (root, root / "lxmert", root / "saved" / "lxmert"):
        lx = [(s, base / f"pvqa_{s}.json") for s in SPLITS if (base / f"pvqa_{s}.json").is_file()]
        if lx:
            layouts.append(("pathvqa-lxmert-json", _lxmert, lx))
            break
    if not layouts:
        raise FileNotFoundError(f"root: expected qas/<split>/<split>_qa.pkl, qas/<split>_vqa.pkl or "
                                f"pvqa_<split>.json under {root}")
    name, fn, files = layouts[0]
    report.layouts.append(name)
    for other, _, _ in layouts[1:]:
        report.note(f"layout {other} also present, not read (the same questions): {name} is")
    missing = [s for s in SPLITS if s not in [x for x, _ in files]]
    if missing:
        report.note(f"no {'/'.join(missing)} file in layout {name}")
    yield from fn(root, files)
