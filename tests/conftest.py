"""Shared fixtures: a synthetic run directory as 01 would write it, and a tiny random chat LLM."""
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import common
import llm

GENRES = ["comedy", "drama", "horror", "romance", "action", "animation"]


def write_synthetic_run(run, n_users=40, n_items=60, per_user=12, seed=0, d_text=16):
    """A run directory with everything 01 writes: two taste groups of users, items with genre text,
    a cold-items split, text embeddings, neighbours, and the manifest entry of 01."""
    rng = np.random.default_rng(seed)
    run = Path(run)
    item_genre = np.arange(n_items) % len(GENRES)
    texts = [f"Movie {i} ({1990 + i % 10}). Genres: {GENRES[g].title()}." for i, g in enumerate(item_genre)]
    cold = np.arange(n_items - n_items // 5, n_items)
    rows = []
    for u in range(n_users):
        liked = [g for g in range(len(GENRES)) if (g % 2) == (u % 2)]
        pool = np.flatnonzero(np.isin(item_genre, liked))
        for t, i in enumerate(rng.choice(pool, per_user, replace=False)):
            rows.append((u, int(i), t))
    rows = np.array(rows)
    is_cold = np.isin(rows[:, 1], cold)
    last = rows[:, 2] >= per_user - 2
    test = is_cold | last
    valid = (rows[:, 2] == per_user - 3) & ~test
    train = ~test & ~valid
    split = {"train_u": rows[train, 0], "train_i": rows[train, 1], "valid_u": rows[valid, 0],
             "valid_i": rows[valid, 1], "test_u": rows[test, 0], "test_i": rows[test, 1],
             "cold_items": np.setdiff1d(np.unique(rows[test, 1]), rows[train | valid, 1]),
             "n_users": np.int64(n_users), "n_items": np.int64(n_items)}
    common.save_npz(run / "data" / "split.npz", **split)
    common.write_jsonl(run / "data" / "items.jsonl",
                       [{"item": i, "raw_id": str(i + 1), "text": t} for i, t in enumerate(texts)])
    common.write_jsonl(run / "data" / "users.jsonl", [{"user": u, "raw_id": f"u{u}"} for u in range(n_users)])
    emb = np.eye(len(GENRES), d_text)[item_genre] + 0.05 * rng.standard_normal((n_items, d_text))
    emb = (emb / np.linalg.norm(emb, axis=1, keepdims=True)).astype(np.float32)
    common.save_npy(run / "item_text_emb.npy", emb)
    same = np.array([[v for v in range(n_users) if v != u and v % 2 == u % 2][:5] for u in range(n_users)])
    warm = np.setdiff1d(np.arange(n_items), split["cold_items"])
    sims = emb @ emb[warm].T
    item_nbrs = warm[np.argsort(-sims, axis=1)[:, 1:6]]
    common.save_npz(run / "neighbors.npz", user_nbrs=same, user_sims=np.ones(same.shape, np.float32),
                    item_nbrs=item_nbrs, item_sims=np.ones(item_nbrs.shape, np.float32))
    common.save_npy(run / "lightgcn_users.npy", rng.standard_normal((n_users, 8)).astype(np.float32))
    outputs = ["data/split.npz", "data/items.jsonl", "data/users.jsonl", "item_text_emb.npy",
               "neighbors.npz", "lightgcn_users.npy"]

    class Args:
        seed = 0
    common.record_stage(run, "01_neighbors", Args(), [], outputs, time.time())
    return run


@pytest.fixture
def synthetic_run(tmp_path):
    return write_synthetic_run(tmp_path / "run")


def build_tiny_llm(path, seed=0, special=None, template=None):
    """A random 2-layer Llama with a word-level tokenizer that knows the profile vocabulary: ChatML by default, or
    `special` (dict of bos, eos, pad and the `extra` tokens its template writes) with the chat template `template`."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
    words = ("user identity interests : ; , . yes no movie genres similar items target profile write "
             "the a of and to in for is as with three short only form exactly this oldest newest older not "
             "shown will interact item answer or you are recommendation assistant that writes profiles "
             "collaborative filtering assumes users interaction histories share so help describe has "
             "student fan viewer adult teen parent young old critic family system assistant").split()
    words += GENRES + [str(k) for k in range(200)] + ["(", ")", "!", "?", "\n", "/"]
    special = special or dict(bos="<|im_start|>", eos="<|im_end|>", pad="<pad>", extra=[])
    vocab = {"<unk>": 0}
    for t in [special["bos"], special["eos"], special["pad"], *special["extra"]] + words:
        vocab.setdefault(t, len(vocab))
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.normalizer = normalizers.Lowercase()
    tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", pad_token=special["pad"],
                                  eos_token=special["eos"], bos_token=special["bos"],
                                  additional_special_tokens=special["extra"])
    tok.chat_template = template or llm.CHATML_TEMPLATE
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=2048,
                      pad_token_id=vocab[special["pad"]], eos_token_id=vocab[special["eos"]],
                      bos_token_id=vocab[special["bos"]], tie_word_embeddings=True)
    LlamaForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def tiny_llm(tmp_path_factory):
    return build_tiny_llm(tmp_path_factory.mktemp("tiny_llm"))


def assert_probes_close(a, b, tol=1e-6):
    """Two llm.profile_probe results agree: the same scored users, every number (per-user recalls too) within tol."""
    assert a["users"] == b["users"]
    lists = [k for k, v in a.items() if isinstance(v, list) and k != "users"]
    for k in lists:
        assert a[k] == pytest.approx(b[k], abs=tol), k
    drop = lambda p: {k: v for k, v in p.items() if k not in lists and k != "users"}  # noqa: E731
    assert drop(a) == pytest.approx(drop(b), abs=tol)
