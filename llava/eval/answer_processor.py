"""The official VQA answer normaliser (VQA evaluation / EvalAI), shared by every VQA-style benchmark.

VQAv2 and VizWiz uploads, the TextVQA scorer and the local VQA accuracy all go through
``normalize_answer`` so that a prediction is compared exactly as the evaluation servers compare it.
The steps and tables follow the official evaluation code, including two of its quirks, kept on
purpose because the servers still run that code:

- its period regex only looks ahead, so a period is dropped unless a digit follows it
  ("3.5" and ".5" stay, "dr. pepper" -> "dr pepper", "3." -> "3");
- it passes ``re.UNICODE`` (32) where ``re.sub`` expects a count, so at most 32 periods are
  dropped from one answer;
- whether a punctuation mark is removed or replaced by a space is decided once per mark for the
  whole answer: if any occurrence touches a space, every occurrence is removed; and if the answer
  holds a digit, exactly one comma and a digit in a row ("1,000"), every mark is removed. Two commas
  between digits do not count: "1,,000" has its commas replaced by spaces, "1 000" in the end.

``normalize_answer`` (EvalAI's processor) deletes every comma before the punctuation step, so only
the VQA scoring of raw human answers (``eval_vqa``) ever meets the comma rule.
"""

from __future__ import annotations

import re
from typing import Sequence

PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!")
ARTICLES = frozenset({"a", "an", "the"})
NUMBER_WORDS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4",
    "five": "5", "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}

# The official contraction table, entries as the official code has them (the capitalised keys can
# never match because answers are lowercased first; "somebody'd" really maps to "somebodyd").
_CONTRACTION_PAIRS = """
aint ain't | arent aren't | cant can't | couldve could've | couldnt couldn't
couldn'tve couldn't've | couldnt've couldn't've | didnt didn't | doesnt doesn't | dont don't
hadnt hadn't | hadnt've hadn't've | hadn'tve hadn't've | hasnt hasn't | havent haven't
hed he'd | hed've he'd've | he'dve he'd've | hes he's | howd how'd | howll how'll | hows how's
Id've I'd've | I'dve I'd've | Im I'm | Ive I've | isnt isn't | itd it'd | itd've it'd've
it'dve it'd've | itll it'll | let's let's | maam ma'am | mightnt mightn't | mightnt've mightn't've
mightn'tve mightn't've | mightve might've | mustnt mustn't | mustve must've | neednt needn't
notve not've | oclock o'clock | oughtnt oughtn't | ow's'at 'ow's'at | 'ows'at 'ow's'at
'ow'sat 'ow's'at | shant shan't | shed've she'd've | she'dve she'd've | she's she's
shouldve should've | shouldnt shouldn't | shouldnt've shouldn't've | shouldn'tve shouldn't've
somebody'd somebodyd | somebodyd've somebody'd've | somebody'dve somebody'd've
somebodyll somebody'll | somebodys somebody's | someoned someone'd | someoned've someone'd've
someone'dve someone'd've | someonell someone'll | someones someone's | somethingd something'd
somethingd've something'd've | something'dve something'd've | somethingll something'll
thats that's | thered there'd | thered've there'd've | there'dve there'd've | therere there're
theres there's | theyd they'd | theyd've they'd've | they'dve they'd've | theyll they'll
theyre they're | theyve they've | twas 'twas | wasnt wasn't | wed've we'd've | we'dve we'd've
weve we've | werent weren't | whatll what'll | whatre what're | whats what's | whatve what've
whens when's | whered where'd | wheres where's | whereve where've | whod who'd | whod've who'd've
who'dve who'd've | wholl who'll | whos who's | whove who've | whyll why'll | whyre why're
whys why's | wont won't | wouldve would've | wouldnt wouldn't | wouldnt've wouldn't've
wouldn'tve wouldn't've | yall y'all | yall'll y'all'll | y'allll y'all'll | yall'd've y'all'd've
y'alld've y'all'd've | y'all'dve y'all'd've | youd you'd | youd've you'd've | you'dve you'd've
youll you'll | youre you're | youve you've
"""
CONTRACTIONS = dict(pair.split() for pair in _CONTRACTION_PAIRS.replace("\n", "|").split("|") if pair.strip())

_DIGIT_COMMA_DIGIT = re.compile(r"\d,\d")
_PERIOD_NOT_BEFORE_DIGIT = re.compile(r"\.(?!\d)")
_OFFICIAL_PERIOD_LIMIT = int(re.UNICODE)


def process_punctuation(text: str) -> str:
    """Remove or blank out punctuation the way the official evaluation does (see module docstring)."""
    remove_all = _DIGIT_COMMA_DIGIT.search(text) is not None
    out = text
    for mark in PUNCTUATION:
        if remove_all or mark + " " in text or " " + mark in text:
            out = out.replace(mark, "")
        else:
            out = out.replace(mark, " ")
    return _PERIOD_NOT_BEFORE_DIGIT.sub("", out, count=_OFFICIAL_PERIOD_LIMIT)


def process_digit_article(text: str) -> str:
    """Lowercase, turn number words into digits, drop articles, restore contractions' apostrophes."""
    words = [NUMBER_WORDS.get(word, word) for word in text.lower().split()]
    return " ".join(CONTRACTIONS.get(word, word) for word in words if word not in ARTICLES)


def normalize_answer(answer: str) -> str:
    """The EvalAI answer processor: what VQAv2 / VizWiz uploads contain and what TextVQA compares."""
    text = answer.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return process_digit_article(process_punctuation(text))


def leave_one_out_accuracy(prediction: str, references: Sequence[str]) -> float:
    """The VQA soft accuracy: mean over the leave-one-out subsets of min(1, #matching answers / 3).

    ``prediction`` and ``references`` are compared as given; callers normalise them first.
    """
    if not references:
        raise ValueError("a question has no reference answers; the VQA accuracy needs them (usually 10)")
    matches = sum(1 for reference in references if reference == prediction)
    # Leaving out a matching answer leaves matches - 1; leaving out any other leaves matches.
    total = matches * min(1.0, (matches - 1) / 3) + (len(references) - matches) * min(1.0, matches / 3)
    return total / len(references)
