"""05_ppo — PPO on the instruction-tuned LLM against the reward model (paper eqs. 7-8, sec. 2.4), written by hand.

Policy = the base LLM with the SFT adapter (--sft, default sft_mask; frozen) and a new LoRA stacked on it, both
unmerged as 06 loads them; reference = the same network with the new LoRA off, i.e. the SFT model; value =
Linear(hidden, 1) on the policy's last hidden state, starting at zero (--value-backprop: its loss trains the LoRA
too). Prompts: the inference prompt (prompts.inference_messages) of the "ppo" user set, --batch-size per step, one
pass over them by default (--steps 0). A rollout ends where 06's generation ends it: at end-of-turn or at the token
that completes the first profile line (--no-profile-stop: end-of-turn only). Its reward: the reward model's score of
the profile 06 would keep (--incomplete-score when there is none; minus --missing-eos-penalty when cut at --max-new-
tokens), minus beta times the per-token KL to the reference (beta fixed, or adaptive with --target-kl).
Resumable: every --ckpt-every steps ppo.partial/checkpoint.pt is written (tensors and numbers only, read back with
weights_only=True); a re-run with the same inputs and arguments continues from it (--restart starts over).

Reads  data/split.npz, data/items.jsonl, neighbors.npz, user_sets.json, prompt.json, <sft>/ (03), reward/ (04)
Writes ppo/: adapter_config.json + adapter_model.safetensors (the PPO LoRA, on top of the SFT adapter),
       base.json {"sft": "<sft>"}, value_head.pt, tokenizer files, ppo_log.jsonl (per step: score, rm_score,
       complete_frac, kl, response length, clip fraction, value loss, explained_variance, beta, ...), ppo_info.json
       (config, last step, "trend": first- vs last-third means and Spearman's rho of score against step)
Run    python 05_ppo.py --run runs/ml100k [--sft sft_mask] [--steps 10]
       (the defaults are the official code's settings; on a CPU pass the flags of scripts/presets.sh's cpu preset)
"""
import contextlib
import json
import re
import shutil
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch

import common
import generate
import llm
import prompts

log = common.log

# The sequence score of a rollout that never completes a profile line 06 can parse: 06 keeps nothing of such an
# answer, so it must score below what the reward model gives real profiles (its scores sit within a few units of
# 0: RewardConfig.center_rewards_coefficient keeps them centred), and the reward model, trained on profiles, is
# not asked to judge text it never saw.
INCOMPLETE_SCORE = -3.0
PPO_ADAPTER = "ppo"  # the name of the trained LoRA beside the SFT adapter ("default"), as 06 loads it


# ----------------------------------------------------------------------------- defaults
# The official RecLM code's PPO (llm/lora/rlhf/rl_training.py: trl's PPOTrainer, one step per prompt of its RL set),
# here written by hand. scripts/presets.sh `cpu` overrides the budget for a 2-core CPU (3 steps of 4 prompts).
@dataclass
class PPOConfig:
    steps: int = 0                # rollout batches (PPO iterations); 0 = one pass over the ppo users' prompts
    batch_size: int = 1           # prompts per rollout: batch_size=1
    minibatch_size: int = 1       # mini_batch_size=1
    ppo_epochs: int = 1           # passes over each rollout batch (trl's default, which the official code kept: 4)
    lr: float = 1e-5              # learning_rate=1e-5
    temperature: float = 0.9      # sampling as the official generation_kwargs: temperature=0.9,
    top_p: float = 0.9            # top_p=0.9 (top_k off),
    max_new_tokens: int = 100     # max_new_tokens=100 (a rollout also ends at its first profile line)
    beta: float = 0.05            # KL coefficient, initial value when adaptive (trl's default: 0.2, adaptive)
    target_kl: float = 0.0        # > 0: adaptive beta aiming at this KL per sequence (0: fixed beta)
    kl_horizon: int = 10000       # adaptive beta's horizon (trl's)
    gamma: float = 1.0            # no discount within a response (trl's)
    lam: float = 0.95             # GAE lambda (trl's)
    cliprange: float = 0.2        # policy ratio clip (trl's)
    cliprange_value: float = 0.2  # value clip (trl's)
    vf_coef: float = 0.1          # value loss weight (trl's)
    max_grad_norm: float = 1.0    # gradient clipping
    whiten_advantages: bool = True  # as trl
    value_backprop: bool = False  # let the value loss flow into the LoRA (shared backbone)
    missing_eos_penalty: float = 0.0  # subtracted from the score of a rollout cut at max_new_tokens
    stop_at_profile: bool = True  # end a rollout at its first complete profile line (06's rule) and score it there
    incomplete_score: float = INCOMPLETE_SCORE  # the score of a rollout without a parseable profile line
    lora_r: int = 4               # LoraConfig(r=4, lora_alpha=8, lora_dropout=0.05)
    lora_alpha: int = 8
    lora_dropout: float = 0.05    # recorded, but inactive: the policy runs in eval mode (rollout and update agree)
    lora_targets: str = "q_proj,v_proj"  # the official code names none: peft's default for Llama
    reward_batch: int = 8         # responses per reward-model forward pass
    seed: int = 0
    ckpt_every: int = 5           # steps between resumable checkpoints


