"""`make bench`: the pipeline against the classic recipe, and where the time goes, from one run.

Not a test: nothing here passes or fails on time. Every figure comes from this
run on this machine, on the same data (the sample set, written into a scratch
folder), and the ratios compare measurements taken one after the other, so a
busy machine shows in both sides (the load average is printed beside each).

    python -m pipeline.bench [--quick] [--only runs,startup,input,model,checkpoint,check,backbones]

The full bench (10 head + 5 fine-tune epochs at 150 px, both sides, plus the
rates at 150 and 299 px) is long; `--quick` is a much shorter version (timings: docs/speed.md).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

PARTS = ("runs", "startup", "input", "model", "checkpoint", "check", "backbones")
# (training, validation) images per class of the sample set; epochs of each phase; sizes; formats.
FULL = {
    "per_class": (150, 40),
    "head_epochs": 10,
    "finetune_epochs": 5,
    "sizes": [150, 299],
    "formats": ["keras", "h5", "weights_h5", "tf_checkpoint"],
    "steps": 10,
}
QUICK = {"per_class": (50, 20), "head_epochs": 2, "finetune_epochs": 3, "sizes": [150], "formats": ["h5"], "steps": 5}


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a few-minute version: fewer images, epochs, sizes")
    parser.add_argument("--only", default=",".join(PARTS), help=f"comma-separated parts: {','.join(PARTS)}")
    # Unset, both take the pipeline's own value from conf/ (bench_config), as the runs do.
    parser.add_argument("--image-size", type=int, help="pixels of the two runs (default: data.image_size of conf/)")
    parser.add_argument("--batch-size", type=int, help="images per step of the rates (default: data.batch_size)")
    parser.add_argument("--head-epochs", type=int, help="override the head epochs of both runs")
    parser.add_argument("--finetune-epochs", type=int, help="override the fine-tune epochs of both runs")
    parser.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temporary one)")
    parser.add_argument(
        "--base-epochs",
        type=int,
        default=8,
        help="epochs of pretraining the bench's stand-in for ImageNet weights (%(default)s; 3 left a weak base)",
    )
    parser.add_argument(
        "--from-scratch",
        action="store_true",
        help="random weights and the speed options by hand, as before the defaults were fast (no pretrained base)",
    )
    args = parser.parse_args(argv)
    args.plan = dict(QUICK if args.quick else FULL)
    for key in ("head_epochs", "finetune_epochs"):
        if getattr(args, key) is not None:
            args.plan[key] = getattr(args, key)
    args.only = [p for p in args.only.split(",") if p]
    unknown = set(args.only) - set(PARTS)
    if unknown:
        parser.error(f"unknown part(s) {', '.join(sorted(unknown))}; choose from {', '.join(PARTS)}")
    return args


def bench_config(data_dir: Path, args):
    """conf/'s values as the bench's runs have them: its data, random init, and --image-size/--batch-size if given.

    Fills args.image_size and args.batch_size from it, so every part measures at the same values.
    """
    from pipeline.defaults import compose_config

    overrides = [f"data.dir={data_dir}", "model.weights=null"]
    overrides += [f"data.image_size={args.image_size}"] if args.image_size is not None else []
    overrides += [f"data.batch_size={args.batch_size}"] if args.batch_size is not None else []
    config = compose_config(overrides)
    args.image_size, args.batch_size = config.data.image_size, config.data.batch_size
    return config


def say(text: str) -> None:
    load = "/".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"{text}   [load {load}]", flush=True)


def prepare_data(work: Path, per_class: tuple[int, int]) -> Path:
    from pipeline.data.sample_data import write_sample_data

    data_dir = work / "data"
    if not (data_dir / "train").exists():
        write_sample_data(data_dir, train_per_class=per_class[0], validation_per_class=per_class[1])
    return data_dir


def count_images(data_dir: Path) -> int:
    return sum(1 for _ in (data_dir / "train").rglob("*.jpg"))


def run_settings(work: Path, args) -> dict[str, list[str]]:
    """The pipeline's runs by name: what each adds to the shared command (weights, speed options)."""
    from pipeline.bench.runs import exact_overrides, scratch_overrides

    if args.from_scratch:
        return {"speed options": scratch_overrides()}
    weights = f"model.weights={args.base}"
    return {"defaults": [weights], "exact": [weights, *exact_overrides()]}


