"""llm's generation speed-ups against the plain paths they replace: the CPU decode attention against sdpa,
batched generation from a shared-prefix cache against generation from whole prompts, and the whole fast path
(prefix cache, static cache, stop rule) against stock `model.generate` on a left-padded batch. Fast: tiny models."""
import string

import pytest
import torch

import generate
import llm
import prompts

torch.set_num_threads(1)

# ----------------------------------------------------------------------------- a tiny model that says something
# A character-level chat model trained (in seconds) to answer by the last letter of the user turn, so that greedy
# answers take every way an answer can end: a profile line followed by more text (the two-turn habit; 06 stops
# after the line), a short answer closed by a Llama-3 end-of-turn token that is not the tokenizer's eos, and text
# that runs past max_new_tokens. Its pad token is its eos (<|im_end|>, as SmolLM2's), which every ChatML prompt
# also holds between turns.
CHAR_SPECIAL = ["<unk>", "<|im_start|>", "<|im_end|>", "<|eot_id|>"]
CHAR_SYSTEM = "Write profiles."
CHAR_PROFILE = "User identity: ab, cd, ef; User interests: gh, ij, kl"
CHAR_ANSWERS = {"p": CHAR_PROFILE + "\nSimilar 1: xy, zz", "s": "No idea.<|eot_id|>", "l": "la " * 30}
CHAR_MAX_NEW = 64  # > the profile line (54 tokens), < the "l" answer (90)


def char_messages(k, kind):
    """Prompt k (its user turn k+1 characters long, so a batch is left-padded) asking for an answer of `kind`."""
    return [{"role": "system", "content": CHAR_SYSTEM}, {"role": "user", "content": "x" * (k + 1) + " " + kind}]


def char_prompts(n):
    return [char_messages(k, "psl"[k % 3]) for k in range(n)]


def build_char_llm(path, steps=200, seed=0):
    from tokenizers import Tokenizer, decoders, models
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
    vocab = {t: k for k, t in enumerate(CHAR_SPECIAL + list(string.printable[:95]) + ["\n"])}
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))  # no merges: one token per character
    tk.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", bos_token="<|im_start|>",
                                  eos_token="<|im_end|>", pad_token="<|im_end|>",
                                  additional_special_tokens=["<|eot_id|>"])
    tok.chat_template = llm.CHATML_TEMPLATE
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(vocab), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      pad_token_id=2, eos_token_id=2, bos_token_id=1, tie_word_embeddings=True)
    model = LlamaForCausalLM(cfg)
    rows = []
    for k, msgs in enumerate(char_prompts(6)):
        prompt = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        n = len(tok(prompt, add_special_tokens=False)["input_ids"])
        rows.append((tok(prompt + CHAR_ANSWERS["psl"[k % 3]], add_special_tokens=False)["input_ids"], n))
    width = max(len(ids) for ids, _ in rows)
    x = torch.full((len(rows), width), tok.pad_token_id)
    y = torch.full((len(rows), width), -100)
    for r, (ids, n) in enumerate(rows):
        x[r, :len(ids)] = torch.tensor(ids)
        y[r, n:len(ids)] = torch.tensor(ids[n:])
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 1e-2, total_steps=steps)
    for _ in range(steps):
        loss = model(input_ids=x, labels=y).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    assert loss.item() < 0.05, loss.item()
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def char_llm(tmp_path_factory):
    return build_char_llm(tmp_path_factory.mktemp("char_llm"))


def gqa_llama(attn):
    """A random 2-layer Llama with grouped-query attention (4 query heads over 2 key/value heads)."""
    from transformers import LlamaConfig, LlamaForCausalLM
    llm._register_cpu_attention()
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, pad_token_id=0)
    cfg._attn_implementation = attn
    return LlamaForCausalLM(cfg).eval()


