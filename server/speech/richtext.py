"""SenseVoice's inline tags turned into fields: ``<|en|><|HAPPY|><|Speech|><|woitn|>hi`` becomes
``language="en", emotion="happy", events=["speech"], itn=False, text="hi"``.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass, field

from server.vocab import LANGUAGES

TAG_RE = re.compile(r"<\|([^|<>]*)\|>")
TAGGED_LANGUAGES = frozenset(LANGUAGES) - {"auto"}  # "auto" is asked for, never answered
EMOTIONS = {
    "HAPPY": "happy",
    "SAD": "sad",
    "ANGRY": "angry",
    "NEUTRAL": "neutral",
    "FEARFUL": "fearful",
    "DISGUSTED": "disgusted",
    "SURPRISED": "surprised",
    "EMO_UNKNOWN": "unknown",
}
EVENTS = {
    "Speech": "speech",
    "BGM": "bgm",
    "Applause": "applause",
    "Laughter": "laughter",
    "Cry": "cry",
    "Sneeze": "sneeze",
    "Breath": "breath",
    "Cough": "cough",
}
IGNORED = {"Event_UNK", "withitn", "woitn"}


@dataclass
class RichTranscript:
    text: str
    raw_text: str
    language: str | None = None
    emotion: str | None = None
    events: list[str] = field(default_factory=list)
    itn: bool | None = None
    unknown_tags: list[str] = field(default_factory=list)

    @property
    def is_nospeech(self) -> bool:
        return self.language == "nospeech"


def parse(raw: str) -> RichTranscript:
    """Split tags from text wherever they appear; unknown tags are kept aside, never shown as text."""
    result = RichTranscript(text="", raw_text=raw)
    for tag in TAG_RE.findall(raw):
        if tag in TAGGED_LANGUAGES:
            result.language = result.language or tag
        elif tag in EMOTIONS:
            result.emotion = result.emotion or EMOTIONS[tag]
        elif tag in EVENTS:
            if EVENTS[tag] not in result.events:
                result.events.append(EVENTS[tag])
        elif tag in IGNORED:
            if tag != "Event_UNK":
                result.itn = tag == "withitn"
        else:
            result.unknown_tags.append(tag)
    result.text = " ".join(TAG_RE.sub(" ", raw).split())
    return result


def normalise(text: str) -> str:
    """Lower case, no punctuation, single spaces: what smoke tests compare."""
    return " ".join(re.sub(r"[^\w\s']", " ", text.lower()).split())


def char_error_rate(reference: str, hypothesis: str) -> float:
    """Levenshtein distance over characters divided by the reference length (1.0 if it is empty)."""
    ref, hyp = normalise(reference), normalise(hypothesis)
    if not ref:
        return 0.0 if not hyp else 1.0
    previous = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, 1):
        current = [i]
        for j, h in enumerate(hyp, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (r != h)))
        previous = current
    return previous[-1] / len(ref)


def join_texts(texts: list[str]) -> str:
    """Segments' texts as one: a space between two, except where both sides are CJK characters
    (which a Paraformer writes without spaces)."""
    joined = ""
    for text in filter(None, texts):
        if joined and not (_wide(joined[-1]) and _wide(text[0])):
            joined += " "
        joined += text
    return joined


def _wide(ch: str) -> bool:
    return unicodedata.east_asian_width(ch) == "W"
