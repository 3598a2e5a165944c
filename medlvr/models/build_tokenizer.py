"""Build the tokenizer shipped with the embedded default model.

    python -m medlvr.models.build_tokenizer            # rewrites medlvr/models/assets/tokenizer.json
    python -m medlvr.models.build_tokenizer --check    # exit 1 when the shipped file differs

A byte-level BPE (the same family as Qwen's tokenizer) trained on a fixed, in-file corpus:
question/answer phrasing of medical VQA, common English, digits and punctuation. Byte-level
means every string is encodable (real datasets converted with `medlvr convert` included);
the corpus only decides which words get short encodings. The build is deterministic: the
corpus is a constant and the BPE trainer breaks ties by pair order, so a fresh build equals
the shipped file byte for byte (tests/models/test_models.py checks it).
"""
from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

ASSETS = Path(__file__).resolve().parent / "assets"
TOKENIZER_FILE = ASSETS / "tokenizer.json"

# Vocabulary size of the trained BPE, special tokens included; the model config's vocab_size
# (assets/config.json) must be at least this.
VOCAB_SIZE = 1024

# Ids 0.. in this order. Qwen's chat and vision markers first, then the latent tokens
# (team interface: "<|latent_start|>", "<|latent_end|>", "<|latent_pad|>").
QWEN_SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
]
LATENT_TOKENS = ["<|latent_start|>", "<|latent_end|>", "<|latent_pad|>"]
SPECIAL_TOKENS = QWEN_SPECIAL_TOKENS + LATENT_TOKENS

_QUESTIONS = [
    "Is there a lesion in this image?",
    "Is there an abnormality in the image?",
    "Is a nodule present?",
    "Is there a mass in the lung?",
    "Where is the lesion located?",
    "In which quadrant is the lesion?",
    "Which part of the image contains the lesion?",
    "How large is the lesion?",
    "Is the lesion small or large?",
    "What is the size of the lesion?",
    "What is the shape of the lesion?",
    "Which shape best describes the lesion?",
    "Is the lesion round, oval, irregular or square?",
    "What modality is used to take this image?",
    "Which organ is abnormal?",
    "What abnormality is seen in the image?",
    "Does the patient have pneumonia?",
    "Is this a CT scan or an MRI?",
    "Where is the liver?",
    "Which side of the lung is affected?",
    "How many lesions are there?",
    "What is the main organ in the image?",
    "Are there any abnormalities in the chest?",
    "Is the heart enlarged?",
    "What does this image show?",
    "What color is the nucleus?",
    "Is this tissue normal?",
]
_ANSWERS = [
    "yes", "no", "Yes", "No", "upper left", "upper right", "lower left", "lower right",
    "top left", "top right", "bottom left", "bottom right", "left", "right", "upper", "lower",
    "small", "large", "medium", "round", "oval", "irregular", "square", "none",
    "CT", "MRI", "X-Ray", "ultrasound", "chest", "lung", "liver", "heart", "brain", "kidney",
    "abdomen", "pelvis", "spine", "bone", "head", "neck", "nodule", "mass", "tumor", "cyst",
    "effusion", "pneumonia", "edema", "fracture", "cardiomegaly", "atelectasis", "normal",
    "abnormal", "benign", "malignant", "left lung", "right lung", "both lungs",
]
_OPTIONS = ["A. ", "B. ", "C. ", "D. ", "Options:", "Answer with the option's letter.",
            "Answer with a single word or phrase.", "Answer yes or no."]
_ENGLISH = (
    "the of and to a in is it you that he was for on are with as I his they be at one have "
    "this from or had by hot word but what some we can out other were all there when up use "
    "your how said an each she which do their time if will way about many then them write "
    "would like so these her long make thing see him two has look more day could go come did "
    "number sound no most people my over know water than call first who may down side been "
    "now find any new work part take get place made live where after back little only round "
    "man year came show every good me give our under name very through just form sentence "
    "great think say help low line differ turn cause much mean before move right boy old too "
    "same tell does set three want air well also play small end put home read hand port large "
    "spell add even land here must big high such follow act why ask men change went light kind "
    "off need house picture try us again animal point mother world near build self earth "
    "image images patient region area shows seen visible present absent located location "
    "size shape contrast bright dark density opacity tissue organ scan radiograph slice "
    "question answer option options image_path study finding findings"
)


def corpus() -> list[str]:
    """The fixed training corpus (a list of lines). Constant: changing it changes the tokenizer."""
    lines: list[str] = []
    lines += _QUESTIONS
    lines += _ANSWERS
    lines += [a.capitalize() for a in _ANSWERS]
    lines += _OPTIONS
    lines += ["user\n", "assistant\n", "system\n", "You are a helpful assistant."]
    lines += [_ENGLISH]
    # Questions followed by options, as the prompt formatter writes them.
    for q, (a, b) in zip(_QUESTIONS, itertools.cycle([("yes", "no"), ("small", "large"),
                                                      ("round", "oval"), ("upper left", "lower right")])):
        lines.append(f"{q}\nOptions:\nA. {a}\nB. {b}\nAnswer with the option's letter.")
    lines += [str(i) for i in range(0, 1000)]
    lines += [f"{i}.{j}" for i in range(10) for j in range(10)]
    lines += ["!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~", "\n", "\n\n", "  ", "\t"]
    # Repeat the domain lines so their merges outrank the English filler.
    return lines * 3


def build():
    """Train and return the `tokenizers.Tokenizer` (not yet written to disk)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    # Qwen2's split pattern (contractions, letters, single digits, punctuation, spaces), then
    # byte-level mapping so any UTF-8 input is representable.
    split = pre_tokenizers.Split(
        pattern=__import__("tokenizers").Regex(
            r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
            r"|\s*[\r\n]+|\s+(?!\S)|\s+"
        ),
        behavior="isolated",
        invert=False,
    )
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [split, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus(), trainer=trainer)
    # Special tokens are matched before pre-tokenisation and never split.
    from tokenizers import AddedToken

    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    return tok


def build_json() -> str:
    return build().to_str(pretty=True) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="compare with the shipped file, write nothing")
    ap.add_argument("--out", type=Path, default=TOKENIZER_FILE)
    args = ap.parse_args(argv)
    fresh = build_json()
    if args.check:
        same = args.out.exists() and args.out.read_text(encoding="utf-8") == fresh
        print(f"{args.out}: {'up to date' if same else 'DIFFERS from a fresh build'}")
        return 0 if same else 1
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(fresh, encoding="utf-8")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