@pytest.mark.parametrize("cache_kind", ["dynamic", "static"])
def test_cpu_attention_matches_sdpa(cache_kind):
    from transformers import DynamicCache, StaticCache
    torch.manual_seed(1)
    ids = torch.randint(1, 64, (3, 9))
    mask = torch.ones_like(ids)
    mask[0, :4] = 0  # left padding of different lengths
    mask[1, :1] = 0
    logits = {}
    for attn in ("sdpa", llm.CPU_ATTENTION):
        model = gqa_llama(attn)
        cache = DynamicCache() if cache_kind == "dynamic" else StaticCache(config=model.config, max_cache_len=16)
        steps = []
        with torch.no_grad():
            out = model(input_ids=ids, attention_mask=mask, cache=cache, use_cache=True)
            steps.append(out.logits[:, -1])
            step_mask = mask
            for _ in range(4):  # one-token decode steps: the path _cpu_attention replaces
                nxt = out.logits[:, -1].argmax(-1, keepdim=True)
                step_mask = torch.cat([step_mask, torch.ones_like(nxt)], 1)
                pos = step_mask.sum(1, keepdim=True) - 1
                out = model(input_ids=nxt, attention_mask=step_mask, position_ids=pos, cache=cache, use_cache=True)
                steps.append(out.logits[:, -1])
        logits[attn] = torch.stack(steps)
    torch.testing.assert_close(logits[llm.CPU_ATTENTION], logits["sdpa"], rtol=1e-5, atol=1e-5)


def test_shared_prefix():
    assert generate.shared_prefix([[1, 2, 3, 4], [1, 2, 5], [1, 2, 3]]) == [1, 2]
    assert generate.shared_prefix([[1, 2, 3], [1, 2, 3]]) == [1, 2]  # every prompt keeps a token of its own
    assert generate.shared_prefix([[7, 1], [8, 1]]) == []
    assert generate.shared_prefix([[5]]) == []


@pytest.mark.parametrize("batch_size", [1, 3])
def test_prefix_cache_generation_equals_whole_prompts(tiny_llm, batch_size):
    model, tok = llm.load_llm(tiny_llm, device="cpu", dtype=torch.float32)
    items = [f"{g} movie ( {k} )" for k, g in enumerate(["comedy", "drama", "horror", "romance", "action"] * 3)]
    texts = [prompts.render(tok, prompts.inference_messages(list(range(k % 7 + 1)), [list(range(k, k + 3))], items))
             for k in range(7)]
    ids = tok(texts, add_special_tokens=False)["input_ids"]
    assert len(generate.shared_prefix(ids)) > 20  # the system prompt and more are shared

    def answers(prefix_cache):  # sampled (a random model's greedy answer is one token repeated), same seed
        torch.manual_seed(0)
        out = {}
        for idx, ans, _ in generate.generate_batches(model, tok, texts, max_new_tokens=12, batch_size=batch_size,
                                             temperature=1.0, top_p=1.0, progress=False,
                                             prefix_cache=prefix_cache):
            out.update(zip(idx, ans))
        return [out[k] for k in range(len(texts))]

    # the prompts' forward runs the decoder only: the LM head sees decode steps, one contiguous position per prompt
    # (not the prompts' strided last positions, which torch multiplies by copying its weight per row)
    head_rows = []
    hook = model.get_output_embeddings().register_forward_hook(
        lambda m, args, out: head_rows.append((args[0].shape[1], args[0].is_contiguous())))
    with_prefix, whole = answers(True), answers(False)
    hook.remove()
    assert with_prefix == whole
    assert len(set(whole)) == len(whole)
    assert head_rows and set(head_rows) == {(1, True)}


class CharTokenizer:
    """ids are character codes, 0 is padding: enough to test what ProfileLineDone does with decoded text."""

    def batch_decode(self, rows, skip_special_tokens=True):
        return ["".join(chr(int(i)) for i in row if int(i)) for row in rows]


def test_profile_line_done():
    prompt = "Write the profile.\nUser identity: a, b, c; User interests: x, y, z\n"  # the prompt's own line: ignored
    answers = ["User identity: student, fan, teen; User interests: comedy, drama, horror\nSimilar user 1:",
               "User identity: student, fan, teen; User interests: comedy, drama, horror",  # no newline yet
               "User identity: student\nUser interests: comedy",
               "The movie\n"]
    width = max(map(len, answers))
    ids = torch.tensor([[ord(c) for c in prompt] + [0] * (width - len(a)) + [ord(c) for c in a] for a in answers])
    done = generate.ProfileLineDone(CharTokenizer(), len(prompt))(ids, None)
    assert done.tolist() == [True, False, False, False]


def first_profile_line(text):
    """06's rule written out plainly: the answer up to the end of its first whole profile line (or all of it)."""
    m = prompts.PROFILE_RE.search(text)
    return text[:m.end()] if m and text[m.end():].startswith("\n") else text


