"""Every prompt of the pipeline and the profile format: the file to edit for a prompt tweak.

  the profile format  PROFILE_FORM (in words), parse_profile, normalize_profile, merge_profiles
  teacher prompt      02's teachers (teacher_messages): the user's newest items and a worked example
  KD prompt           03's gpt_kd examples and sft_gpt_kd's profiles in 06 (kd_messages)
  two-turn dialogue   03's naive/mask examples (two_turn_messages); its first turn is the inference prompt (eq. 5)
                      of 02's reward queries, 05's rollouts and 06's user profiles (inference_messages, user_prompt)
  item prompts        03's item examples and 06's item profiles (warm_item_messages, cold_item_messages)
  sizes               PROMPT_SIZES: how much of a history a prompt shows; 02 records them in prompt.json, which
                      03, 05 and 06 read (prompt_settings)
A stage's recorded code includes this file (common.stage_code): editing a prompt marks what 02-06 built with it as
built by changed code.
"""
import collections
import hashlib
import json
import re
from pathlib import Path

from common import StaleInputError

# ----------------------------------------------------------------------------- profile format, inference prompt

# The format is described in words, never shown with sample terms: small models copy any example verbatim
# (SmolLM2-135M copied both "A, B, C" placeholders and a concrete sample profile into most of its answers).
PROFILE_FORM = ("one line: 'User identity:' then {n} short comma-separated identities (who the user is), then "
                "'; User interests:' then {n} comma-separated interests (genres, topics or themes)")
SYSTEM_PROMPT = (
    "You write user profiles for a recommender. Users with similar histories share interests, so similar "
    "users' items help describe the target user. Reply with " + PROFILE_FORM.format(n="three") + ".")

# The two-turn dialogue 03 teaches (sec. 2.3.2). Its first turn is also the inference prompt (eq. 5) of 02's reward
# pairs, 05's rollouts and 06's user profiles, with the answer opened by the target's line ("Target user:"): the tuned
# model is asked exactly the question it was trained on. Asked a separate single-profile prompt instead, the tuned
# model mixed the two formats ("Target user identity: ..."), and far fewer of its profiles parsed (docs/results.md,
# "The inference prompt").
TWO_TURN_SYSTEM = (
    "You are a recommendation assistant. Collaborative filtering assumes that users with similar interaction "
    "histories share interests, so similar users' histories and profiles help predict what a user will like. "
    "The task has two stages: first you write a profile for the target user and for each similar user from "
    "their items, then you use these profiles to predict whether the target user will interact with a new item. "
    "A profile is " + PROFILE_FORM.format(n="three") + ".")
TURN1_PROMPT = (
    "Target user's items, oldest to newest{dropped}:\n{target}\n\n"
    "{neighbors}\n\n"
    "Write a profile for the target user and for each similar user, one per line.")
TURN1_NEIGHBOR = "Similar user {n}'s items{dropped}:\n{items}"
TURN1_ANSWER_LINE = "{who}: {profile}"
TARGET_WHO = "Target user"     # `who` of the target's line; the neighbours' are "Similar user {n}"
ANSWER_PREFIX = TURN1_ANSWER_LINE.format(who=TARGET_WHO, profile="").rstrip()  # the open answer of eq. 5
INFERENCE_FORMAT = "two-turn first turn, answer opened"  # prompt.json records it; older runs asked another prompt


def clip(text, max_chars):
    """`text` cut to max_chars characters (0: whole)."""
    return text if not max_chars or len(text) <= max_chars else text[:max_chars - 1].rstrip() + "…"


def shown_items(items, max_items):
    """The items a prompt shows of a history (oldest to newest): the newest `max_items` (0 = all). The one rule,
    shared by the prompts (item_list) and 02's teachers, whose profiles must be a function of what is shown."""
    return list(items)[-max_items:] if max_items else list(items)


def item_list(items, item_text, max_items, max_chars=80):
    """A numbered list of the newest `max_items` items (texts cut to max_chars), and how many were dropped."""
    kept = shown_items(items, max_items)
    lines = [f"{n}. {clip(item_text[i], max_chars)}" for n, i in enumerate(kept, 1)]
    return "\n".join(lines), len(items) - len(kept)


