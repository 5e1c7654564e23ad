"""The presets of scripts/presets.sh. cpu: the sizes that fit a CPU, each stage parsing exactly the values the preset
names on top of its own defaults, and nothing else changed. gpu: the stage defaults themselves, run end to end
(02 -> 03 gpt_kd -> 03 mask -> 04 -> 05 -> 06) on a CPU with --limit and the tiny LLM, so that no code path of the
GPU settings runs for the first time on a GPU."""
import json
import shlex
import subprocess
from pathlib import Path

import torch

import common
import llm

torch.set_num_threads(1)
REPO = Path(__file__).resolve().parents[1]
D = common.load_stage("02_distill")
SFT = common.load_stage("03_sft")
RW = common.load_stage("04_reward")
PPO = common.load_stage("05_ppo")
PROF = common.load_stage("06_profile")

ATTN = "q_proj,k_proj,v_proj,o_proj"
# What PRESET=cpu changes, as each stage parses it (SFT_STEPS unset); every other argument keeps the stage's default.
CPU = {
    "03": dict(max_steps=16, epochs=1.0, batch_size=2, lr=2e-3, lora_dropout=0.05, max_length=1024,
               lora_targets=ATTN + ",gate_proj,up_proj,down_proj"),
    "04": dict(max_steps=32, epochs=1.0, lr=3e-4, lora_r=8, lora_alpha=16, lora_dropout=0.0, lora_targets=ATTN),
    "05": dict(steps=3, batch_size=4, minibatch_size=2, lr=5e-5, temperature=1.0, top_p=1.0, max_new_tokens=40,
               lora_r=8, lora_alpha=16, lora_dropout=0.0, lora_targets=ATTN),
    "06": dict(item_users=2, max_new_tokens=40),
    "02": dict(max_chars=48, pair_max_chars=48, max_new_tokens=48),
}
PARSE = {"02": D.parse_args, "03": SFT.parse_args, "04": RW.parse_args, "05": PPO.parse_args, "06": PROF.parse_args}
ARGV = {"02": ["--run", "r"], "03": ["--run", "r"], "04": ["--run", "r"], "05": ["--run", "r"],
        "06": ["--run", "r", "--source", "ppo"]}


def preset_flags(preset, **env):
    """{stage: [flags]} as scripts/presets.sh sets them for `preset` (env: more variables, e.g. SFT_STEPS)."""
    names = {"02": "DISTILL_FLAGS", "03": "SFT_FLAGS", "04": "REWARD_FLAGS", "05": "PPO_FLAGS", "06": "PROFILE_FLAGS",
             "layout": "LAYOUT", "omp": "OMP_NUM_THREADS"}
    script = ". scripts/presets.sh >/dev/null && " + " && ".join(f'echo "${{{v}:-}}"' for v in names.values())
    out = subprocess.run(["bash", "-c", script], cwd=REPO, env={"PRESET": preset, "PATH": "/usr/bin:/bin", **env},
                         capture_output=True, text=True, check=True).stdout.splitlines()
    return {stage: shlex.split(line) for stage, line in zip(names, out)}


def test_cpu_preset_changes_only_its_flags():
    flags = preset_flags("cpu")
    for stage, parse in PARSE.items():
        default = vars(parse(ARGV[stage]))
        assert vars(parse(ARGV[stage] + flags[stage])) == {**default, **CPU[stage]}, stage
        # each flag moves a stage default: the cpu preset differs from gpu (the defaults) exactly there
        assert all(default[k] != v for k, v in CPU[stage].items()), stage
    # 03's gpt_kd runs with the same flags; --variant is the only difference
    kd = vars(SFT.parse_args(["--run", "r", "--variant", "gpt_kd"] + flags["03"]))
    assert kd == {**vars(SFT.parse_args(ARGV["03"] + flags["03"])), "variant": "gpt_kd"}


def test_sft_steps_sets_only_03s_steps():
    """SFT_STEPS (experiments.sh: 128) sets 03's --max-steps under the cpu preset and nothing else; gpu ignores it."""
    default, longer = preset_flags("cpu"), preset_flags("cpu", SFT_STEPS="128")
    assert longer["03"] == [("128" if f == "16" else f) for f in default["03"]] and "16" in default["03"]
    assert {k: v for k, v in longer.items() if k != "03"} == {k: v for k, v in default.items() if k != "03"}
    assert vars(SFT.parse_args(["--run", "r"] + longer["03"]))["max_steps"] == 128
    assert preset_flags("gpu", SFT_STEPS="128") == preset_flags("gpu")


