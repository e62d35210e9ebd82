"""What a customer's chat line asks, by deterministic rules over normalised text (no model).

:func:`classify` gives an :class:`Intent` and the line's :class:`Lang`. English words one typo
away from a keyword count as that keyword; Chinese is matched by phrases. Rules are tried in a
fixed order, complaints first: a line that complains is handed to a person whatever else it asks.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass
from enum import StrEnum
from functools import lru_cache
from typing import Final


class Intent(StrEnum):
    """What a line asks for; the labels of the data set (``questions.tsv``)."""

    WHERE = "where"
    ETA = "eta"
    RIDER = "rider"
    CALL = "call"
    CHANGE_TIME = "change_time"
    CHANGE_ADDRESS = "change_address"
    COMPLAINT = "complaint"
    SMALLTALK = "smalltalk"
    OTHER = "other"


class Lang(StrEnum):
    """The languages the assistant answers in."""

    EN = "en"
    ZH = "zh-CN"


#: Intents the assistant does not answer itself: a person at the shop does.
HANDOVER: Final = frozenset({Intent.COMPLAINT, Intent.OTHER})
#: Intents it answers and also forwards to the shop (a request only the shop can grant; riders
#: are never given the customer's phone number, so a call is the shop's to arrange).
FORWARDED: Final = frozenset({Intent.CHANGE_TIME, Intent.CHANGE_ADDRESS, Intent.CALL})


@dataclass(frozen=True, slots=True)
class Reading:
    """A line's intent and language."""

    intent: Intent
    lang: Lang


_HAN = re.compile(r"[\u3400-\u9fff]")
_WORD = re.compile(r"[a-z0-9']+")

#: English keywords a typo may stand for (one edit away, for words of 4 letters or more).
_VOCAB: Final = frozenset(
    str.split(
        """where status update track tracking left sent shop way picked delivery deliver delivered
    arrive arrival coming long minutes time when expect estimated soon late later earlier
    rider driver courier deliverer name bringing delivering call phone ring number
    change update postpone reschedule instead move address office different moved tomorrow
    wilted damaged broken rude refund terrible unhappy unacceptable disappointed complaint dead
    wrong missing falling awful angry thanks thank hello cheers great order flowers bouquet"""
    )
)


def _edit1(a: str, b: str) -> bool:
    """True if ``a`` and ``b`` differ by one insertion, deletion, substitution or swap."""
    if abs(len(a) - len(b)) > 1:
        return False
    if len(a) == len(b):
        diff = [i for i in range(len(a)) if a[i] != b[i]]
        if len(diff) == 1:
            return True
        i, j = diff if len(diff) == 2 else (0, 0)
        return j == i + 1 and a[i] == b[j] and a[j] == b[i]
    short, long_ = (a, b) if len(a) < len(b) else (b, a)
    return any(long_[:i] + long_[i + 1 :] == short for i in range(len(long_)))


#: Chat shorthand and short typos (too short for the one-edit rule), and real words that are one
#: edit away from a keyword but mean something else.
_SHORT: Final = {"wen": "when", "cal": "call", "cn": "can", "wat": "what", "r": "are", "u": "you"}
_KEEP: Final = frozenset({"there", "here", "were", "went", "hear", "lane", "name", "same", "tome"})


@lru_cache(maxsize=4096)
def _correct(word: str) -> str:
    """``word``, or the keyword it is one typo away from."""
    if word in _SHORT:
        return _SHORT[word]
    if word in _VOCAB or word in _KEEP or len(word) < 4:
        return word
    for key in sorted(_VOCAB):
        if len(key) >= 4 and _edit1(word, key):
            return key
    return word


def normalise(text: str) -> str:
    """NFKC, lower case, typos of keywords corrected, one space between words; Han kept as is."""
    folded = unicodedata.normalize("NFKC", text).lower()
    out: list[str] = []
    for piece in re.split(r"(\s+|[\u3400-\u9fff]+)", folded):
        if not piece or piece.isspace():
            continue
        if _HAN.match(piece):
            out.append(piece)
        else:
            out.extend(_correct(w) for w in _WORD.findall(piece))
    return " ".join(out)