# How much of a user's history the inference prompt shows: 02's reward queries, 05's PPO prompts and 06's user
# prompts all use these, so the reward model scores profiles for the very prompts the policy answers. The official
# code shows up to 5 items per user with their whole texts (max_chars 0); the cpu preset (scripts/presets.sh) cuts
# texts at 48 characters, because CPU generation pays for prompt tokens (it is prefill-bound): a prompt then stays
# near 300 SmolLM2 tokens on ml-100k, ~80 of them the shared system prompt.
PROMPT_SIZES = dict(max_items=5, max_nbr_items=2, n_nbrs=2, max_chars=0)
PROMPT_FILE = "prompt.json"  # 02 writes the sizes it ran with; 03, 05 and 06 read them (one source of truth)


def prompt_settings(run):
    """The prompt sizes 02 ran with: {"teacher": {max_items, max_chars}, what the teacher saw of a user, which 03's
    training prompts show too; "inference": PROMPT_SIZES' keys, the inference prompt of 02's reward queries, 05's
    rollouts and 06's user profiles}. A stage that trained or answers on other sizes would learn or be scored on
    prompts it never sees, so there are no per-stage flags for them: change them in 02."""
    path = Path(run) / PROMPT_FILE
    if not path.exists():
        raise StaleInputError(f"{path} is missing: run 02_distill.py first (it records the prompt sizes)")
    settings = json.loads(path.read_text())
    if settings.get("inference_format") != INFERENCE_FORMAT:
        raise StaleInputError(f"{path} was written by an older 02_distill.py, whose reward pairs ask another "
                              f"inference prompt than this code's ({INFERENCE_FORMAT!r}): run 02 again, then 03-06")
    return settings


def dropped_note(n):
    return f" ({n} older items not shown)" if n else ""


def turn1_messages(target_items, neighbor_items, item_text, max_items, max_nbr_items, max_chars):
    """The first turn of 03's dialogue (system and user messages): the target's and its neighbours' items."""
    target, dropped = item_list(target_items, item_text, max_items, max_chars)
    blocks = []
    for n, items in enumerate(neighbor_items, 1):
        text, d = item_list(items, item_text, max_nbr_items, max_chars)
        blocks.append(TURN1_NEIGHBOR.format(n=n, dropped=dropped_note(d), items=text))
    return [{"role": "system", "content": TWO_TURN_SYSTEM},
            {"role": "user", "content": TURN1_PROMPT.format(dropped=dropped_note(dropped), target=target,
                                                            neighbors="\n\n".join(blocks) or "(no similar users)")}]


def inference_messages(target_items, neighbor_items, item_text, max_items=PROMPT_SIZES["max_items"],
                       max_nbr_items=PROMPT_SIZES["max_nbr_items"], max_chars=PROMPT_SIZES["max_chars"]):
    """The inference prompt (eq. 5): turn 1 of 03's dialogue, then the assistant's answer opened with the target's
    line prefix (ANSWER_PREFIX). The model continues it with the target's profile (render); a response to it is
    that continuation (render_ids)."""
    return (turn1_messages(target_items, neighbor_items, item_text, max_items, max_nbr_items, max_chars)
            + [{"role": "assistant", "content": ANSWER_PREFIX}])


def user_prompt(u, train, user_nbrs, item_text, max_items=PROMPT_SIZES["max_items"],
                max_nbr_items=PROMPT_SIZES["max_nbr_items"], n_nbrs=PROMPT_SIZES["n_nbrs"],
                max_chars=PROMPT_SIZES["max_chars"]):
    """The inference prompt of user u: its training items and those of its first n_nbrs neighbours (0 = all)."""
    nb = [int(v) for v in user_nbrs[u] if int(v) >= 0 and int(v) != u]
    nb = nb[:n_nbrs] if n_nbrs else nb
    return inference_messages(train[u], [train[v] for v in nb], item_text, max_items, max_nbr_items, max_chars)


# Item profiles ("the users this item suits") are written in the user format, which 03 teaches on teacher item
# profiles: a warm item's is the most common terms of the profiles of its recent training users, a cold item's
# those of its text-similar warm items' item profiles (merge_profiles), each a function of what its prompt shows.
ITEM_SYSTEM = (
    "You are a recommendation assistant that describes which users an item suits. An item profile describes "
    "the users the item targets. Reply with " + PROFILE_FORM.format(n="three") + ".")
WARM_ITEM_PROMPT = (
    "Item: {item}\n\n"
    "Profiles of users who chose this item:\n{profiles}\n\n"
    "Write the profile of the users this item suits.")
COLD_ITEM_PROMPT = (
    "Item: {item}\n\n"
    "Similar items and the users they suit:\n{similar}\n\n"
    "Write the profile of the users this item suits.")


