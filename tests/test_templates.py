"""Chat templates of other model families (Llama-2-chat, Llama-3-Instruct): a tokenizer whose own template has no
generation markers gets its family's (llm.CHAT_TEMPLATES), which renders every conversation of the pipeline as the
official template does and marks exactly the assistant replies; the reward model is read at the same token in 04's
training, 04's held-out scoring and 05 when the pad token is the end-of-turn token; and the LLM stages 03 -> 04 ->
05 -> 06 run on a tiny random Llama with each template."""
import json

import pytest
import torch

import common
import llm
import prompts
from conftest import build_tiny_llm

torch.set_num_threads(1)
SFT = common.load_stage("03_sft")
RW = common.load_stage("04_reward")
PPO = common.load_stage("05_ppo")
PROF = common.load_stage("06_profile")

# The families' own templates as their tokenizers ship them (no generation markers).
OFFICIAL = {
    "llama2": (
        "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
        "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
        "{% set system_message = false %}{% endif %}{% for message in loop_messages %}"
        "{% if loop.index0 == 0 and system_message != false %}"
        "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
        "{% else %}{% set content = message['content'] %}{% endif %}"
        "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
        "{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}"
        "{% endfor %}"),
    "llama3": (
        "{% set loop_messages = messages %}{% for message in loop_messages %}"
        "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] "
        "| trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
        "{{ content }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"),
}
# bos, eos, pad and the other tokens the template writes; pad is the end-of-turn token, as these models are run
SPECIAL = {"llama2": dict(bos="<s>", eos="</s>", pad="</s>", extra=["[INST]", "[/INST]", "<<SYS>>", "<</SYS>>"]),
           "llama3": dict(bos="<|begin_of_text|>", eos="<|eot_id|>", pad="<|eot_id|>",
                          extra=["<|start_header_id|>", "<|end_header_id|>"])}
FAMILIES = sorted(OFFICIAL)


@pytest.fixture(scope="module", params=FAMILIES)
def family_llm(request, tmp_path_factory):
    family = request.param
    return family, build_tiny_llm(tmp_path_factory.mktemp(f"tiny_{family}"), special=SPECIAL[family],
                                  template=OFFICIAL[family])


def dialogue():
    """03's two-turn dialogue, whose every message the templates must render as the official one does."""
    return prompts.two_turn_messages([0, 1, 2], [([3, 4], "User identity: a, b, c; User interests: d, e, f")],
                                     [f"Movie {i} (1995). Genres: Comedy." for i in range(8)], 5, 1,
                                     "User identity: g, h, i; User interests: j, k, l", 5, 2, 48)


def test_each_family_gets_its_template_and_renders_as_the_official_one(family_llm):
    family, path = family_llm
    tok = llm.load_tokenizer(path)
    assert tok.chat_template == llm.CHAT_TEMPLATES[family]
    official = llm.load_tokenizer(path, family)
    official.chat_template = OFFICIAL[family]
    for messages in (dialogue(), dialogue()[:2]):
        for gen in (False, True):
            ours = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
            assert ours == official.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
    # the inference prompt's open answer is continued where the official template would put it
    query = prompts.inference_messages([0, 1], [[2]], [f"Movie {i}" for i in range(3)])
    text = prompts.render(tok, query)
    assert text.endswith(prompts.ANSWER_PREFIX) and text.count(prompts.ANSWER_PREFIX) == 1


def test_the_assistant_mask_is_the_replies_with_their_end(family_llm):
    family, path = family_llm
    tok = llm.load_tokenizer(path)
    messages = dialogue()
    ids, labels = SFT.tokenize_example(tok, messages, last_turn_only=False)
    runs, cur = [], []
    for t, y in zip(ids, labels):
        if y != -100:
            cur.append(t)
        elif cur:
            runs, cur = runs + [cur], []
    runs += [cur] if cur else []
    replies = [m["content"] for m in messages if m["role"] == "assistant"]
    end = tok.convert_tokens_to_ids(SPECIAL[family]["eos"])
    assert runs == [tok(r, add_special_tokens=False)["input_ids"] + [end] for r in replies]


