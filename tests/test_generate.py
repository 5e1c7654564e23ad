"""common's generation speed-ups against the plain paths they replace: the CPU decode attention against sdpa, and
batched generation from a shared-prefix cache against generation from whole prompts. Fast: tiny random models."""
import pytest
import torch

import common

torch.set_num_threads(1)


def gqa_llama(attn):
    """A random 2-layer Llama with grouped-query attention (4 query heads over 2 key/value heads)."""
    from transformers import LlamaConfig, LlamaForCausalLM
    common._register_cpu_attention()
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
    for attn in ("sdpa", common.CPU_ATTENTION):
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
    torch.testing.assert_close(logits[common.CPU_ATTENTION], logits["sdpa"], rtol=1e-5, atol=1e-5)


def test_shared_prefix():
    assert common.shared_prefix([[1, 2, 3, 4], [1, 2, 5], [1, 2, 3]]) == [1, 2]
    assert common.shared_prefix([[1, 2, 3], [1, 2, 3]]) == [1, 2]  # every prompt keeps a token of its own
    assert common.shared_prefix([[7, 1], [8, 1]]) == []
    assert common.shared_prefix([[5]]) == []


@pytest.mark.parametrize("batch_size", [1, 3])
def test_prefix_cache_generation_equals_whole_prompts(tiny_llm, batch_size):
    model, tok = common.load_llm(tiny_llm, device="cpu", dtype=torch.float32)
    items = [f"{g} movie ( {k} )" for k, g in enumerate(["comedy", "drama", "horror", "romance", "action"] * 3)]
    texts = [common.render(tok, common.inference_messages(list(range(k % 7 + 1)), [list(range(k, k + 3))], items))
             for k in range(7)]
    ids = tok(texts, add_special_tokens=False)["input_ids"]
    assert len(common.shared_prefix(ids)) > 20  # the system prompt and more are shared

    def answers(prefix_cache):  # sampled (a random model's greedy answer is one token repeated), same seed
        torch.manual_seed(0)
        out = {}
        for idx, ans in common.generate_batches(model, tok, texts, max_new_tokens=12, batch_size=batch_size,
                                                temperature=1.0, top_p=1.0, progress=False,
                                                prefix_cache=prefix_cache):
            out.update(zip(idx, ans))
        return [out[k] for k in range(len(texts))]

    with_prefix, whole = answers(True), answers(False)
    assert with_prefix == whole
    assert len(set(whole)) == len(whole)


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
    done = common.ProfileLineDone(CharTokenizer(), len(prompt))(ids, None)
    assert done.tolist() == [True, False, False, False]
