"""Reading models' structured answers, and deciding on the scores a sample has.

Prompts ask for labelled lines (`REASONING: ...`, `PROMPT: ...`, `VERDICT: yes`).
Real models follow that format; tiny random ones never do, so parsing never
raises: an answer without its fields is `None`, the step records a `*_parsed`
score of 0 and a fallback value, and the policy decides. A broken bound of a
`*_parsed` score is reported with the reason `unparseable`.

Synthesis mixes kinds of sample in one stage (a text-to-image sample has no
source image), so a policy rule applies to the samples that have its score;
the thresholds a row records are the rules that applied to it.
"""

from __future__ import annotations

import re
from typing import Any

from weft.schemas.policy import Policy

UNPARSEABLE = "unparseable"
_YES = {"yes", "y", "true", "ok", "pass"}
_NO = {"no", "n", "false", "fail"}


def _labels(fields: list[str]) -> re.Pattern[str]:
    """A label starts a line (any case, markdown allowed: `**Prompt:**`) or, written in
    capitals as asked, follows whitespace mid-line (`... REASONING: x PROMPT: y`)."""
    names = "|".join(re.escape(f.upper()) for f in fields)
    return re.compile(rf"(?:^[ \t>*_#-]*(?i:(?P<start>{names}))|(?<=\s)(?P<inline>{names}))"
                      rf"[ \t*_]*:[ \t*_]*", re.MULTILINE)


def parse_fields(text: str, fields: list[str]) -> dict[str, str] | None:
    """The labelled fields of an answer (`NAME: value`, value up to the next label).

    None unless every field is present with a non-empty value; the first occurrence
    of a label wins.
    """
    wanted = {f.upper() for f in fields}
    text = text or ""
    found: dict[str, str] = {}
    marks = [(m.start(), m.end(), (m.group("start") or m.group("inline")).upper())
             for m in _labels(fields).finditer(text)]
    for i, (_, end, name) in enumerate(marks):
        stop = marks[i + 1][0] if i + 1 < len(marks) else len(text)
        value = text[end:stop].strip().strip("*_").strip()
        if value and name not in found:  # the first occurrence of a label wins
            found[name] = value
    if set(found) != wanted:
        return None
    return {f: found[f.upper()] for f in fields}


def parse_verdict(text: str, field: str = "VERDICT") -> float | None:
    """1.0 for a yes, 0.0 for a no in the `field` line; None when there is no verdict."""
    parsed = parse_fields(text, [field])
    if parsed is None:
        return None
    words = re.findall(r"[a-z]+", parsed[field].lower())
    if not words:
        return None
    if words[0] in _YES:
        return 1.0
    if words[0] in _NO:
        return 0.0
    return None


def applicable_policy(policy: Policy, stage: str, scores: dict[str, Any]) -> Policy:
    """The policy restricted to `stage`'s rules whose score this row has."""
    rules = {name: bounds for name, bounds in policy.rules.get(stage, {}).items()
             if name in scores}
    return Policy(name=policy.name, version=policy.version, rules={stage: rules})


def decide(policy: Policy, stage: str, scores: dict[str, Any]
           ) -> tuple[str, str, dict[str, Any]]:
    """(decision, reason, thresholds) from the rules that apply to these scores."""
    view = applicable_policy(policy, stage, scores)
    decision, reason = view.decide(stage, scores)
    parsed = [name for name in view.rules.get(stage, {}) if name.endswith("_parsed")]
    if any(reason.startswith(f"{name}_") for name in parsed):
        reason = UNPARSEABLE
    return decision, reason, view.thresholds(stage)