def test_gpu_preset_is_the_stage_defaults():
    """gpu: no flag for 03-06 (their defaults are the paper's), the paper's ~1,500 distilled users, one stage at a
    time, torch's own threads; MODEL, TEACHER and the API variables reach the stages that take them."""
    assert preset_flags("gpu") == {"02": ["--n-users", "1500"], "03": [], "04": [], "05": [], "06": [],
                                   "layout": ["sequential"], "omp": []}
    flags = preset_flags("gpu", MODEL="/models/Llama-2-7b-chat-hf", TEACHER="api", API_MODEL="gpt-4o-mini",
                         API_KEY_ENV="MY_KEY", N_USERS="2000")
    assert flags["02"] == ["--teacher", "api", "--n-users", "2000", "--api-model", "gpt-4o-mini",
                           "--api-key-env", "MY_KEY"]
    assert all(flags[s] == ["--model", "/models/Llama-2-7b-chat-hf"] for s in ("03", "04", "05", "06"))
    cpu = preset_flags("cpu")
    assert (cpu["layout"], cpu["omp"]) == (["side_by_side"], ["1"])
    assert preset_flags("cpu", MODEL="m")["03"] == cpu["03"] + ["--model", "m"]
    bad = subprocess.run(["bash", "-c", ". scripts/presets.sh"], cwd=REPO,
                         env={"PRESET": "tpu", "PATH": "/usr/bin:/bin"}, capture_output=True, text=True)
    assert bad.returncode == 2 and "unknown PRESET=tpu" in bad.stderr


def test_gpu_preset_end_to_end_with_limit(synthetic_run, tiny_llm, monkeypatch):
    """02 -> 03 gpt_kd -> 03 mask -> 04 -> 05 -> 06 at the stage defaults (3 SFT and reward epochs, batch 1, one PPO
    step per prompt, 100 new tokens, 5 users per warm item), --limit keeping each stage to a few examples, in the
    dtypes of a GPU with bf16 (bf16 autocast in 03 and 04, bf16 models in 03's and 06's generation and in 05)."""
    real_load = llm.load_llm
    monkeypatch.setattr(llm, "load_llm", lambda *a, **kw: real_load(*a, **{**kw, "dtype": torch.bfloat16}))
    monkeypatch.setattr(llm, "pick_dtype", lambda name, device=None: torch.bfloat16 if name == "auto"
                        else getattr(torch, name))
    run = synthetic_run
    D.main(["--run", str(run), "--no-probe"])
    base = ["--run", str(run), "--model", tiny_llm, "--device", "cpu"]
    kd = SFT.main(base + ["--variant", "gpt_kd", "--limit", "3"])
    info = json.loads((kd / "sft_info.json").read_text())
    # 3 users + round(0.5 * 3) item examples, 3 epochs at batch 1
    assert info["n_examples"] == 5 and info["steps"] == 3 * 5, info
    mask = SFT.main(base + ["--variant", "mask", "--limit", "3"])
    assert json.loads((mask / "sft_info.json").read_text())["init"] == "sft_gpt_kd"
    adapter = json.loads((mask / "adapter_config.json").read_text())
    assert (adapter["r"], adapter["lora_alpha"], sorted(adapter["target_modules"])) == (8, 16, ["q_proj", "v_proj"])

    reward = RW.main(base + ["--limit", "8"])
    ev = json.loads((reward / "eval.json").read_text())
    assert ev["counts"]["train_pairs"] == 8 and ev["heldout"]["n"] == 8 and ev["steps"] == 3 * 2, ev

    ppo = PPO.main(base + ["--limit", "2"])
    info = json.loads((ppo / "ppo_info.json").read_text())
    assert info["config"]["steps"] == 2 and len(info["users"]) == 2  # one pass: a step per prompt at batch 1
    assert [r["step"] for r in common.read_jsonl(ppo / "ppo_log.jsonl")] == [1, 2]
    adapter = json.loads((ppo / "adapter_config.json").read_text())
    assert (adapter["r"], adapter["lora_alpha"], adapter["lora_dropout"]) == (4, 8, 0.05)

    PROF.main(base + ["--source", "ppo", "--limit", "3"])
    out = run / "profiles" / "ppo"
    assert len(common.read_jsonl(out / "users.jsonl")) == 3
    recorded = common.read_manifest(run)["stages"]["06_profile_ppo"]["args"]
    assert recorded["item_users"] == 5 and recorded["max_new_tokens"] == PROF.MAX_NEW_TOKENS