def total_steps(cfg, n_prompts):
    """cfg.steps, or with 0 one pass over the prompts: ceil(n_prompts / batch_size) steps."""
    return cfg.steps if cfg.steps > 0 else -(-n_prompts // cfg.batch_size)


# Rollouts answer the inference prompt exactly as 02's reward queries and 06's user prompts show it: its sizes come
# from 02's prompt.json (prompts.prompt_settings), never from a flag here.


# ----------------------------------------------------------------------------- PPO core (pure functions)
# Small pure functions (masked_whiten, kl_penalised_rewards, gae, ppo_losses, KLController) and train(), which takes
# any reward_fn(queries, texts, response_ids) -> scores, so that tests can pass a programmatic reward.

def masked_mean(x, mask, dim=None):
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def masked_var(x, mask):
    mean = masked_mean(x, mask)
    n = mask.sum()
    var = masked_mean((x - mean) ** 2, mask)
    return var * n / (n - 1) if n > 1 else var


def masked_whiten(x, mask, shift_mean=True):
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    out = (x - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        out = out + mean
    return out * mask


def kl_penalised_rewards(scores, logprobs, ref_logprobs, mask, beta):
    """Per-token rewards -beta*kl_t with the sequence score added at the last response token (eq. 8).
    scores [B], logprobs/ref_logprobs/mask [B, T] (mask: 1 on response tokens, contiguous from t=0).
    Returns (rewards [B, T], kl [B, T])."""
    kl = (logprobs - ref_logprobs) * mask
    rewards = -beta * kl
    last = (mask.sum(1).long() - 1).clamp(min=0)
    rewards = rewards.clone()
    rewards[torch.arange(len(scores)), last] += scores.to(rewards.dtype)
    return rewards * mask, kl


def gae(rewards, values, mask, gamma, lam):
    """Generalised advantage estimation over masked sequences; the value after the last response token is 0.
    Returns (advantages, returns), both zero off the mask."""
    B, T = rewards.shape
    adv = torch.zeros_like(rewards)
    last = torch.zeros(B, dtype=rewards.dtype, device=rewards.device)
    for t in reversed(range(T)):
        cont = mask[:, t + 1] if t + 1 < T else torch.zeros_like(last)
        next_v = values[:, t + 1] * cont if t + 1 < T else torch.zeros_like(last)
        delta = rewards[:, t] + gamma * next_v - values[:, t]
        last = delta + gamma * lam * cont * last
        adv[:, t] = last
    adv = adv * mask
    return adv, (adv + values) * mask


def ppo_losses(logprobs, old_logprobs, values, old_values, advantages, returns, mask, cliprange, cliprange_value):
    """Clipped surrogate policy loss and clipped value loss, masked means over response tokens.
    Returns (pg_loss, vf_loss, stats dict of floats)."""
    log_ratio = (logprobs - old_logprobs) * mask
    ratio = torch.exp(log_ratio)
    pg1 = -advantages * ratio
    pg2 = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    pg_loss = masked_mean(torch.max(pg1, pg2), mask)
    v_clipped = old_values + torch.clamp(values - old_values, -cliprange_value, cliprange_value)
    vf1, vf2 = (values - returns) ** 2, (v_clipped - returns) ** 2
    vf_loss = 0.5 * masked_mean(torch.max(vf1, vf2), mask)
    with torch.no_grad():
        stats = {"clipfrac": masked_mean((pg2 > pg1).float(), mask).item(),
                 "vf_clipfrac": masked_mean((vf2 > vf1).float(), mask).item(),
                 "approx_kl": (0.5 * masked_mean(log_ratio ** 2, mask)).item(),
                 "ratio": masked_mean(ratio, mask).item()}
    return pg_loss, vf_loss, stats


class KLController:
    """Fixed beta, or Ziegler et al. (2019)'s adaptive one when target > 0."""

    def __init__(self, beta, target=0.0, horizon=10000):
        self.beta, self.target, self.horizon = float(beta), float(target), horizon

    def update(self, kl, n_steps):
        if self.target > 0:
            err = float(np.clip(kl / self.target - 1.0, -0.2, 0.2))
            self.beta *= 1.0 + err * n_steps / self.horizon
        return self.beta


# ----------------------------------------------------------------------------- model pieces

def backbone(policy):
    """The causal LM under a peft wrapper (its LoRA layers stay live; disable_adapter() turns them off)."""
    return policy.get_base_model() if hasattr(policy, "get_base_model") else policy


@contextlib.contextmanager
def reference(policy):
    """The reference network (eq. 8's KL is taken against it): the policy with its trainable LoRA off. The frozen
    adapters under it (the SFT adapter, llm.stack_lora) stay on; a lone LoRA is simply disabled."""
    frozen = getattr(policy, "frozen_adapters", None)
    if not frozen:
        with policy.disable_adapter():
            yield
        return
    active = list(policy.base_model.active_adapters)
    llm.activate_adapters(policy, frozen)
    try:
        yield
    finally:
        llm.activate_adapters(policy, frozen, [a for a in active if a not in frozen])


def forward_response(policy, value_head, input_ids, attention_mask, n_prompt, temperature, with_values=True,
                     value_backprop=False):
    """Log-probabilities [B, R] of the response tokens input_ids[:, n_prompt:] (logits / temperature, as sampled),
    and value estimates [B, R] from the hidden state before each response token. Logits are computed only on the
    response positions (a full [B, L, vocab] tensor would not fit for long prompts)."""
    lm = backbone(policy)
    pos = (attention_mask.cumsum(1) - 1).clamp(min=0)
    hidden = lm.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=pos).last_hidden_state
    h = hidden[:, n_prompt - 1:-1]
    logits = lm.lm_head(h).float() / temperature
    logp = torch.log_softmax(logits, -1).gather(-1, input_ids[:, n_prompt:].unsqueeze(-1)).squeeze(-1)
    values = None
    if with_values:
        values = value_head((h if value_backprop else h.detach()).float()).squeeze(-1)
    return logp, values


def new_value_head(hidden):
    """Linear(hidden, 1) that outputs zero: the critic starts at the scores' scale (a few units around 0) instead of
    a random offset, so the first advantages are the returns themselves, not the head's error (a random head started
    at values ~+1.2 against scores ~-0.6, and its few minibatch steps per rollout never caught up; each step logs
    the critic's explained variance of the returns)."""
    head = torch.nn.Linear(hidden, 1)
    torch.nn.init.zeros_(head.weight)
    torch.nn.init.zeros_(head.bias)
    return head


def explained_variance(values, returns, mask):
    """1 - Var(returns - values) / Var(returns) over response tokens: 1 = the critic predicts the returns, 0 = no
    better than their mean, < 0 = worse."""
    var = masked_var(returns, mask)
    return float(1.0 - masked_var(returns - values, mask) / var) if var > 0 else float("nan")


def response_ends(tok, resp, stop_ids, at_profile=True):
    """Per row of generated ids [B, T]: (tokens kept, how it ended: "eot" | "profile" | None). With at_profile,
    06's rule (generate.answer_end: the first stop token or the token completing the first profile line, whichever
    comes first); else the first stop token only. None: cut at max_new_tokens."""
    out, stops = [], set(stop_ids)
    for row in resp.tolist():
        if at_profile:
            out.append(generate.answer_end(tok, row, stop_ids))
        else:
            eot = next((k for k, t in enumerate(row) if t in stops), None)
            out.append((len(row), None) if eot is None else (eot + 1, "eot"))
    return out


def response_mask(resp, lengths, pad_id):
    """1 on the first lengths[b] tokens of row b; the rest is set to pad. Returns (resp, mask)."""
    keep = torch.arange(resp.shape[1], device=resp.device)[None] < torch.as_tensor(lengths, device=resp.device)[:, None]
    return resp.masked_fill(~keep, pad_id), keep.long()


@torch.no_grad()
def rollout(policy, value_head, tok, queries, cfg):
    """Generate responses for chat-message queries; logprobs under policy and reference, values."""
    from transformers import StoppingCriteriaList
    device = next(policy.parameters()).device
    texts = [prompts.render(tok, p) for p in queries]
    tok.padding_side = "left"
    enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
    n_prompt = enc["input_ids"].shape[1]
    stop_ids = generate.stop_token_ids(tok, policy)  # as 06: any end-of-turn token ends a response
    stopping = [generate.ProfileLineDone(tok, n_prompt)] if cfg.stop_at_profile else []
    gen = policy.generate(**enc, do_sample=True, temperature=cfg.temperature, top_p=cfg.top_p, top_k=0,
                          max_new_tokens=cfg.max_new_tokens, pad_token_id=tok.pad_token_id,
                          eos_token_id=stop_ids, stopping_criteria=StoppingCriteriaList(stopping))
    ends = response_ends(tok, gen[:, n_prompt:], stop_ids, cfg.stop_at_profile)
    resp, mask = response_mask(gen[:, n_prompt:], [n for n, _ in ends], tok.pad_token_id)
    input_ids = torch.cat([enc["input_ids"], resp], 1)
    att = torch.cat([enc["attention_mask"], mask], 1)
    logp, values = forward_response(policy, value_head, input_ids, att, n_prompt, cfg.temperature)
    with reference(policy):
        ref_logp, _ = forward_response(policy, None, input_ids, att, n_prompt, cfg.temperature, with_values=False)
    resp_texts = [tok.decode(r[m.bool()], skip_special_tokens=True).strip() for r, m in zip(resp, mask)]
    ended = torch.tensor([how is not None for _, how in ends], device=device)
    # what 06 would keep of each answer: the profile normalize_profile parses from an answer that ended
    profiles = [prompts.normalize_profile(t) if how else None for (_, how), t in zip(ends, resp_texts)]
    return dict(input_ids=input_ids, attention_mask=att, n_prompt=n_prompt, mask=mask.float(), logprobs=logp,
                ref_logprobs=ref_logp, values=values, texts=resp_texts, resp=resp, ended=ended,
                how=[how for _, how in ends], profiles=profiles, complete=[p is not None for p in profiles])


def rollout_scores(reward_fn, queries, ro, cfg):
    """Sequence scores [B]: reward_fn's of every response text (stop_at_profile off), or of the profile 06 keeps
    from each complete response (the form the reward model was trained on), and cfg.incomplete_score for the
    others (06 keeps nothing of them)."""
    if not cfg.stop_at_profile:
        return torch.as_tensor(reward_fn(queries, ro["texts"], ro["resp"]), dtype=torch.float32)
    scores = torch.full((len(queries),), float(cfg.incomplete_score))
    keep = [k for k, c in enumerate(ro["complete"]) if c]
    if keep:
        got = reward_fn([queries[k] for k in keep], [ro["profiles"][k] for k in keep], ro["resp"][keep])
        scores[keep] = torch.as_tensor(got, dtype=torch.float32).cpu()
    return scores


def prompt_batch(n_prompts, batch_size, step, seed):
    """Indices of the prompts of a step: a seeded permutation per pass over the prompts, so any step can be
    recomputed (resume) without saved state."""
    start = step * batch_size
    out = []
    while len(out) < batch_size:
        epoch, off = divmod(start + len(out), n_prompts)
        perm = np.random.default_rng([seed, epoch]).permutation(n_prompts)
        out.extend(perm[off:off + batch_size - len(out)].tolist())
    return out


def trainable_state(policy, value_head):
    return {"lora": {k: v.detach().cpu() for k, v in policy.named_parameters() if v.requires_grad},
            "value_head": value_head.state_dict()}


def train(policy, value_head, tok, queries, reward_fn, cfg, start_step=0, optimizer_state=None, beta=None,
          on_step=None, on_checkpoint=None, progress=True):
    """Hand-written PPO. policy: a peft model (its reference: reference()); value_head: nn.Module;
    queries: list of chat-message lists; reward_fn(queries, texts, response_ids) -> scores [B] (with
    cfg.stop_at_profile it is asked about the complete responses only, texts = their profiles: rollout_scores).
    on_step(row, rollout) receives each step's log row; on_checkpoint(step, optimizer, kl_ctl) is called every
    cfg.ckpt_every steps; cfg.steps 0 = one pass over the queries (total_steps). Returns the list of log rows.
    A step: rollout, sequence scores, KL-penalised per-token rewards (eq. 8), GAE (gamma, lambda) and whitened
    advantages, then cfg.ppo_epochs passes over the rollout in minibatches of the clipped policy loss plus vf_coef
    times the clipped value loss, AdamW, gradient clipping."""
    from tqdm import tqdm
    device = next(policy.parameters()).device
    value_head.to(device)
    params = [p for p in policy.parameters() if p.requires_grad] + list(value_head.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.lr, eps=1e-6)
    if optimizer_state:
        opt.load_state_dict(optimizer_state)
    kl_ctl = KLController(cfg.beta if beta is None else beta, cfg.target_kl, cfg.kl_horizon)
    policy.eval()  # no dropout: the logprobs of the rollout and of the update must agree
    history = []
    steps = total_steps(cfg, len(queries))
    for step in tqdm(range(start_step, steps), desc="ppo", unit="step", disable=not progress,
                     initial=start_step, total=steps):
        t0 = time.time()
        torch.manual_seed(cfg.seed * 100003 + step)
        idx = prompt_batch(len(queries), cfg.batch_size, step, cfg.seed)
        batch = [queries[k] for k in idx]
        ro = rollout(policy, value_head, tok, batch, cfg)
        scores = rollout_scores(reward_fn, batch, ro, cfg).to(device)
        ro["scores"] = raw_scores = scores.clone()
        if cfg.missing_eos_penalty:
            scores = scores - cfg.missing_eos_penalty * (~ro["ended"]).float()
        mask = ro["mask"]
        beta = kl_ctl.beta
        rewards, kl = kl_penalised_rewards(scores, ro["logprobs"], ro["ref_logprobs"], mask, beta)
        adv, returns = gae(rewards, ro["values"], mask, cfg.gamma, cfg.lam)
        if cfg.whiten_advantages:
            adv = masked_whiten(adv, mask)
        stats = []
        B = len(batch)
        for _ in range(cfg.ppo_epochs):
            perm = torch.randperm(B)
            for s in range(0, B, cfg.minibatch_size):
                mb = perm[s:s + cfg.minibatch_size]
                logp, values = forward_response(policy, value_head, ro["input_ids"][mb], ro["attention_mask"][mb],
                                                ro["n_prompt"], cfg.temperature, value_backprop=cfg.value_backprop)
                pg_loss, vf_loss, st = ppo_losses(logp, ro["logprobs"][mb], values, ro["values"][mb], adv[mb],
                                                  returns[mb], mask[mb], cfg.cliprange, cfg.cliprange_value)
                loss = pg_loss + cfg.vf_coef * vf_loss
                opt.zero_grad(set_to_none=True)
                loss.backward()
                gn = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
                opt.step()
                stats.append({**st, "pg_loss": pg_loss.item(), "vf_loss": vf_loss.item(), "grad_norm": float(gn)})
        kl_seq = kl.sum(1)
        complete = torch.tensor(ro["complete"], dtype=torch.bool, device=device)
        rm = raw_scores[complete] if cfg.stop_at_profile else raw_scores
        # score: the sequence scores PPO optimises; rm_score: the reward model's, of the complete responses only
        row = {"step": step + 1, "score": raw_scores.mean().item(),
               "score_std": raw_scores.std().item() if B > 1 else 0.0,
               "rm_score": rm.mean().item() if len(rm) else None, "complete_frac": complete.float().mean().item(),
               "kl": kl_seq.mean().item(), "kl_per_token": masked_mean(kl, mask).item(), "beta": beta,
               "non_score_reward": (-beta * kl_seq).mean().item(),
               "response_length": mask.sum(1).mean().item(), "ended_frac": ro["ended"].float().mean().item(),
               "value_mean": masked_mean(ro["values"], mask).item(), "return_mean": masked_mean(returns, mask).item(),
               "explained_variance": explained_variance(ro["values"], returns, mask),
               **{k: float(np.mean([s[k] for s in stats])) for k in stats[0]}, "seconds": round(time.time() - t0, 2)}
        row["policy_loss"], row["value_loss"] = row.pop("pg_loss"), row.pop("vf_loss")
        row["clip_fraction"] = row.pop("clipfrac")
        history.append(row)
        kl_ctl.update(row["kl"], B)
        if on_step:
            on_step(row, ro)
        if on_checkpoint and cfg.ckpt_every and (step + 1) % cfg.ckpt_every == 0 and step + 1 < steps:
            on_checkpoint(step + 1, opt, kl_ctl)
    return history


# ----------------------------------------------------------------------------- stage

class RewardScorer:
    """reward_fn(queries, responses) -> scores, with the reward model 04 saved."""

    def __init__(self, path, device=None, batch_size=8, model=None):
        self.model, self.tok = llm.load_reward_model(path, device, model)
        self.batch_size = batch_size

    def __call__(self, queries, responses):
        return llm.score_ids(self.model, self.tok,
                             [prompts.render_ids(self.tok, p, r) for p, r in zip(queries, responses)], self.batch_size)


def trend(rows):
    """Did the run improve? Over the logged steps: the mean of score, rm_score, complete_frac and kl over the first
    and the last third of the steps, and Spearman's rho (with its p-value) of the score against the step. A batch of
    a few rollouts scores with a spread of ~2, so single steps say little; a rise shows in the thirds and rho."""
    from scipy.stats import spearmanr
    rows = sorted(rows, key=lambda r: r["step"])
    third = max(1, len(rows) // 3)

    def mean(part, key):
        vals = [r[key] for r in part if r.get(key) is not None]
        return float(np.mean(vals)) if vals else None
    out = {"steps": len(rows)}
    for key in ("score", "rm_score", "complete_frac", "kl"):
        out[key] = {"first_third": mean(rows[:third], key), "last_third": mean(rows[-third:], key)}
    if len(rows) >= 3:
        rho, pval = spearmanr([r["step"] for r in rows], [r["score"] for r in rows])
        out["score_vs_step"] = {"spearman_rho": float(rho), "p": float(pval)}
    return out


def ppo_prompts(run, users, sizes):
    split = common.load_split(run)
    train = common.user_items(split["train_u"], split["train_i"], split["n_users"])
    item_text = common.load_items(run)
    nbrs = common.load_neighbors(run)["user_nbrs"]
    kept = [int(u) for u in users if len(train[int(u)])]
    return [prompts.user_prompt(u, train, nbrs, item_text, **sizes) for u in kept], kept


CHECKPOINT_KEYS = ("step", "steps", "sft_sha", "beta", "state", "optimizer")
RESUME_SKIP = ("run", "force", "restart", "device", "reward_batch", "ckpt_every")  # do not change what is computed


def load_checkpoint(path):
    """ppo.partial/checkpoint.pt, read with torch.load(weights_only=True): tensors, numbers, strings, lists and
    dicts only (what on_checkpoint writes), so that a file planted in the run directory cannot run code. Anything
    else (a pickled object, a truncated file, missing keys) is a DataError naming the file."""
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any failure to read it safely is the same refusal
        m = re.search(r"unsupported global:? GLOBAL (\S+)", str(e), re.I)
        why = (f"it asks to unpickle {m.group(1)}, which could run code" if m else
               f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]}")
        raise common.DataError(f"{path}: refused to load this PPO checkpoint ({why}); 05 writes only tensors, "
                               "numbers, strings, lists and dicts. Delete it, or pass --restart to start "
                               "over") from None
    if not (isinstance(ck, dict) and all(k in ck for k in CHECKPOINT_KEYS) and isinstance(ck["state"], dict)
            and {"lora", "value_head"} <= set(ck["state"])):
        raise common.DataError(f"{path}: not a checkpoint 05 wrote (expected the keys {', '.join(CHECKPOINT_KEYS)}); "
                               "delete it, or pass --restart to start over")
    return ck


HELP = {  # --help of each PPOConfig field
    "steps": "rollout batches (PPO iterations); 0 = one pass over the ppo users' prompts",
    "batch_size": "prompts per rollout", "minibatch_size": "rollouts per gradient step",
    "ppo_epochs": "passes over each rollout batch", "lr": "AdamW learning rate (constant)",
    "temperature": "rollout sampling temperature", "top_p": "rollout nucleus sampling",
    "max_new_tokens": "tokens per rollout at most", "beta": "KL coefficient (initial value when adaptive)",
    "target_kl": "> 0: adapt beta towards this KL per sequence; 0 = fixed beta",
    "kl_horizon": "adaptive beta's horizon", "gamma": "discount", "lam": "GAE lambda",
    "cliprange": "policy ratio clip", "cliprange_value": "value clip", "vf_coef": "value loss weight",
    "max_grad_norm": "gradient clipping norm", "value_backprop": "let the value loss train the LoRA too",
    "missing_eos_penalty": "subtracted from the score of a rollout cut at --max-new-tokens",
    "incomplete_score": "score of a rollout without a parseable profile line",
    "lora_r": "LoRA rank", "lora_alpha": "LoRA scale numerator",
    "lora_dropout": "LoRA dropout (inactive: the policy runs in eval mode)",
    "lora_targets": "comma-separated module names that get a LoRA",
    "reward_batch": "responses per reward-model forward pass", "ckpt_every": "steps between checkpoints",
}


RANGES = {  # each PPOConfig flag's range (common's argparse types); incomplete_score takes any number
    **dict.fromkeys(("batch_size", "minibatch_size", "ppo_epochs", "max_new_tokens", "kl_horizon", "lora_r",
                     "lora_alpha", "reward_batch", "ckpt_every"), common.positive_int),
    "steps": common.non_negative_int,
    **dict.fromkeys(("temperature", "cliprange", "cliprange_value", "max_grad_norm"), common.positive_float),
    **dict.fromkeys(("lr", "beta", "target_kl", "vf_coef", "missing_eos_penalty"), common.non_negative_float),
    **dict.fromkeys(("top_p", "gamma", "lam"), common.share), "lora_dropout": common.fraction,
}


def parse_args(argv=None):
    p = common.stage_parser(__doc__)
    c = PPOConfig()
    p.add_argument("--sft", default="sft_mask", help="SFT adapter folder in the run")
    p.add_argument("--reward", default="reward", help="reward-model folder in the run")
    p.add_argument("--model", default=llm.DEFAULT_LLM, help=llm.MODEL_HELP)
    p.add_argument("--device", default=None, help="cpu | cuda (default: cuda if available)")
    for name, val in asdict(c).items():
        if name in ("seed", "whiten_advantages", "stop_at_profile"):  # --seed is shared; --no-* below
            continue
        flag = "--" + name.replace("_", "-")
        if isinstance(val, bool):
            p.add_argument(flag, action="store_true", default=val, help=HELP[name])
        else:
            p.add_argument(flag, type=RANGES.get(name, type(val)), default=val, help=HELP[name])
    p.add_argument("--no-whiten", dest="whiten_advantages", action="store_false", help="do not whiten advantages")
    p.add_argument("--no-profile-stop", dest="stop_at_profile", action="store_false",
                   help="end rollouts at end-of-turn only and let the reward model score every response")
    p.add_argument("--limit", type=common.positive_int, default=None,
                   help="only the first N ppo users' prompts (a smoke run; every other setting as given)")
    p.add_argument("--restart", action="store_true", help="ignore a checkpoint in ppo.partial/ and start over")
    return p.parse_args(argv)


def resume_state(ck, ckpt_path, policy, value_head, sft_sha, steps, resume_key):
    """(start step, optimizer state, beta) from the checkpoint `ck` when it was written from these inputs (data, SFT
    adapter, reward model) and arguments, loading its LoRA and value head into the models; else a fresh start."""
    if ck is None:
        return 0, None, None
    if ck.get("sft_sha") == sft_sha and ck.get("steps") == steps and ck.get("resume_key") == resume_key:
        cur = dict(policy.named_parameters())
        for k, v in ck["state"]["lora"].items():
            cur[k].data.copy_(v.to(cur[k].device))
        value_head.load_state_dict(ck["state"]["value_head"])
        log.info("resuming from %s at step %d", ckpt_path, ck["step"])
        return ck["step"], ck["optimizer"], ck["beta"]
    log.info("%s was written from other inputs (data, --sft adapter, reward model) or arguments; starting over",
             ckpt_path)
    return 0, None, None


def log_step(logf, row, ro):
    """Append a PPO step's row to ppo_log.jsonl (with the share of rollouts 06 could parse and one example)."""
    row["valid_profile_frac"] = float(np.mean([prompts.parse_profile(t) is not None for t in ro["texts"]]))
    row["example"] = ro["texts"][0][:300]
    common.append_jsonl(logf, row)
    log.info("step %d: score %.3f, complete %.2f, kl %.3f, len %.1f, clip %.3f, vf %.4f, ev %.2f, pg %.4f, "
             "beta %s, valid %.2f (%.1fs)", row["step"], row["score"], row["complete_frac"], row["kl"],
             row["response_length"], row["clip_fraction"], row["value_loss"], row["explained_variance"],
             row["policy_loss"], row["beta"], row["valid_profile_frac"], row["seconds"])


def log_trend(summary):
    if "score_vs_step" in summary:
        def thirds(key):
            return " -> ".join("-" if v is None else f"{v:.3f}" for v in summary[key].values())
        log.info("over %d steps, first third -> last third: score %s, complete %s, kl %s; Spearman rho of score "
                 "and step %.2f (p %.2g)", summary["steps"], thirds("score"), thirds("complete_frac"), thirds("kl"),
                 summary["score_vs_step"]["spearman_rho"], summary["score_vs_step"]["p"])


def main(argv=None):
    args = parse_args(argv)
    run, sft_name, started = args.run, args.sft, time.time()
    common.setup_logging(run, "05_ppo")
    common.seed_everything(args.seed)
    inputs = ["data/split.npz", "data/items.jsonl", "neighbors.npz", "user_sets.json", prompts.PROMPT_FILE,
              f"{sft_name}/", f"{args.reward}/"]  # model directories are inputs: their files' hashes
    common.check_inputs(run, inputs, args.force)
    args.prompt = prompts.prompt_settings(run)["inference"]
    cfg = PPOConfig(**{k: getattr(args, k) for k in asdict(PPOConfig()) if hasattr(args, k)})
    cfg.seed = args.seed
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    work, final = run / "ppo.partial", run / "ppo"
    common.refuse_link(work)
    sft_sha = common.sha256_file(run / sft_name / "adapter_model.safetensors")
    ckpt_path = work / "checkpoint.pt"
    ck = load_checkpoint(ckpt_path) if ckpt_path.exists() and not args.restart else None  # before any model loads
    resume_key = llm.resume_key(run, inputs, args, skip=RESUME_SKIP)

    # 1. the ppo users' inference prompts
    sets = json.loads((run / "user_sets.json").read_text())
    queries, users = ppo_prompts(run, sets["ppo"][:args.limit], args.prompt)
    if not queries:
        raise common.DataError(f"{run}/user_sets.json: the ppo user set has no user with training items")
    cfg.steps = total_steps(cfg, len(queries))
    log.info("PPO prompts: %d users of the ppo set; %d steps of %d", len(queries), cfg.steps, cfg.batch_size)

    # 2. the policy (a new LoRA stacked on the frozen SFT adapter), its value head, the reward model
    policy, tok = llm.load_llm(args.model, adapter=run / sft_name, device=device)
    llm.stack_lora(policy, PPO_ADAPTER, args)
    value_head = new_value_head(policy.config.hidden_size).to(device)
    scorer = RewardScorer(run / args.reward, device=device, batch_size=args.reward_batch, model=args.model)
    start, opt_state, beta = resume_state(ck, ckpt_path, policy, value_head, sft_sha, cfg.steps, resume_key)
    if start == 0:
        shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True, exist_ok=True)
    log_path = work / "ppo_log.jsonl"
    common.write_jsonl(log_path, [r for r in common.read_jsonl(log_path, repair=True) if r["step"] <= start])

    # 3. PPO, checkpointed every --ckpt-every steps
    def on_checkpoint(step, opt, kl_ctl):
        with common.atomic_path(ckpt_path) as tmp:
            torch.save({"step": step, "steps": cfg.steps, "sft_sha": sft_sha, "resume_key": resume_key,
                        "beta": kl_ctl.beta, "state": trainable_state(policy, value_head),
                        "optimizer": opt.state_dict()}, tmp)

    t0 = time.time()
    with common.open_append(log_path) as logf:
        history = train(policy, value_head, tok, queries, lambda q, texts, _ids: scorer(q, texts), cfg,
                        start_step=start, optimizer_state=opt_state, beta=beta,
                        on_step=lambda row, ro: log_step(logf, row, ro), on_checkpoint=on_checkpoint)

    # 4. the adapter, the value head and what it was trained on, then ppo/ in one rename
    llm.save_adapter(policy, PPO_ADAPTER, work)
    tok.save_pretrained(work)
    torch.save(value_head.state_dict(), work / "value_head.pt")
    common.write_json(work / "base.json", {"sft": sft_name})
    summary = trend(common.read_jsonl(log_path))  # every step, also those before a resume
    log_trend(summary)
    common.write_json(work / "ppo_info.json", {"config": asdict(cfg), "users": users, "sft": sft_name,
                                               "base_model": str(args.model), "resumed_at": start,
                                               "train_seconds": round(time.time() - t0, 1),
                                               "last": history[-1] if history else None, "trend": summary})
    if ckpt_path.exists():
        ckpt_path.unlink()
    llm.replace_dir(work, final)
    outputs = sorted(str(p.relative_to(run)) for p in final.rglob("*") if p.is_file())
    common.record_stage(run, "05_ppo", args, inputs, outputs, started)
    return final


if __name__ == "__main__":
    common.run_stage(main)
