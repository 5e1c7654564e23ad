"""Seconds per training epoch of 07's Base and Augment, per backbone, and the ratio Augment / Base.

    python 01_neighbors.py --run /tmp/ovh                  # once: the bundled ml-100k split and item texts
    python -m bench.bench_epoch --run /tmp/ovh             # every backbone, Base and Augment
    python -m bench.bench_epoch --run /tmp/ovh --backbone biasmf ncf --reps 9
    python -m bench.bench_epoch --run /tmp/ovh --module old_07.py   # another 07 (with setup_training, train_epoch)
    python -m bench.bench_epoch --run /tmp/ovh --backbone biasmf --warmup-epochs 100 --keep-denormals
                                     # epochs late in training, denormals not flushed (what flushing saves)
    python -m bench.bench_epoch --run /tmp/ovh --phases 3   # also ms per step of each phase, over 3 epochs
    python -m bench.bench_epoch --run /tmp/ovh --backbone biasmf --profile 3   # also what Augment adds per step, by op
    python -m bench.bench_epoch --synthetic 60000 40000 8 --backbone biasmf --reps 3   # a larger, sparser dataset

Each epoch is 07's own train_epoch (sampling, forward, backward, Adam, loss.item()) at 07's defaults. Base and
Augment of a backbone are built in the same process and, after --warmup-epochs untimed epochs each (default 1),
their epochs interleaved (the order flipping every round), so drift in the machine's load hits both alike; seconds
are medians, the ratio is the median over rounds of the round's Augment / Base. Wall time and this process's CPU
time are both reported: on a shared machine the CPU time is the steadier one (it leaves out the time the process
waited for a core). The load average is printed before and after: above the core count, read the seconds as contended.
Profiles: profiles/<--source>/ of the run when it has them, else random unit vectors of the item-text width
(what 06 writes with the same encoder). Those are all distinct, an upper bound on Augment's cost: 07 runs the
profile tower once per distinct profile embedding, and a tuned model's profiles repeat (profiles= says which). With
--synthetic, the split, the item texts and the profiles are generated (see synthetic()).
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import time
from pathlib import Path

import numpy as np
import torch

import common

ROOT = common.REPO


def load_07(path):
    spec = importlib.util.spec_from_file_location("train_cf", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def features(run, source, split, seed=0):
    text = common.load_npy(run / "item_text_emb.npy")
    prof = run / "profiles" / source
    if (prof / "user_emb.npy").exists():
        return text, {"user_prof": common.load_npy(prof / "user_emb.npy"),
                      "item_prof": common.load_npy(prof / "item_emb.npy")}, f"profiles/{source}"
    rng = np.random.default_rng(seed)
    d_t = text.shape[1]
    return text, {"user_prof": unit_rows(rng, split["n_users"], d_t),
                  "item_prof": unit_rows(rng, split["n_items"], d_t)}, "synthetic"


def unit_rows(rng, n, d):
    """n random unit vectors of width d (a sentence encoder's outputs are unit vectors too)."""
    x = rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def synthetic(n_users, n_items, per_user, distinct=0.46, d_t=384, seed=0):
    """A split and features of a chosen size, for epochs at scales no bundled dataset has: per_user interactions per
    user over power-law items (exponent 0.8), unit text and profile embeddings, the profiles drawn from a pool so
    that a fraction `distinct` of the users' and items' rows differ (by default the share in the ml-100k pipeline's
    `ppo` profiles: bench/RESULTS.md, section "Augment's overhead per epoch")."""
    rng = np.random.default_rng(seed)
    pop = 1.0 / np.arange(1, n_items + 1) ** 0.8
    pairs = np.unique(np.repeat(np.arange(n_users), per_user) * n_items
                      + rng.choice(n_items, n_users * per_user, p=pop / pop.sum()))
    none = np.zeros(0, dtype=np.int64)
    split = {"train_u": pairs // n_items, "train_i": pairs % n_items, "valid_u": none, "valid_i": none,
             "test_u": none, "test_i": none, "cold_items": none, "n_users": n_users, "n_items": n_items}
    pool = unit_rows(rng, max(1, int(distinct * (n_users + n_items))), d_t)
    which = rng.permutation(np.r_[np.arange(len(pool)), rng.integers(0, len(pool), n_users + n_items - len(pool))])
    prof = {"user_prof": pool[which[:n_users]], "item_prof": pool[which[n_users:]]}
    return split, unit_rows(rng, n_items, d_t), prof, f"synthetic ({len(pool)} distinct of {n_users + n_items})"


def phase_epoch(cf, model, opt, sampler, rng, args, sync, ms):
    """One epoch of 07's own train_epoch, timed by hooks (none of its loop is copied here), appending to ms the ms of
    each step's phases: sample (the sampler producing the batch), forward (the model's forward), backward (from the
    forward's end to the optimizer step: the loss, zero_grad and backward) and step (Adam's step)."""
    t = {}

    def mark(name):
        sync()
        t[name] = time.perf_counter()

    def record(*_):
        mark("step_end")
        for k, a, b in (("sample", "sample", "sampled"), ("forward", "forward", "forward_end"),
                        ("backward", "forward_end", "step"), ("step", "step", "step_end")):
            ms.setdefault(k, []).append((t[b] - t[a]) * 1e3)

    epoch = sampler.epoch

    def timed_epoch(batch_size):
        batches = epoch(batch_size)
        while True:
            mark("sample")
            batch = next(batches, None)
            if batch is None:
                return
            mark("sampled")
            yield batch

    sampler.epoch = timed_epoch
    hooks = [model.register_forward_pre_hook(lambda *_: mark("forward")),
             model.register_forward_hook(lambda *_: mark("forward_end")),
             opt.register_step_pre_hook(lambda *_: mark("step")), opt.register_step_post_hook(record)]
    try:
        cf.train_epoch(model, opt, sampler, rng, args)
    finally:
        del sampler.epoch
        for h in hooks:
            h.remove()


def print_profile_diff(cf, runs, args, epochs, steps, rows=15):
    """What Augment adds per step, by op and input shapes: torch.profiler's self CPU time over `epochs` epochs of
    each variant, Augment minus Base, in ms per step (the profiler's own overhead included in both)."""
    per_step = {}
    for v in runs:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True) as prof:
            for _ in range(epochs):
                cf.train_epoch(*runs[v], args)
        per_step[v] = {(e.key, str(e.input_shapes)): e.self_cpu_time_total / 1e3 / (epochs * steps)
                       for e in prof.key_averages(group_by_input_shape=True)}
    base, aug = per_step["base"], per_step["augment"]
    extra = sorted(((aug.get(k, 0.0) - base.get(k, 0.0), k) for k in set(base) | set(aug)), reverse=True)
    print(f"  profiler, ms/step over {epochs} epochs each: base {sum(base.values()):.2f}, augment "
          f"{sum(aug.values()):.2f}; the largest differences (augment - base), by op and input shapes:")
    for i, (x, (op, shapes)) in enumerate(extra[:rows] + extra[-3:]):
        print(("    ...\n" if i == rows else "") + f"    {x:+.3f}  {op[:40]:<40} {shapes[:80]}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", type=Path, help="a run directory written by 01_neighbors.py")
    ap.add_argument("--synthetic", type=int, nargs=3, metavar=("USERS", "ITEMS", "PER_USER"),
                    help="instead of --run: a synthetic split and features of this size (see synthetic())")
    ap.add_argument("--source", default="ppo", help="profiles/<source>/ when present (else synthetic)")
    ap.add_argument("--backbone", nargs="+", default=None, help="default: all of 07's")
    ap.add_argument("--reps", type=int, default=5, help="timed epochs per model (median)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--warmup-epochs", type=int, default=1,
                    help="untimed epochs per model first (late epochs: tower weights decay into denormals)")
    ap.add_argument("--profile", type=int, default=0, metavar="N",
                    help="after the timing, what Augment adds per step by op "
                         "(torch.profiler over N epochs per variant)")
    ap.add_argument("--phases", type=int, default=0, metavar="N",
                    help="after the timing, ms per step of each phase (sample, forward, backward, step) over N epochs")
    ap.add_argument("--keep-denormals", action="store_true",
                    help="do not flush denormals to zero (every stage does, common.run_stage)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--module", type=Path, default=ROOT / "07_train_cf.py", help="the 07 to time")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.set_flush_denormal(not a.keep_denormals)   # every stage flushes them (common.run_stage)
    cf = load_07(a.module)
    if (a.run is None) == (a.synthetic is None):
        ap.error("give one of --run and --synthetic")
    if a.synthetic:
        split, text, prof, prof_src = synthetic(*a.synthetic)
    else:
        split = common.load_split(a.run)
        text, prof, prof_src = features(a.run, a.source, split)
    args = cf.parse_args(["--run", str(a.run), "--device", a.device])
    sync = torch.cuda.synchronize if a.device.startswith("cuda") else (lambda: None)
    load0 = os.getloadavg()
    print(f"device={a.device} threads={a.threads} torch={torch.__version__} cores={os.cpu_count()} "
          f"module={a.module.name} profiles={prof_src} d_t={text.shape[1]} reps={a.reps} (median) "
          f"warmup_epochs={a.warmup_epochs} flush_denormal={not a.keep_denormals}")
    print(f"users={split['n_users']} items={split['n_items']} train={len(split['train_u'])} "
          f"batch={args.batch_size} d={args.dim}  load average before: {' '.join(f'{x:.2f}' for x in load0)}")
    print(f"{'backbone':<10}{'base s':>9}{'augment s':>11}{'ratio':>7}   {'base cpu s':>11}{'augment cpu s':>14}"
          f"{'ratio':>7}")
    for backbone in a.backbone or cf.BACKBONES:
        runs = {}
        for variant in ("base", "augment"):
            feats = {"text": text, **(prof if variant == "augment" else {})}
            runs[variant] = cf.setup_training(backbone, variant, 0, split, feats, args)
        wall, cpu = {v: [] for v in runs}, {v: [] for v in runs}
        for v in runs:
            for _ in range(a.warmup_epochs):
                cf.train_epoch(*runs[v], args)
        for r in range(1, a.reps + 1):
            for v in (list(runs) if r % 2 == 0 else list(runs)[::-1]):
                sync()
                t_wall, t_cpu = time.perf_counter(), time.process_time()
                cf.train_epoch(*runs[v], args)
                sync()
                wall[v].append(time.perf_counter() - t_wall)
                cpu[v].append(time.process_time() - t_cpu)
        # ratio: the median over rounds of Augment / Base within a round (adjacent epochs see the same load)
        ratio = lambda secs: statistics.median(x / y for x, y in zip(secs["augment"], secs["base"]))
        w, c = ({v: statistics.median(x) for v, x in secs.items()} for secs in (wall, cpu))
        print(f"{backbone:<10}{w['base']:>9.3f}{w['augment']:>11.3f}{ratio(wall):>6.2f}x   "
              f"{c['base']:>11.3f}{c['augment']:>14.3f}{ratio(cpu):>6.2f}x", flush=True)
        if a.phases:   # epochs interleaved as above; the median over all their steps
            ph = {v: {} for v in runs}
            for r in range(a.phases):
                for v in (list(runs) if r % 2 == 0 else list(runs)[::-1]):
                    phase_epoch(cf, *runs[v], args, sync, ph[v])
            ph = {v: {k: statistics.median(x) for k, x in d.items()} for v, d in ph.items()}
            print("  ms/step " + "; ".join(f"{v}: " + " ".join(f"{k} {x:.2f}" for k, x in ph[v].items()) for v in ph)
                  + "; augment - base: " + " ".join(f"{k} {ph['augment'][k] - ph['base'][k]:+.2f}" for k in ph["base"]),
                  flush=True)
        if a.profile:
            print_profile_diff(cf, runs, args, a.profile, steps=-(-len(split["train_u"]) // args.batch_size))
    print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