@pytest.mark.parametrize("batch_size", [2, 5])
def test_fast_generation_matches_stock_generate(char_llm, batch_size):
    """generate_batches (prefix cache, static cache, CPU attention, ProfileLineDone, stop_token_ids) against stock
    greedy `model.generate` on one left-padded batch of whole prompts, with 06's stop rule applied afterwards."""
    from transformers import AutoModelForCausalLM
    tok = llm.load_tokenizer(char_llm)
    eot = tok.convert_tokens_to_ids("<|eot_id|>")
    assert tok.pad_token_id == tok.eos_token_id != eot
    # the six trained prompts, and unseen ones whose answers hang on small differences in the logits
    msgs = char_prompts(6) + [char_messages(k, kind) for k, kind in [(0, "q"), (7, "z"), (3, "a"), (9, "pz")]]
    texts = [prompts.render(tok, m) for m in msgs]
    assert len(generate.shared_prefix(tok(texts, add_special_tokens=False)["input_ids"])) > 20

    stock = AutoModelForCausalLM.from_pretrained(char_llm, dtype=torch.float32).eval()
    enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    assert (enc["attention_mask"] == 0).any()  # left padding
    with torch.no_grad():
        out = stock.generate(**enc, do_sample=False, max_new_tokens=CHAR_MAX_NEW, eos_token_id=[tok.eos_token_id, eot],
                             pad_token_id=tok.pad_token_id)
    raw = tok.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    expected = [first_profile_line(a).strip() for a in raw]

    model, _ = llm.load_llm(char_llm, device="cpu", dtype=torch.float32)
    got = {}
    for idx, answers, _ in generate.generate_batches(model, tok, texts, CHAR_MAX_NEW, batch_size, progress=False):
        got.update(zip(idx, answers))
    assert [got[k] for k in range(len(texts))] == expected
    # every way of ending occurred: a profile line with more after it, an early <|eot_id|>, max_new_tokens
    assert expected[0] == CHAR_PROFILE and raw[0].startswith(CHAR_PROFILE + "\nSimilar")
    assert expected[1] == "No idea." and (out[1] == eot).any()
    assert len(tok(raw[2], add_special_tokens=False)["input_ids"]) == CHAR_MAX_NEW
    assert len(set(expected)) >= 5


def test_answer_end(char_llm):
    tok = llm.load_tokenizer(char_llm)
    stops = generate.stop_token_ids(tok)
    ids = (lambda text: tok(text, add_special_tokens=False)["input_ids"])
    line = ids(CHAR_PROFILE + "\n")
    assert generate.answer_end(tok, ids(CHAR_PROFILE + "\nSimilar 1: xy<|im_end|>"), stops) == (len(line), "profile")
    assert generate.answer_end(tok, ids("No.<|eot_id|>la la"), stops) == (4, "eot")
    assert generate.answer_end(tok, ids(CHAR_PROFILE + "<|im_end|>\n"), stops) == (len(line), "eot")
    assert generate.answer_end(tok, ids("la la"), stops) == (5, None)


def test_stop_token_ids_know_other_templates():
    """Llama-3 ends a turn with <|eot_id|> while its base eos is <|end_of_text|>: both stop an answer, and so do the
    eos ids of the model's generation config."""
    from types import SimpleNamespace

    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast
    vocab = {"<|begin_of_text|>": 0, "<|end_of_text|>": 1, "<|eot_id|>": 2, "a": 3, "<|reserved_4|>": 4}
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab=vocab)),
                                  bos_token="<|begin_of_text|>", eos_token="<|end_of_text|>",
                                  additional_special_tokens=["<|eot_id|>", "<|reserved_4|>"])
    assert generate.stop_token_ids(tok) == [1, 2]
    model = SimpleNamespace(generation_config=SimpleNamespace(eos_token_id=[1, 4]))
    assert generate.stop_token_ids(tok, model) == [1, 2, 4]
    model = SimpleNamespace(generation_config=SimpleNamespace(eos_token_id=None))
    assert generate.stop_token_ids(tok, model) == [1, 2]


def test_no_repeat_in_answer_matches_brute_force():
    g = torch.Generator().manual_seed(0)
    vocab, prompt_len = 6, 4
    for n in (1, 2, 3):
        ids = torch.randint(0, vocab, (8, prompt_len + 9), generator=g)
        scores = generate.NoRepeatInAnswer(prompt_len, n)(ids, torch.zeros(8, vocab))
        for row in range(8):
            answer = ids[row, prompt_len:].tolist()
            for t in range(vocab):
                seq = answer + [t]
                grams = [tuple(seq[k:k + n]) for k in range(len(seq) - n + 1)]
                assert (scores[row, t] == -float("inf")) == (grams[-1] in grams[:-1]), (n, row, t)