def language(text: str) -> Lang:
    """Simplified Chinese if the line has any Han character, else English."""
    return Lang.ZH if _HAN.search(text) else Lang.EN


def _rx(*patterns: str) -> re.Pattern[str]:
    return re.compile("|".join(f"(?:{p})" for p in patterns))


#: (intent, pattern) tried in order over the normalised line; the first match wins.
_RULES: Final[tuple[tuple[Intent, re.Pattern[str]], ...]] = (
    (
        Intent.COMPLAINT,
        _rx(
            r"\b(wilted|damaged|broken|rude|refund|terrible|awful|unhappy|unacceptable|disappointed)\b",
            r"\bcomplaint\b|\bcomplain\b|\bdead\b|\bwrong (person|flowers|bouquet|order)\b",
            r"\bbouquet is wrong\b|\bis missing\b|\bare missing\b|\bfalling off\b|\bnothing like\b",
            r"枯|蔫|坏了|烂|投诉|退款|碎|态度|差|送错|不满|失望|wilted",
        ),
    ),
    (
        Intent.CHANGE_ADDRESS,
        _rx(
            r"\baddress\b.*\b(change|update|wrong|different|now|new)\b",
            r"\b(change|update|wrong|different|new)\b.*\baddress\b",
            r"\b(deliver|bring|send) (it )?to\b.*\b(instead|office|house|home)\b",
            r"\bi moved\b",
            r"改地址|换.{0,4}地址|地址.{0,6}(改|错)|送到(公司|别的|另)|address.{0,3}改",
        ),
    ),
    (
        Intent.CHANGE_TIME,
        _rx(
            r"\b(change|postpone|reschedule|move)\b.*\b(time|delivery|tomorrow|afternoon|morning|\d)",
            r"\b(come|deliver|deliver it|it come) (later|earlier)\b|\bcan it come earlier\b",
            r"\binstead\b|\bcome later\b|\bdeliver it later\b",
            r"改.{0,3}时间|换个时间|晚点送|改到|推迟|提前送|改期",
        ),
    ),
    (
        Intent.CALL,
        _rx(
            r"\b(call|phone|ring)\b",
            r"\bmy number\b",
            r"电话|联系我|call",
        ),
    ),
    (
        Intent.RIDER,
        _rx(
            r"\bwho('s| is| will|s)?\b.*\b(deliver|delivering|bringing|rider|driver|courier|guy)",
            r"\bwhich (rider|driver|courier)\b|\bname of the (rider|driver|courier)\b",
            r"谁|骑手是|配送员叫|哪位|who.*骑手",
        ),
    ),
    (
        Intent.ETA,
        _rx(
            r"\bwhen\b|\bhow (long|much longer|many minutes)\b|\bwhat time\b|\beta\b",
            r"\barrival time\b|\bestimated\b|\bon time\b|\bbefore \d|\bminutes left\b",
            r"什么时候|几点|多久|多长时间|预计|准时|多少分钟|when",
        ),
    ),
    (
        Intent.WHERE,
        _rx(
            r"\bwhere\b|\bstatus\b|\bupdate\b|\btrack\b|\bon the way\b|\bout for delivery\b",
            r"\bpicked up\b|\bleft the shop\b|\bstill at the shop\b|\bsent out\b",
            r"哪|状态|送出|出发|店里|查一下",
        ),
    ),
    (
        Intent.SMALLTALK,
        _rx(
            r"^(ok |okay )?(great )?(thanks|thank you|thank u|thx|cheers|hello|hi|hey|hi there)\b",
            r"\b(got it|thanks|thank you|thank u)\b",
            r"谢|你好|您好|在吗",
        ),
    ),
)


def intent_of(normalised: str) -> Intent:
    """The first rule of :data:`_RULES` matching an already :func:`normalise`-d line."""
    for intent, pattern in _RULES:
        if pattern.search(normalised):
            return intent
    return Intent.OTHER


def classify(text: str) -> Reading:
    """The intent and language of a customer's chat line."""
    return Reading(intent_of(normalise(text)), language(text))