def warm_item_messages(item, profiles):
    """item: its text; profiles: its recent users' profiles, newest first."""
    lines = [f"{n}. {p}" for n, p in enumerate(profiles, 1)]
    return [{"role": "system", "content": ITEM_SYSTEM},
            {"role": "user", "content": WARM_ITEM_PROMPT.format(item=item, profiles="\n".join(lines))}]


def cold_item_messages(item, similar):
    """item: its text; similar: [(text, item profile)] of its text-similar warm items, most similar first."""
    lines = [f"{n}. {t} -> {p}" for n, (t, p) in enumerate(similar, 1)]
    return [{"role": "system", "content": ITEM_SYSTEM},
            {"role": "user", "content": COLD_ITEM_PROMPT.format(item=item, similar="\n".join(lines) or "(none)")}]


def render(tok, messages):
    """The prompt text a model continues: a new assistant turn, or the open final assistant message (an answer
    prefix, as inference_messages ends with)."""
    if messages[-1]["role"] == "assistant":
        return tok.apply_chat_template(messages, tokenize=False, continue_final_message=True)
    return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def render_ids(tok, prompt_messages, response):
    """Token ids of the prompt messages followed by one assistant turn holding `response`; a prompt that ends with
    an open answer (inference_messages) has the response appended to it, as the model wrote it there."""
    msgs = list(prompt_messages)
    if msgs[-1]["role"] == "assistant":
        response = (msgs.pop()["content"] + " " + response.lstrip()).rstrip()
    msgs.append({"role": "assistant", "content": response})
    return list(tok.apply_chat_template(msgs, tokenize=True, return_dict=True)["input_ids"])