def test_generate_batches_no_repeat_ngram(char_llm):
    """generate_batches with no_repeat_ngram = 2 (prefix cache, static cache) against stock greedy generate with the
    same processor on whole prompts; no generated answer holds a token pair twice."""
    from transformers import AutoModelForCausalLM, LogitsProcessorList
    tok = llm.load_tokenizer(char_llm)
    eot = tok.convert_tokens_to_ids("<|eot_id|>")
    texts = [prompts.render(tok, m) for m in char_prompts(6)]
    stock = AutoModelForCausalLM.from_pretrained(char_llm, dtype=torch.float32).eval()
    enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    n_prompt = enc["input_ids"].shape[1]
    with torch.no_grad():
        out = stock.generate(**enc, do_sample=False, max_new_tokens=CHAR_MAX_NEW, eos_token_id=[tok.eos_token_id, eot],
                             pad_token_id=tok.pad_token_id,
                             logits_processor=LogitsProcessorList([generate.NoRepeatInAnswer(n_prompt, 2)]))
    for row in out[:, n_prompt:].tolist():
        ids = row[:next((k for k, t in enumerate(row) if t in (tok.eos_token_id, eot)), len(row))]
        pairs = [tuple(ids[k:k + 2]) for k in range(len(ids) - 1)]
        assert len(set(pairs)) == len(pairs)
    expected = [first_profile_line(a).strip() for a in tok.batch_decode(out[:, n_prompt:], skip_special_tokens=True)]
    model, _ = llm.load_llm(char_llm, device="cpu", dtype=torch.float32)
    got = {}
    for idx, answers, _ in generate.generate_batches(model, tok, texts, CHAR_MAX_NEW, 4, progress=False,
                                                     no_repeat_ngram=2):
        got.update(zip(idx, answers))
    assert [got[k] for k in range(len(texts))] == expected
    assert expected[0] != CHAR_PROFILE  # the trained answer repeats a pair (", ")


def test_distinct_terms_bans_closing_a_repeated_term(char_llm):
    """DistinctTerms bans exactly the tokens that would close the current term (a separator, newline or end-of-turn)
    when that term equals an earlier one of the same list, case-insensitively; otherwise nothing."""
    tok = llm.load_tokenizer(char_llm)
    prompt = tok("<|im_start|>assistant\n", add_special_tokens=False)["input_ids"]
    stop = generate.stop_token_ids(tok)
    enders = sorted(set(tok.convert_tokens_to_ids([",", ";", ".", "\n"]) + stop))
    cases = {"User identity: ab, cd, ab": True, "User identity: ab, AB": True, "User identity: ab, cd, a": False,
             "User identity: ab, abc": False, "User identity: ab, cd, ef; User interests: gh, ab": False,
             "User identity: ab, cd, ef; User interests: gh, GH": True, "ab, ab": False}
    for text, banned in cases.items():
        ids = torch.tensor([prompt + tok(text, add_special_tokens=False)["input_ids"]])
        proc = generate.DistinctTerms(tok, len(prompt), stop)
        assert proc.enders == enders
        scores = proc(ids, torch.zeros(1, len(tok)))
        assert torch.isinf(scores[0]).nonzero().flatten().tolist() == (enders if banned else []), text


def test_generate_batches_distinct_terms(char_llm):
    """With distinct_terms, answers that repeat no term are unchanged (the trained profile, the short answer, the
    run-on one), and batched generation still equals itself without the prefix cache."""
    tok = llm.load_tokenizer(char_llm)
    texts = [prompts.render(tok, m) for m in char_prompts(6)]
    model, _ = llm.load_llm(char_llm, device="cpu", dtype=torch.float32)
    runs = []
    for kw in (dict(), dict(distinct_terms=True), dict(distinct_terms=True, prefix_cache=False)):
        got = {}
        for idx, answers, _ in generate.generate_batches(model, tok, texts, CHAR_MAX_NEW, 4, progress=False, **kw):
            got.update(zip(idx, answers))
        runs.append([got[k] for k in range(len(texts))])
    assert runs[0] == runs[1] == runs[2]
    assert runs[0][0] == CHAR_PROFILE