def bench_runs(data_dir: Path, work: Path, args, results: dict) -> None:
    """The classic recipe and the pipeline's runs, same data, base, epochs and size, one after the other."""
    from pipeline.bench.runs import epoch_breakdown, run_classic, run_pipeline, steady_epoch_seconds, time_to_accuracy

    plan, size = args.plan, args.image_size
    base = "random weights" if args.from_scratch else f"the bench's pretrained base ({args.base.name})"
    say(
        f"classic recipe: {plan['head_epochs']} head + {plan['finetune_epochs']} fine-tune epochs at {size} px "
        f"from {base} ..."
    )
    classic = run_classic(data_dir, size, plan["head_epochs"], plan["finetune_epochs"], work / "classic.log", args.base)
    say(
        f"classic recipe:  {classic['seconds']:7.1f} s ({classic['cpu_seconds']:.0f} CPU s), last val_accuracy "
        f"{classic['val_accuracy']:.3f} (saving a full model every epoch and the final .h5, as the seed's script does)"
    )
    # Time to accuracy: from the command to the first epoch within 2 points of the recipe's final accuracy.
    target = classic["val_accuracy"] - 0.02
    runs = {}
    for name, settings in run_settings(work, args).items():
        folder = work / f"pipeline_{name.replace(' ', '_')}"
        run = run_pipeline(data_dir, folder, size, plan["head_epochs"], plan["finetune_epochs"], settings)
        runs[name] = run
        say(
            f"pipeline, {name}: {run['seconds']:7.1f} s ({run['cpu_seconds']:.0f} CPU s), last val_accuracy "
            f"{run['val_accuracy']:.3f} ({' '.join(o for o in settings if not o.startswith('model.weights=/'))})"
        )
        say(
            f"  classic / pipeline ({name}): wall time {classic['seconds'] / run['seconds']:.2f}x, CPU time "
            f"{classic['cpu_seconds'] / run['cpu_seconds']:.2f}x (target >= 3x); accuracy difference "
            f"{100 * (run['val_accuracy'] - classic['val_accuracy']):+.1f} points"
        )
        for clock, key in (("wall", "curve"), ("CPU", "cpu_curve")):
            ours, theirs = time_to_accuracy(run[key], target), time_to_accuracy(classic[key], target)
            ratio = f" = {theirs / ours:.2f}x sooner (target >= 5x)" if theirs and ours else ""
            say(
                f"  {clock} time to val_accuracy >= {target:.3f}: classic {format_seconds(theirs)}, pipeline "
                f"{format_seconds(ours)}{ratio}"
            )
    name = next(iter(runs))  # the breakdown of the first: the defaults (or the speed options from scratch)
    run = runs[name]["run"]
    say(f"  pipeline ({name}): first training step after {run.first_step:.1f} s")
    for phase in ("head", "finetune"):
        seconds = steady_epoch_seconds(run, phase)
        parts = epoch_breakdown(run, phase)
        if seconds and parts:
            results[f"{phase}_epoch"] = seconds
            # the first batch is inside "start"; the others hold the rest of the images
            results[f"{phase}_train_rate"] = (count_images(data_dir) - args.batch_size) / parts["train"]
            say(
                f"  pipeline ({name}) {phase} epoch, end to end (after the first): {seconds:.1f} s = "
                f"fit's start to its first step {parts['start']:.1f} s + the other steps {parts['train']:.1f} s "
                f"+ validation {parts['validation']:.1f} s + checkpoint snapshot and the next fit's set-up "
                f"{parts['between']:.1f} s"
            )


def format_seconds(seconds: float | None) -> str:
    return "never" if seconds is None else f"{seconds:.1f} s"


def bench_startup(data_dir: Path, work: Path, args, results: dict) -> None:
    from pipeline.bench.runs import measure_startup

    startup = measure_startup(
        data_dir, work / "startup_run", args.image_size, next(iter(run_settings(work, args).values()))
    )
    say(
        f"seconds from `python -m pipeline` to the first training step: fresh {startup['fresh']:.1f} s, "
        f"on resume {startup['resume']:.1f} s"
    )


def bench_model(config, args, results: dict) -> None:
    """Compute-bound rates on in-memory tensors, and the fine-tune phase's end-to-end share."""
    from pipeline.bench.rates import PHASES, model_rate
    from pipeline.bench.runs import bench_precision

    n_images = count_images(Path(config.data.dir))
    for size in args.plan["sizes"]:
        for phase in ("head", "finetune"):
            rate = model_rate(config, 3, size, args.batch_size, phase, args.plan["steps"])
            results[("model", size, phase)] = rate
            say(f"model alone, {size} px, {phase} phase ({PHASES[phase]}): {rate:6.1f} images/s (in-memory tensors)")
    # What the pipeline's cached fine-tune phase actually trains, in the precision the bench runs it.
    precision = bench_precision()
    cached = model_rate(config, 3, args.image_size, args.batch_size, "finetune_cached", args.plan["steps"], precision)
    say(
        f"model alone, {args.image_size} px, cached fine-tune phase ({PHASES['finetune_cached']}, {precision}): "
        f"{cached:6.1f} images/s"
    )
    for phase in ("head", "finetune"):
        compute = results.get(("model", args.image_size, phase))
        if compute and f"{phase}_epoch" in results:
            end_to_end, steps = n_images / results[f"{phase}_epoch"], results[f"{phase}_train_rate"]
            say(
                f"  {phase} phase end to end {end_to_end:.1f} images/s = {end_to_end / compute:.0%} of the model's "
                "compute-bound rate"
                + (" (target >= 90%)" if phase == "finetune" else "")
                + f"; its training steps alone {steps:.1f} images/s = {steps / compute:.0%}"
            )
            if phase == "finetune":
                say(
                    f"  finetune phase end to end = {end_to_end / cached:.0%} of the cached phase's own compute-bound "
                    f"rate; its training steps alone {steps / cached:.0%}"
                )