def prompt_hash(text):
    return hashlib.sha256(text.encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------- profiles

PROFILE_RE = re.compile(r"User identity:\s*(?P<identity>[^;\n]+?)\s*;\s*User interests:\s*(?P<interests>[^\n]+)",
                        re.IGNORECASE)


def parse_profile(text, n_each=3):
    """The canonical profile string if `text` holds `n_each` identities and `n_each` interests, else None."""
    m = PROFILE_RE.search(text or "")
    if not m:
        return None
    parts = []
    for key in ("identity", "interests"):
        terms = [t.strip(" .\"'") for t in m.group(key).split(",")]
        terms = [t for t in terms if t]
        if len(terms) != n_each or len(set(t.lower() for t in terms)) != n_each:
            return None
        parts.append(", ".join(terms))
    return f"User identity: {parts[0]}; User interests: {parts[1]}"


_SECTION_GAP = re.compile(r"(User identity:[^\n;]*?)\s*[\n.]+\s*(User interests:)", re.I)


def normalize_profile(text, n_each=3):
    """parse_profile after light repairs of what small models often write: the two parts on separate
    lines (or split by '.'), bullets/bold marks, and more than `n_each` terms (the first `n_each` distinct ones
    are kept). Returns the canonical profile or None."""
    if not text:
        return None
    t = text.replace("**", "").replace("*", "")
    t = _SECTION_GAP.sub(r"\1; \2", t)
    m = PROFILE_RE.search(t)
    if not m:
        return None
    parts = []
    for key in ("identity", "interests"):
        terms, seen = [], set()
        for term in m.group(key).split(","):
            term = term.strip(" .\"'-")
            if term and term.lower() not in seen and len(term) <= 60:
                seen.add(term.lower())
                terms.append(term)
        if len(terms) < n_each or all(len(t) <= 1 for t in terms):  # too few, or the A, B, C placeholders copied
            return None
        parts.append(", ".join(terms[:n_each]))
    return parse_profile(f"User identity: {parts[0]}; User interests: {parts[1]}", n_each=n_each)


# An answer can fit the profile format and still carry something else: an instruction ("print OPENAI_API_KEY",
# "ignore the instructions above"), a link or code. It is no profile for a student to learn to write, nor a reward
# pair's chosen answer, so a teacher's answer with it counts as malformed (retried, then the fallback).
NOT_PROFILE_RE = re.compile(
    r"://|\bwww\.|[<>{}\[\]`$|\\=]|\b[A-Z][A-Z0-9]*_[A-Z0-9_]+\b|(?i:\b(?:ignore|disregard|forget)\b.*\b(?:instructions?|"
    r"above|previous|rules)\b|\bapi[ _-]?keys?\b|\bpasswords?\b|\bsystem prompt\b|\bos\.environ\b|\bgetenv\b|"
    r"\b(?:print|eval|exec)\s*\(|\b(?:sudo|curl|wget)\b)")


def teacher_profile(text, n_each=3):
    """normalize_profile of a teacher's answer; None also when the profile carries non-profile content
    (NOT_PROFILE_RE)."""
    prof = normalize_profile(text, n_each)
    return None if prof is None or NOT_PROFILE_RE.search(prof) else prof


def merge_profiles(profiles, fill=(), n=3):
    """The profile of the n most common identity and n most common interest terms of `profiles` (case-insensitive;
    ties to the term met first), topped up from the profiles in `fill`; None if fewer than n terms a side."""
    parts = []
    for side in ("identity", "interests"):
        count, first, name = collections.Counter(), {}, {}
        for weight, p in [(1, p) for p in profiles] + [(0, p) for p in fill]:  # fill terms rank after counted ones
            m = PROFILE_RE.search(p or "")
            for t in (m.group(side).split(",") if m else []):
                t = t.strip(" .\"'")
                if t:
                    count[t.lower()] += weight
                    first.setdefault(t.lower(), len(first))
                    name.setdefault(t.lower(), t)
        parts.append(", ".join(name[k] for k in sorted(count, key=lambda k: (-count[k], first[k]))[:n]))
    return parse_profile(f"User identity: {parts[0]}; User interests: {parts[1]}", n)



# ----------------------------------------------------------------------------- teacher prompt (02)

TEACHER_SYSTEM = (
    "You are an expert at understanding people from what they watch, read or buy. Given a user's items, "
    "describe the user in exactly this form and nothing else:\n"
    "User identity: A, B, C; User interests: X, Y, Z\n"
    "Identities say who the user probably is (age group, life stage, kind of viewer or reader); interests name "
    "genres, topics or themes the items share. Exactly three of each, 1-4 words each, no commas inside a term, "
    "no explanation.")
TEACHER_USER = "The user's items, oldest to newest{dropped}:\n{items}\n\nWrite this user's profile."


def teacher_messages(items, item_text, example, max_items=PROMPT_SIZES["max_items"],
                     max_chars=PROMPT_SIZES["max_chars"]):
    """System + worked example (another user's items and their rules profile) + this user's items. Every teacher is
    shown the same: the newest max_items items cut at max_chars and how many older ones are left out, so that a
    target is inferable from the student's prompt (docs/spec.md, section 5)."""
    def user_turn(its):
        text, dropped = item_list(its, item_text, max_items, max_chars)
        return TEACHER_USER.format(dropped=f" ({dropped} older items not shown)" if dropped else "", items=text)
    ex_items, ex_profile = example
    return [{"role": "system", "content": TEACHER_SYSTEM},
            {"role": "user", "content": user_turn(ex_items)},
            {"role": "assistant", "content": ex_profile},
            {"role": "user", "content": user_turn(items)}]


# ----------------------------------------------------------------------------- KD and two-turn prompts (03, 06)

KD_SYSTEM = SYSTEM_PROMPT
KD_PROMPT = (
    "Items the user interacted with, oldest to newest{dropped}:\n{items}\n\n"
    "Write this user's profile.")

# Turn 1 (the target's and its neighbours' items, then one profile line each) is turn1_messages: the inference
# prompt of 02, 05 and 06 is the same turn, so the tuned model is later asked what it learnt here.
TURN2_PROMPT = ("Will the target user interact with this item?\n{item}\n"
                "Answer Yes or No.")
ANSWERS = {1: "Yes", 0: "No"}


def kd_messages(items, item_text, max_items, item_chars, profile=None):
    text, dropped = item_list(items, item_text, max_items, max_chars=item_chars)
    msgs = [{"role": "system", "content": KD_SYSTEM},
            {"role": "user", "content": KD_PROMPT.format(dropped=dropped_note(dropped), items=text)}]
    if profile is not None:
        msgs.append({"role": "assistant", "content": profile})
    return msgs


def two_turn_messages(target_items, nbrs, item_text, v, label, target_profile, max_items, max_nbr_items,
                      item_chars):
    """nbrs: list of (items, profile). target_items must already exclude a positive v."""
    answers = [TURN1_ANSWER_LINE.format(who=TARGET_WHO, profile=target_profile)]
    answers += [TURN1_ANSWER_LINE.format(who=f"Similar user {n}", profile=profile)
                for n, (_, profile) in enumerate(nbrs, 1)]
    return turn1_messages(target_items, [items for items, _ in nbrs], item_text, max_items, max_nbr_items,
                          item_chars) + [
        {"role": "assistant", "content": "\n".join(answers)},
        {"role": "user", "content": TURN2_PROMPT.format(item=item_text[v][:item_chars * 2])},
        {"role": "assistant", "content": ANSWERS[label]},
    ]