def test_a_named_or_file_template_and_refusals(tmp_path, family_llm):
    _, path = family_llm
    assert llm.load_tokenizer(path, "chatml").chat_template == llm.CHATML_TEMPLATE
    custom = tmp_path / "t.jinja"
    custom.write_text(llm.LLAMA3_TEMPLATE)
    assert llm.load_tokenizer(path, str(custom)).chat_template == llm.LLAMA3_TEMPLATE
    with pytest.raises(common.UsageError, match="neither one of"):
        llm.load_tokenizer(path, "mistral")
    custom.write_text(OFFICIAL["llama3"])
    with pytest.raises(common.UsageError, match="no {% generation %} markers"):
        llm.load_tokenizer(path, str(custom))


def test_an_unknown_family_is_refused_with_the_flag(tmp_path):
    path = build_tiny_llm(tmp_path / "m", special=dict(bos="<s>", eos="</s>", pad="</s>", extra=[]),
                          template="{% for m in messages %}{{ m['content'] }}{% endfor %}")
    with pytest.raises(common.UsageError, match="--chat-template"):
        llm.load_tokenizer(path)


def test_reward_is_read_at_one_token_where_pad_ends_the_turn(family_llm):
    """The sequences end in the end-of-turn token, which is also pad: 04's training (the model's own pooling),
    05 (score_ids) and 04's held-out scoring (score_groups) score the same token, the one before it."""
    family, path = family_llm
    from transformers import AutoModelForSequenceClassification
    tok = llm.load_tokenizer(path)
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1).eval()
    model.config.pad_token_id = tok.pad_token_id
    query = prompts.inference_messages([0, 1], [[2]], [f"Movie {i} (1990). Genres: Drama." for i in range(3)])
    answers = ["User identity: fan, critic, student; User interests: drama, war, comedy",
               "User identity: teen, parent, adult; User interests: horror, action, romance", ""]
    seqs = [prompts.render_ids(tok, query, a) for a in answers]
    assert all(s[-1] == tok.pad_token_id for s in seqs)  # each ends in the end-of-turn token, which is pad
    with torch.no_grad():
        pooled = torch.cat([model(input_ids=torch.tensor([s])).logits[:, 0] for s in seqs])
        before_end = torch.cat([model(input_ids=torch.tensor([s[:-1]])).logits[:, 0] for s in seqs])
    assert torch.allclose(pooled, before_end)
    assert torch.allclose(llm.score_ids(model, tok, seqs), pooled, atol=1e-5)
    assert torch.allclose(llm.score_groups(model, tok, [seqs], progress=False)[0], pooled, atol=1e-5)


def test_llm_stages_run_with_each_template(synthetic_run, family_llm):
    """03 gpt_kd -> 03 mask -> 04 -> 05 -> 06 on the tiny model of each family; the template travels with the
    adapters, and the profiles are asked with it."""
    family, path = family_llm
    run = synthetic_run
    common.load_stage("02_distill").main(["--run", str(run), "--no-probe"])
    base = ["--run", str(run), "--model", path, "--device", "cpu"]
    small = ["--max-steps", "2", "--epochs", "1"]
    kd = SFT.main(base + ["--variant", "gpt_kd", "--limit", "3"] + small)
    mask = SFT.main(base + ["--variant", "mask", "--limit", "3"] + small)
    for adapter in (kd, mask):
        assert json.loads((adapter / "tokenizer_config.json").read_text()).get("chat_template") \
            == llm.CHAT_TEMPLATES[family] or (adapter / "chat_template.jinja").read_text() == llm.CHAT_TEMPLATES[family]
    reward = RW.main(base + ["--limit", "4"] + small)
    assert json.loads((reward / "eval.json").read_text())["heldout"]["n"] > 0
    PPO.main(base + ["--limit", "2", "--max-new-tokens", "8"])
    PROF.main(base + ["--source", "ppo", "--limit", "3", "--max-new-tokens", "8", "--retries", "0"])
    rows = common.read_jsonl(run / "profiles" / "ppo" / "users.jsonl")
    assert len(rows) == 3
    tok = llm.load_profile_model(run, "ppo", path, device="cpu")[1]
    assert tok.chat_template == llm.CHAT_TEMPLATES[family]