def bench_input(config, args, results: dict) -> None:
    """The feed alone (augmentation, workers) against what the model consumes."""
    from pipeline.bench.rates import feed_rate

    default_workers = config.data.workers
    for size in args.plan["sizes"]:
        for workers in sorted({1, default_workers}):
            rate = feed_rate(config.data, size, workers)
            line = f"input feed alone, {size} px, {workers} worker(s): {rate:6.1f} images/s"
            for phase in ("head", "finetune"):
                consumed = results.get(("model", size, phase))
                if consumed:
                    line += f"; {rate / consumed:.1f}x the {phase} phase's consumption"
            say(line + (" (target >= 3x)" if workers == default_workers else ""))


def bench_checkpoint(config, work: Path, args, results: dict) -> None:
    from pipeline.bench.rates import checkpoint_costs

    epoch, costs = checkpoint_costs(config, work / "checkpoint_cost", args.plan["formats"], args.plan["steps"])
    n_images = count_images(Path(config.data.dir))
    say(f"epoch at {args.image_size} px, whole network: {epoch:.1f} s for {n_images} images")
    for cost in costs:
        mode = "async" if cost["asynchronous"] else "sync "
        detail = (
            f" (snapshot {cost['blocking']:.2f} s + {cost['steps_during']} steps slowed by "
            f"{cost['slowdown']:+.2f} s while the write ran)"
            if cost["asynchronous"]
            else ""
        )
        say(
            f"checkpoint {cost['format']:<14} {mode} {cost['seconds']:5.2f} s = "
            f"{cost['seconds'] / epoch:6.1%} of an epoch{detail} (target <= 5%)"
        )


def bench_backbones(config, args, results: dict) -> None:
    """Each backbone's training rate, one after the other in this process: the head phase (base frozen)
    and the whole network (the fine-tune phase from scratch), on in-memory tensors."""
    from dataclasses import replace

    from pipeline.backbones import BACKBONES
    from pipeline.bench.rates import model_rate

    for name in BACKBONES:
        cfg = replace(config, model=replace(config.model, name=name))
        rates = {
            phase: model_rate(cfg, 3, args.image_size, args.batch_size, phase, args.plan["steps"])
            for phase in ("head", "whole")
        }
        results[("backbone", name)] = rates
        say(
            f"backbone {name:<18} {args.image_size} px: head phase {rates['head']:6.1f} images/s, whole network "
            f"{rates['whole']:6.1f} images/s (model alone, in-memory tensors)"
        )


def main(argv=None) -> int:
    args = parse_args(argv)
    from pipeline.quiet import import_tensorflow_quietly

    import_tensorflow_quietly()
    from pipeline.train import configure_tensorflow

    started = time.time()
    results: dict = {}
    with tempfile.TemporaryDirectory(prefix="bench-") as scratch:
        work = args.work or Path(scratch)
        data_dir = prepare_data(work, args.plan["per_class"])
        config = bench_config(data_dir, args)
        args.base = None
        if not args.from_scratch and {"runs", "startup"} & set(args.only):
            from pipeline.bench.pretrained_base import pretrained_base

            say("pretraining the bench's base (whole network, 2 of the sample classes, another seed) ...")
            args.base = pretrained_base(work, args.image_size, args.base_epochs)
        configure_tensorflow(config)  # the pipeline's defaults (op determinism), as its runs have them
        say(f"bench: {'quick' if args.quick else 'full'}, data {data_dir}, {os.cpu_count()} cores")
        if "runs" in args.only:
            bench_runs(data_dir, work, args, results)
        if "model" in args.only:  # right after the runs, so the share compares like with like
            bench_model(config, args, results)
        if "input" in args.only:
            bench_input(config, args, results)
        if "startup" in args.only:
            bench_startup(data_dir, work, args, results)
        if "checkpoint" in args.only:
            bench_checkpoint(config, work, args, results)
        if "backbones" in args.only:
            bench_backbones(config, args, results)
    if "check" in args.only:
        from pipeline.bench.check_speed import report_check_speed

        report_check_speed()
    say(f"bench done in {time.time() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
