"""Batched generation of short answers (profiles): the engine of 02's local teacher, 03, 05 and 06.

generate_batches runs rendered chat prompts in batches sorted by length: the tokens every prompt shares (the system
prompt) run once, the rest of each prompt is prefilled a few rows at a time on a CPU, and decoding runs on a
preallocated KV cache. An answer stops at end-of-turn or after its first whole profile line (ProfileLineDone);
answers that a caller's `accept` rejects are sampled again from the prompt's cached keys/values. Optional logits
processors: NoRepeatInAnswer, DistinctTerms, and TopKTopPSampler (sampling as a processor).
"""
import numpy as np
import torch

from prompts import PROFILE_RE, render

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
    classic films"). Greedy answers of the CPU-budget model often repeat a term ("casual viewer, casual viewer, casual
    viewer"), which parse_profile rejects (06's DISTINCT_TERMS says what this does to the probe)."""

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
    transformers sorts and draws over the whole vocabulary each step, a large share of a short answer's decode with a
    49k-token vocabulary. Not the same random stream as transformers' sampling, the same distribution
    (tests/test_generate.py)."""

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


# On a CPU, prompts are run through the model a few at a time (_prefill): the activations of the elementwise ops
# and attention of a few prompts stay in cache, those of a batch of 64 do not; 8 rows was the fastest of 4, 8 and 16
# (bench/bench_profile_phase.py --prefill-rows; bench/RESULTS.md, "Batched generation"). A GPU takes the whole batch.
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
    for layer in range(len(prompt_kv)):
        keys, values = prompt_kv[layer]
        prompt_kv[layer] = None  # the static cache holds the copy: free the prompt's as it goes (one cache at a time)
        cache.update(keys, values, layer)
    del keys, values
    processors = LogitsProcessorList()
    if no_repeat_ngram > 0:
        processors.append(NoRepeatInAnswer(width, no_repeat_ngram))
    if distinct_terms:
        processors.append(DistinctTerms(tok, width, stop_token_ids(tok, model)))
    if temperature > 0:
        processors.append(TopKTopPSampler(temperature, top_p))
    # disable_compile: given a StaticCache on a GPU, transformers would compile the forward for every new cache
    # object, i.e. once per batch
    out = model.generate(input_ids=input_ids, attention_mask=mask, cache=cache, logits_processor=processors,
                         disable_compile=True,
                         max_new_tokens=max_new_tokens, eos_token_id=stop_token_ids(tok, model),
                         pad_token_id=tok.pad_token_id, do_sample=False, temperature=None, top_p=None, top_k=None,
                         stopping_criteria=StoppingCriteriaList([ProfileLineDone(tok, width)]))
    return [a.strip() for a in tok.batch_decode(out[:, width:], skip_special_tokens=True)], cache


def kv_bytes_per_token(model):
    """Bytes one token's keys and values take in `model`'s cache, all layers (Llama-2-7B in bf16: 512 KB)."""
    c = model.config.get_text_config()
    heads = getattr(c, "num_key_value_heads", None) or c.num_attention_heads
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    return 2 * c.num_hidden_layers * heads * head_dim * next(model.parameters()).element_size()


def kv_budget(device, budget_bytes=None):
    """The bytes a batch's KV cache may take: `budget_bytes`, or on a GPU half of its free memory now (the cache of
    a batch is allocated whole, for its prompts and max_new_tokens), on a CPU no limit."""
    if budget_bytes:
        return budget_bytes
    return torch.cuda.mem_get_info(device)[0] // 2 if device.type == "cuda" else None


def batches_within(lengths, batch_size, tokens_after, per_token, budget):
    """Consecutive batches of the prompts ordered by length (`lengths` ascending: a batch's widest prompt is its
    last) of at most `batch_size` prompts whose cache, rows x (widest prompt + tokens_after) x per_token bytes,
    stays within `budget` (None: no limit); a prompt alone over the budget is a batch of one."""
    batches, start = [], 0
    for k in range(len(lengths)):
        rows = k - start + 1
        over = budget is not None and rows * (lengths[k] + tokens_after) * per_token > budget
        if rows > batch_size or (over and rows > 1):
            batches.append(range(start, k))
            start = k
    batches.append(range(start, len(lengths)))
    return batches


@torch.no_grad()
def generate_batches(model, tok, texts, max_new_tokens=40, batch_size=32, temperature=0.0, top_p=0.95,
                     desc="generate", progress=True, prefix_cache=True, no_repeat_ngram=0, accept=None, retries=0,
                     retry_temperature=0.7, seed=0, prefill_rows=None, distinct_terms=False, kv_budget_bytes=None):
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
    a CPU, the whole batch elsewhere). A batch is cut short where its KV cache would pass kv_budget (bytes)."""
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
    # for the last position's logits made torch run the head on the strided last-position slice as a batched matmul,
    # copying the whole head weight once per prompt (bench/bench_prefill.py).
    decoder = model.get_decoder()
    prefix_kv = None
    if prefix:
        prefix_kv = DynamicCache()
        decoder(torch.tensor([prefix], device=device), cache=prefix_kv, use_cache=True)
    lengths = [len(ids[k]) for k in order]
    batches = [order[r.start:r.stop] for r in batches_within(lengths, batch_size, max_new_tokens,
                                                             kv_bytes_per_token(model),
                                                             kv_budget(device, kv_budget_bytes))]
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
        del cache  # before the next batch's prefill, and while the caller works on the answers
        yield [int(k) for k in idx], answers, attempts


def generate_texts(model, tok, message_lists, max_new_tokens, batch_size, desc="generate", temperature=0.0):
    """generate_batches over chat messages; the answers in input order."""
    out = [None] * len(message_lists)
    texts = [render(tok, m) for m in message_lists]
    for idx, answers, _ in generate_batches(model, tok, texts, max_new_tokens, batch_size, temperature, desc=desc):
        for k, a in zip(idx, answers):
            out[k] = a
    return out

