"""How much of an adapter's weight change a bf16 merge keeps: for each model 06 can load from a run, the share of
the weights that merging the adapter changes (in float32) whose bf16 value equals the un-merged one, i.e. whose
change bf16 rounds away; and, for the ppo source, the largest logit difference between 06's model (SFT and PPO
adapters folded, not merged, as 05 trains them) and the float32 merge. Used for docs/results.md, "Profiles of the `ppo`
source: adapters merged into bf16 weights, and the probe's noise".

Run  python -m scripts.merge_rounding --run runs/ml100k [--sft sft_mask]
"""
import argparse
import json
from pathlib import Path

import torch

import llm


def rounded_away(before, after):
    """(weights changed, of which bf16 cannot tell apart) between two state dicts of one model."""
    changed = lost = 0
    for k, w in before.items():
        moved = after[k] != w
        changed += int(moved.sum())
        lost += int((moved & (after[k].bfloat16() == w.bfloat16())).sum())
    return changed, lost


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", type=Path, required=True)
    p.add_argument("--sft", default=None, help="SFT adapter folder (default: the one ppo/base.json names)")
    a = p.parse_args(argv)
    from peft import PeftModel
    torch.set_num_threads(1)
    sft = a.sft or json.loads((a.run / "ppo" / "base.json").read_text())["sft"]
    base = {k: v.clone() for k, v in llm.load_llm(device="cpu")[0].state_dict().items()}
    sft_merged = llm.load_llm(adapter=a.run / sft, device="cpu")[0].merge_and_unload()
    sft_w = {k: v.clone() for k, v in sft_merged.state_dict().items()}
    changed, lost = rounded_away(base, sft_w)
    print(f"{sft}: {changed:,} weights changed by the merge, {lost:,} ({lost / changed:.1%}) equal in bf16")
    if not (a.run / "ppo" / "adapter_model.safetensors").exists():
        return
    ppo_merged = PeftModel.from_pretrained(sft_merged, a.run / "ppo").merge_and_unload()
    changed, lost = rounded_away(sft_w, ppo_merged.state_dict())
    print(f"ppo over {sft}: {changed:,} weights changed by the merge, {lost:,} ({lost / changed:.1%}) equal in bf16")
    used, tok = llm.load_profile_model(a.run, "ppo", device="cpu")
    profile = "User identity: film fan, student, critic; User interests: Drama, War, Comedy"
    ids = torch.tensor([tok(profile)["input_ids"]])
    with torch.no_grad():
        diff = (used(ids).logits - ppo_merged(ids).logits).abs().max().item()
    print(f"06's ppo model (adapters folded, not merged: llm.fold_lora) vs the float32 merge: "
          f"largest logit difference {diff:.2e}")


if __name__ == "__main__":
    main()
