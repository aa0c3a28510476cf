"""Answer extraction from completions (pure functions, no model).

    truncate_at_stop("x = 1\ndef g", ["\ndef"])   -> ("x = 1", True)
    extract_number("... #### 1,234 dollars")       -> "1234"
    last_boxed(r"so \\boxed{\\frac{1}{2}}.")          -> r"\\frac{1}{2}"
    extract_integer(r"\\boxed{033}")                 -> 33
    extract_choice("A careful look... The answer is (C).") -> "C"
    math_equal(completion, gold)                    -> bool (math-verify parse + verify)
"""
from __future__ import annotations

import re
from collections import Counter
from typing import Hashable, Optional, Sequence

_NUM = r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+"


def truncate_at_stop(text: str, stops: Sequence[str]) -> tuple[str, bool]:
    """Cut `text` at the earliest occurrence of any stop string -> (kept text, whether cut)."""
    cut = min((i for i in (text.find(s) for s in stops if s) if i >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


def normalize_number(s: str) -> Optional[str]:
    """'1,234.50' -> '1234.5'; '$-3' -> '-3'; '7.' -> '7'. None when no number is there."""
    m = re.search(_NUM, s.replace("$", "").replace("\u2212", "-"))
    if not m:
        return None
    t = m.group(0).replace(",", "")
    try:
        v = float(t)
    except ValueError:
        return None
    return str(int(v)) if v == int(v) and abs(v) < 1e16 else repr(v)


def extract_number(text: str) -> Optional[str]:
    """GSM8K-style final number: after the last '####', else after the last 'answer is', else in the
    last \\boxed{}, else the last number in the text. Thousands separators, '$' and trailing units
    or punctuation are dropped ('1,234 dollars.' -> '1234')."""
    for pat in (r"####\s*([^\n]*)", r"answer is[:\s]*\$?\s*([^\n]*)"):
        hits = re.findall(pat, text, flags=re.IGNORECASE)
        for h in reversed(hits):
            n = normalize_number(h)
            if n is not None:
                return n
    boxed = last_boxed(text)
    if boxed is not None and normalize_number(boxed) is not None:
        return normalize_number(boxed)
    nums = re.findall(_NUM, text.replace("$", ""))
    return normalize_number(nums[-1]) if nums else None


def numbers_equal(a: Optional[str], b: Optional[str], tol: float = 1e-6) -> bool:
    if a is None or b is None:
        return False
    try:
        return abs(float(a) - float(b)) <= tol * max(1.0, abs(float(b)))
    except ValueError:
        return False


def gsm8k_gold(answer: str) -> str:
    """The reference number of a GSM8K answer field ('... #### 72')."""
    n = normalize_number(answer.split("####")[-1])
    if n is None:
        raise ValueError(f"GSM8K answer without a final number: {answer[-80:]!r}")
    return n


def last_boxed(text: str) -> Optional[str]:
    """Content of the last \\boxed{...} / \\fbox{...}, braces balanced (nesting kept)."""
    starts = [m.end() for m in re.finditer(r"\\(?:boxed|fbox)\s*\{", text)]
    for start in reversed(starts):
        depth, i = 1, start
        while i < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            i += 1
        if depth == 0:
            return text[start:i - 1]
    return None


def extract_integer(text: str) -> Optional[int]:
    """AIME answer (an integer): the last \\boxed{} (\\text{}, '$', spaces and thousands commas
    removed; a box that is not an integer, e.g. a fraction, gives None), else the number after the
    last 'answer is', else the last integer in the text."""
    boxed = last_boxed(text)
    if boxed is not None:
        b = re.sub(r"\\(?:text|mathrm|mathbf)\{([^}]*)\}", r"\1", boxed)
        b = re.sub(r"[\s$]|\\!|\\,", "", b).replace(",", "").rstrip(".")
        return int(b) if re.fullmatch(r"-?\d+", b) else None
    for c in reversed(re.findall(r"answer is[:\s]*([^\n]*)", text, flags=re.IGNORECASE)):
        n = normalize_number(c)
        if n is not None and re.fullmatch(r"-?\d+", n):
            return int(n)
    nums = re.findall(r"-?\d[\d,]*", text)
    return int(nums[-1].replace(",", "")) if nums else None


def extract_choice(text: str, letters: str = "ABCD") -> Optional[str]:
    """Multiple-choice letter: 'answer is (X)' / 'answer: X' (last one), else \\boxed{X}, else the
    last '(X)', else a letter alone at the very start ('B. because ...'). A capital letter in prose
    ('A good approach ...') is never taken for an answer."""
    L = f"[{letters}]"
    pats = (rf"answer\s*(?:is|:)\s*(?:option\s*)?\(?\**({L})\b\)?", rf"\\boxed\{{\s*(?:\\text\{{)?({L})\b",
            rf"\(({L})\)")
    for pat in pats:
        hits = re.findall(pat, text, flags=re.IGNORECASE if pat is pats[0] else 0)
        if hits:
            return hits[-1].upper()
    m = re.match(rf"\s*\(?({L})(?:[).:]|\s*$)", text)
    return m.group(1) if m else None


def math_equal(completion: str, gold: str) -> tuple[bool, Optional[str]]:
    """math-verify: parse the completion (prefers the last \\boxed{}) and the gold answer (a bare
    LaTeX expression, wrapped in $...$) and verify equivalence -> (correct, parsed answer)."""
    from math_verify import parse, verify

    g = parse(gold if "$" in gold or "\\boxed" in gold else f"${gold}$")
    p = parse(completion)
    if not p or not g:
        return False, None
    return bool(verify(g, p)), str(p[-1])


def code_block(text: str) -> str:
    """For chat models: the first fenced ```python block if any, else the text itself."""
    m = re.search(r"```(?:[Pp]ython3?|py)?\s*\n(.*?)(?:```|$)", text, flags=re.DOTALL)
    return m.group(1) if m else text


def majority(answers: Sequence[Optional[Hashable]]) -> Optional[Hashable]:
    """Most common non-None answer; ties go to the answer seen first. None if all are None."""
    valid = [a for a in answers if a is not None]
    if not valid:
        return None
    counts = Counter(valid)
    best = max(counts.values())
    return next(a for a in valid if counts[a] == best)