@pytest.mark.parametrize("prefill_rows", [1, 4])
def test_generate_batches_retries_sample_from_the_prompt(char_llm, prefill_rows):
    """Answers `accept` rejects are sampled again from the prompts' cached keys/values: the same answers as stock
    `model.generate` with the same sampler on those prompts alone (whole, left-padded) and the seed of that attempt;
    accepted answers are the greedy ones, attempt 0, whatever the prefill chunking."""
    from transformers import AutoModelForCausalLM, LogitsProcessorList
    tok = llm.load_tokenizer(char_llm)
    eot = tok.convert_tokens_to_ids("<|eot_id|>")
    texts = [prompts.render(tok, m) for m in char_prompts(6)]
    model, _ = llm.load_llm(char_llm, device="cpu", dtype=torch.float32)

    def run(**kw):
        out = {}
        for idx, answers, attempts in generate.generate_batches(model, tok, texts, CHAR_MAX_NEW, 8, progress=False,
                                                           prefill_rows=prefill_rows, **kw):
            out.update(zip(idx, zip(answers, attempts)))
        return [out[k] for k in range(len(texts))]

    greedy = [a for a, _ in run()]
    rejected = {greedy[1], greedy[2]}  # "No idea." and the "la la" run: rows 1, 2, 4, 5 are sampled again
    got = run(accept=lambda a: a not in rejected, retries=2, retry_temperature=1.0, top_p=1.0, seed=7)
    failed = [k for k, a in enumerate(greedy) if a in rejected]
    assert failed == [1, 2, 4, 5]
    assert [got[k] for k in (0, 3)] == [(greedy[0], 0), (greedy[3], 0)]

    stock = AutoModelForCausalLM.from_pretrained(char_llm, dtype=torch.float32).eval()
    order = sorted(range(len(texts)), key=lambda k: len(texts[k]))  # generate_batches' row order: by prompt length
    pending, expected = [k for k in order if k in failed], {}
    for attempt in (1, 2):
        if not pending:
            break
        enc = tok([texts[k] for k in pending], return_tensors="pt", padding=True, add_special_tokens=False)
        torch.manual_seed(7 + attempt)  # batch 0
        with torch.no_grad():
            out = stock.generate(**enc, do_sample=False, max_new_tokens=CHAR_MAX_NEW, pad_token_id=tok.pad_token_id,
                                 eos_token_id=[tok.eos_token_id, eot],
                                 logits_processor=LogitsProcessorList([generate.TopKTopPSampler(1.0, 1.0)]))
        answers = tok.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
        for k, a in zip(pending, answers):
            expected[k] = (first_profile_line(a).strip(), attempt)
        pending = [k for k in pending if expected[k][0] in rejected]
    assert [got[k] for k in failed] == [expected[k] for k in failed]
    assert any(got[k][0] not in rejected for k in failed)  # some retry was accepted


