"""The table that benchmarks/speed.py prints at the end: the machine and its ceiling, the training rows, then
the speed-ups, inference, accuracy and memory. Every number comes from the results, as --json writes them."""

import grading
from machine import describe_cpu_features


def percent(share):
    return "n/a" if share is None else f"{share:.0%}"


def print_table(results, setup):
    """The headline numbers."""
    print_setup(results, setup)
    print_training(results)
    print_speedups(results)
    print_accuracy_and_load(results, setup)


def print_recipes(results, setup):
    """The one line of --recipes: an epoch of each recipe."""
    cost = results["recipes"]
    print(
        f"\n{setup['device_name']}, {describe_cpu_features(setup['cpu_features'])}, {setup['precision']}, "
        f"{cost['images']} images at {setup['img_size']} px: an epoch takes {cost['epoch_s']['seed']:.1f} s with "
        f"--recipe seed and {cost['epoch_s']['endoscopy']:.1f} s with endoscopy ({cost['extra']:+.1%}); others "
        f"used {percent(setup['others_cpu_share'])} of the CPUs"
    )


def print_setup(results, setup):
    """The machine, the images and the ceiling of each precision."""
    ceiling, data_info, gflop = results["ceiling"], results["data"], setup["train_gflop_per_image"]
    print(
        f"\n{setup['device_name']} ({setup['device']}, {setup['threads']} threads), torch {setup['torch']}, "
        f"onnxruntime {setup['onnxruntime']}, {setup['date']}"
    )
    print(
        f"CPU instruction sets: {describe_cpu_features(setup['cpu_features'])}; --precision auto chose "
        f"{setup['precision']} on {setup['device']}"
    )
    print(
        f"{data_info['images']} images ({data_info['train']} train, {data_info['val']} val) at {setup['img_size']} px; "
        f"a training image costs {gflop:.1f} GFLOP ({setup['flop_constant']})"
    )
    for name in ("bf16", "fp32"):
        c = ceiling[name]
        if "skipped" in c:
            print(f"ceiling {name}: not measured, because {c['skipped']}")
            continue
        print(
            f"ceiling {name}: {c['gflop_s']:.0f} GFLOP/s = {c['gflop_s'] / gflop:.1f} training img/s "
            f"(matmul {c['matmul_gflop_s']:.0f}, 3x3 convolution {c['conv_gflop_s']:.0f} GFLOP/s)"
        )


def print_training(results):
    """A row per training (the project, in fp32 too, and the baseline): whole epochs, then steps alone."""
    project, baseline = results["project"], results["baseline"]
    print(
        f"\n{'training':<34}{'img/s':>7}{'GFLOP/s':>9}{'of bf16':>9}{'of fp32':>9}{'epoch s':>9}"
        f"{'s/800 img':>10}{'val acc':>9}{'peak RSS':>10}{'others':>8}"
    )
    rows = [(f"project {project['precision']} b{project['batch_size']} w{project['workers']}", project)]
    if "project_fp32" in results:
        rows.append((f"project fp32 b{results['project_fp32']['batch_size']}", results["project_fp32"]))
    rows.append(("baseline fp32 b4 w4", baseline))
    for name, part in rows:
        w = part["whole_epochs"]
        print(
            f"{name + ', epochs':<34}{w['images_per_s']:>7.1f}{w['gflop_s']:>9.0f}"
            f"{percent(w['of_bf16_ceiling']):>9}{percent(w['of_fp32_ceiling']):>9}"
            f"{w['epoch_s']:>9.1f}{w['epoch_s_per_800_images']:>10.1f}{w['val_acc']:>9.3f}{part['part']['peak_rss_mb']:>8.0f}MB"
            f"{percent(part['part']['others_cpu_share']):>8}"
        )
        if "steps_alone" in part:
            s = part["steps_alone"]
            print(
                f"{name + ', steps alone':<34}{s['images_per_s']:>7.1f}{s['gflop_s']:>9.0f}"
                f"{percent(s['of_bf16_ceiling']):>9}{percent(s['of_fp32_ceiling']):>9}"
            )
    print(
        "(epochs: training images / (training + validation s), steady state; baseline: the PyTorch tutorial's "
        "loop, ImageFolder decoding every epoch;\n"
        " others: the share of the CPUs other processes used meanwhile; 0% on a quiet machine)"
    )


def print_speedups(results):
    """The speed-ups over the baseline, the first epoch and the cache, inference, and the time after training."""
    project, baseline, speedup, data_info = results["project"], results["baseline"], results["speedup"], results["data"]
    infer, infer_base = results["inference"]["project"], results["inference"]["baseline"]
    print(
        f"\nspeed-up over the baseline: whole epochs {speedup['whole_epochs']:.2f}x, steps alone "
        f"{speedup['steps_alone']:.2f}x, "
        f"batch-1 inference {speedup['inference_batch1']:.2f}x"
    )
    print(
        f"first epoch (warm-up included): project {project['whole_epochs']['first_epoch_s']:.1f} s, baseline "
        f"{baseline['whole_epochs']['first_epoch_s']:.1f} s; "
        f"decoding into the cache: {data_info['part']['seconds']:.1f} s, {data_info['cache_mb']:.0f} MB"
    )
    print(
        f"inference, batch 1: project ({infer['precision']}) mean {infer['batch1_mean_ms']:.1f} ms, median "
        f"{infer['batch1_median_ms']:.1f} ms per image; "
        f"baseline (fp32) mean {infer_base['batch1_mean_ms']:.1f} ms, median {infer_base['batch1_median_ms']:.1f} ms"
    )
    print(
        f"inference throughput: project at batch {infer['throughput_batch_size']}: "
        f"{infer['throughput_images_per_s']:.1f} img/s"
    )
    grading.print_side_by_side(results["inference"]["side_by_side"])
    grading.print_after_training(results["after_training"])


def print_accuracy_and_load(results, setup):
    """bf16 against fp32, --freeze-backbone, CUDA memory, and how busy other processes kept the CPUs."""
    accuracy, frozen = results["accuracy"], results["frozen_backbone"]
    print(
        f"accuracy after {accuracy['epochs']} epoch(s) on the same {accuracy['val_images']} validation images: "
        f"{accuracy['precision']} {accuracy['val_acc']:.3f} (val loss {accuracy['val_loss']:.4f}), "
        f"fp32 {accuracy['fp32_val_acc']:.3f} (val loss {accuracy['fp32_val_loss']:.4f}); one image = "
        f"{accuracy['one_image']:.3f}"
    )
    print(
        f"--freeze-backbone: {frozen['epochs']} epochs in {frozen['total_s']:.1f} s, {frozen['features_s']:.1f} s "
        "of it computing the features "
        f"({frozen['total_s_per_800_images']:.1f} s per 800 images); val acc {frozen['val_acc']:.3f}"
    )
    cuda = [
        f"{name} {part['part']['cuda_peak_allocated_mb']:.0f} MB"
        for name, part in (("project", results["project"]), ("baseline", results["baseline"]))
        if "cuda_peak_allocated_mb" in part["part"]
    ]
    if cuda:
        print("peak CUDA memory allocated: " + ", ".join(cuda))
    print(f"other processes used {percent(setup['others_cpu_share'])} of the CPUs during the benchmark")
