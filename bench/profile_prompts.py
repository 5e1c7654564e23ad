"""What bench_profile_phase.py and bench_prefill.py share: a run's 06 profile model, in bf16 where the CPU has it,
and the run's user prompts as 06 asks them."""
import common
import llm
import prompts


def model_and_prompts(run, source, n):
    """(model, tokenizer, the rendered prompts of users 0..n-1)."""
    model, tok = llm.load_profile_model(run, source)
    model = model.to(llm.pick_dtype("auto", "cpu")).eval()
    split, nbrs = common.load_split(run), common.load_neighbors(run)["user_nbrs"]
    train = common.user_items(split["train_u"], split["train_i"], split["n_users"])
    item_text, sizes = common.load_items(run), prompts.prompt_settings(run)["inference"]
    return model, tok, [prompts.render(tok, prompts.user_prompt(u, train, nbrs, item_text, **sizes)) for u in range(n)]
