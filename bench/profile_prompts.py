"""What bench_profile_phase.py and bench_prefill.py share: a run's 06 profile model, in bf16 where the CPU has it,
and the run's user prompts as 06 asks them. It imports common, llm and 06_profile from sys.path as it stands when
called, so bench_profile_phase.py --code gets those of the checkout it times."""
import importlib


def model_and_prompts(run, source, n):
    """(model, tokenizer, the rendered prompts of users 0..n-1)."""
    import common
    import llm
    model, tok = importlib.import_module("06_profile").load_profile_model(run, source)
    model = model.to(llm.pick_dtype("auto", "cpu")).eval()
    split, nbrs = common.load_split(run), common.load_neighbors(run)["user_nbrs"]
    train = common.user_items(split["train_u"], split["train_i"], split["n_users"])
    item_text, sizes = common.load_items(run), llm.prompt_settings(run)["inference"]
    return model, tok, [llm.render(tok, llm.user_prompt(u, train, nbrs, item_text, **sizes)) for u in range(n)]