@pytest.mark.parametrize("temperature,top_p", [(1.0, 1.0), (0.7, 0.95), (1.3, 0.5), (0.7, 0.0)])
def test_top_k_top_p_sampler_matches_transformers(temperature, top_p):
    """TopKTopPSampler's distribution is transformers' sampling distribution (temperature, TopK 50, TopP warpers, then
    softmax over the vocabulary), and its draws follow it."""
    from transformers.generation.logits_process import (
        LogitsProcessorList,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(6, 300, generator=g) * torch.tensor([0.5, 1, 2, 4, 8, 16]).unsqueeze(1)
    warpers = LogitsProcessorList([TemperatureLogitsWarper(temperature), TopKLogitsWarper(generate.SAMPLE_TOP_K)]
                                  + ([TopPLogitsWarper(top_p)] if top_p < 1.0 else []))
    expected = warpers(None, scores.clone()).softmax(-1)
    sampler = generate.TopKTopPSampler(temperature, top_p)
    probs, tokens = sampler.distribution(scores)
    got = torch.zeros_like(expected).scatter_(1, tokens, probs)
    torch.testing.assert_close(got, expected)
    torch.manual_seed(0)
    draws = torch.stack([sampler(None, scores).argmax(-1) for _ in range(2000)])  # one token left per row
    freq = torch.zeros_like(expected).scatter_add_(1, draws.T, torch.ones(6, 2000)) / 2000
    assert (freq[expected == 0] == 0).all()
    assert (freq - expected).abs().max() < 0.05


def _two_adapters(tiny_llm, use_dora=False):
    """The tiny model with two active LoRA adapters of different ranks and targets, B not zero (a trained delta)."""
    from peft import LoraConfig, get_peft_model
    model, tok = llm.load_llm(tiny_llm, device="cpu")
    torch.manual_seed(0)
    cfg = dict(init_lora_weights=False, lora_dropout=0.0, use_dora=use_dora)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"], **cfg))
    model.add_adapter("ppo", LoraConfig(r=2, lora_alpha=6, target_modules=["q_proj", "o_proj"], **cfg))
    model.base_model.set_adapter(["default", "ppo"])
    return model.eval(), tok


def test_fold_lora_computes_the_live_adapters(tiny_llm):
    """fold_lora (06's profile models) computes what peft computes with both adapters active, on a padded batch."""
    model, tok = _two_adapters(tiny_llm)
    batch = tok(["user identity : student ; user interests : drama", "movie genres"], padding=True,
                return_tensors="pt")
    with torch.no_grad():
        live = model(**batch).logits
        base = model.get_base_model()
        with model.disable_adapter():
            untuned = model(**batch).logits
        folded_model = llm.fold_lora(model)
        assert folded_model is base and isinstance(folded_model.model.layers[0].self_attn.q_proj, llm.FoldedLoRA)
        assert not isinstance(folded_model.model.layers[0].mlp.down_proj, llm.FoldedLoRA)  # no adapter there
        folded = folded_model(**batch).logits
    assert (live - untuned).abs().max() > 1e-2   # the adapters do change the logits
    torch.testing.assert_close(folded, live, atol=1e-5, rtol=1e-5)


def test_fold_lora_takes_the_base_dtype(tiny_llm):
    """Adapters kept in float32 over a bf16 model (as peft may load them) fold into bf16 layers that run."""
    model, tok = _two_adapters(tiny_llm)
    model.to(torch.bfloat16)
    for name, p in model.named_parameters():
        if "lora_" in name:
            p.data = p.data.float()
    batch = tok(["user identity : student"], return_tensors="pt")
    with torch.no_grad():
        live = model(**batch).logits.float()
        folded = llm.fold_lora(model)(**batch).logits
    assert folded.dtype == torch.bfloat16
    torch.testing.assert_close(folded.float(), live, atol=0.1, rtol=0.05)


def test_fold_lora_refuses_what_it_does_not_compute(tiny_llm):
    model, _ = _two_adapters(tiny_llm, use_dora=True)
    with pytest.raises(ValueError, match="q_proj is a LoRA variant"):
        llm.fold_lora(model)


def test_batches_within_a_kv_budget():
    lengths = [3, 4, 4, 6, 9, 20]
    per_token, after = 10, 2
    assert [list(b) for b in generate.batches_within(lengths, 4, after, per_token, None)] == [[0, 1, 2, 3], [4, 5]]
    budget = 200  # rows x (widest + 2) x 10 bytes
    got = [list(b) for b in generate.batches_within(lengths, 4, after, per_token, budget)]
    assert got == [[0, 1, 2], [3], [4], [5]]  # [5] alone is over the budget: a batch of one
    assert sorted(k for b in got for k in b) == list(range(len(lengths)))
    for b in got[:-1]:
        assert len(b) * (lengths[b[-1]] + after) * per_token <= budget


def test_generate_batches_keep_to_the_kv_budget(tiny_llm):
    model, tok = llm.load_llm(tiny_llm, device="cpu", dtype=torch.float32)
    items = [f"{g} movie ( {k} )" for k, g in enumerate(["comedy", "drama", "horror", "romance", "action"] * 3)]
    texts = [prompts.render(tok, prompts.inference_messages(list(range(k % 7 + 1)), [list(range(k, k + 3))], items))
             for k in range(7)]
    per_token = generate.kv_bytes_per_token(model)
    assert per_token == 2 * 2 * 2 * 16 * 4  # K and V x 2 layers x 2 heads x head dim 16 x float32
    longest = max(len(x) for x in tok(texts, add_special_tokens=False)["input_ids"])
    budget = 2 * (longest + 6) * per_token  # two prompts per batch at most
    sizes, out = [], {}
    for idx, ans, _ in generate.generate_batches(model, tok, texts, max_new_tokens=6, batch_size=7, progress=False,
                                                 kv_budget_bytes=budget):
        sizes.append(len(idx))
        out.update(zip(idx, ans))
    assert sorted(out) == list(range(7)) and max(sizes) <= 2 and len(sizes) >= 4
