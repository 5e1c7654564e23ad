"""03 and 04 checkpoint every --ckpt-every steps; a run that stops (here: an exception at a chosen step, as a kill
would leave it) is resumed by a re-run with the same inputs and arguments from its last checkpoint, and finishes
with the weights an uninterrupted run trains; other arguments start over."""
import shutil

import pytest
import torch
from safetensors.torch import load_file

import common
import llm

torch.set_num_threads(1)
D = common.load_stage("02_distill")
SFT = common.load_stage("03_sft")
RW = common.load_stage("04_reward")
STEPS, EVERY, STOP_AT = 6, 2, 5


class Killed(Exception):
    pass


def stopping_logger(monkeypatch, at):
    """llm.step_logger whose callback raises Killed at the end of step `at` (after the checkpoints before it)."""
    real = llm.step_logger

    def logger(path):
        cb = real(path)
        cb.on_step_end = lambda targs, state, control, **kw: (_ for _ in ()).throw(Killed()) \
            if state.global_step == at else None
        return cb
    monkeypatch.setattr(llm, "step_logger", logger)


def weights(folder, name):
    return load_file(str(folder / name))


@pytest.mark.parametrize("stage", ["03", "04"])
def test_a_stopped_training_resumes_from_its_last_checkpoint(stage, synthetic_run, tiny_llm, tmp_path, monkeypatch):
    D.main(["--run", str(synthetic_run), "--no-probe"])
    twin = tmp_path / "twin"
    shutil.copytree(synthetic_run, twin)
    main, name, out, log = ((SFT.main, "adapter_model.safetensors", "sft_gpt_kd", "03_sft_gpt_kd.log") if stage == "03"
                            else (RW.main, "adapter_model.safetensors", "reward", "04_reward.log"))
    extra = ["--variant", "gpt_kd", "--limit", "4"] if stage == "03" else ["--limit", "8", "--batch-size", "1"]

    def argv(run, *more):
        return ["--run", str(run), "--model", tiny_llm, "--device", "cpu", "--max-steps", str(STEPS), "--epochs",
                "1", "--ckpt-every", str(EVERY), *extra, *more]

    main(argv(twin))  # uninterrupted
    with monkeypatch.context() as m:
        stopping_logger(m, STOP_AT)
        with pytest.raises(Killed):
            main(argv(synthetic_run))
    work = synthetic_run / f"{out}.tmp"
    assert sorted(p.name for p in (work / "trainer").glob("checkpoint-*")) == [f"checkpoint-{STOP_AT - 1}"]
    (synthetic_run / log).unlink()
    main(argv(synthetic_run))
    assert f"(step {STOP_AT - 1})" in (synthetic_run / log).read_text()  # resumed, not started over
    steps = [r["step"] for r in common.read_jsonl(synthetic_run / out / "train_log.jsonl")]
    assert steps == list(range(1, STEPS + 1))
    a, b = weights(synthetic_run / out, name), weights(twin / out, name)
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    assert not (synthetic_run / out / "trainer").exists()


def test_other_arguments_start_over(synthetic_run, tiny_llm, monkeypatch):
    D.main(["--run", str(synthetic_run), "--no-probe"])
    argv = ["--run", str(synthetic_run), "--model", tiny_llm, "--device", "cpu", "--variant", "gpt_kd", "--limit",
            "4", "--max-steps", str(STEPS), "--epochs", "1", "--ckpt-every", str(EVERY)]
    with monkeypatch.context() as m:
        stopping_logger(m, STOP_AT)
        with pytest.raises(Killed):
            SFT.main(argv)
    (synthetic_run / "03_sft_gpt_kd.log").unlink()
    SFT.main(argv + ["--lr", "1e-4"])
    assert "resuming" not in (synthetic_run / "03_sft_gpt_kd.log").read_text()


def test_activation_checkpointing_trains_the_same_weights(synthetic_run, tiny_llm, tmp_path):
    D.main(["--run", str(synthetic_run), "--no-probe"])
    twin = tmp_path / "twin"
    shutil.copytree(synthetic_run, twin)
    for run, mode in ((synthetic_run, "off"), (twin, "on")):
        SFT.main(["--run", str(run), "--model", tiny_llm, "--device", "cpu", "--variant", "gpt_kd", "--limit", "4",
                  "--max-steps", "3", "--epochs", "1", "--activation-checkpointing", mode])
        assert f"activation checkpointing {mode}" in (run / "03_sft_gpt_kd.log").read_text()
    a, b = (weights(r / "sft_gpt_kd", "adapter_model.safetensors") for r in (synthetic_run, twin))
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    assert any(a[k].abs().max() > 0 for k in a if "lora_B" in k)  # it trained


def test_an_adapter_refuses_a_base_of_another_architecture(tiny_llm, tmp_path):
    import json

    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(tiny_llm, dtype=torch.float32)
    get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(tmp_path / "adapter")
    moved = shutil.copytree(tiny_llm, tmp_path / "moved")  # the same model elsewhere (another cache, a copy)
    llm.check_adapter_base(tmp_path / "adapter", str(moved))
    other = shutil.copytree(tiny_llm, tmp_path / "other")
    cfg = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**cfg, "num_hidden_layers": 1}))
    with pytest.raises(common.UsageError, match="was trained on .* another architecture"):
        llm.load_llm(str(other), adapter=tmp_path / "adapter", device="cpu")
    llm.check_adapter_base(tmp_path / "adapter", "some-org/not-here")  # cannot compare: only a warning


def test_a_trainers_work_folder_is_never_a_link(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep.txt").write_text("precious")
    run = tmp_path / "run"
    run.mkdir()
    (run / "sft_mask.tmp").symlink_to(outside)  # resumable_work would empty the folder it points to
    with pytest.raises(common.StageError, match="symbolic link"):
        llm.resumable_work(run / "sft_mask.tmp", "key")
    (run / "train_log.jsonl").symlink_to(outside / "keep.txt")
    with pytest.raises(common.StageError, match="symbolic link"):
        llm.step_logger(run / "train_log.jsonl")
    assert (outside / "keep.txt").read_text() == "precious"
