"""Data: scan an ImageFolder tree, read images safely, and feed them to the model.

Images are decoded once, before training starts. Each one is resized so that its shorter side is
`resize_size` (256 for a 224 crop) and kept in memory as uint8. Training crops and flips from that
cache; validation and prediction take the centre crop (the transforms are presets.py's). Files that
cannot be used are found in this first pass and listed, instead of failing halfway through an epoch.
"""

import hashlib
import math
import os
import signal
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .cli import RunInterrupted, UserError
from .distributed import processes_on_this_machine
from .files import check_image_folder, sha256_of
from .groups import read_groups

# Reading and preprocessing images needs no torch: they live in images.py, for the torch-free grader,
# and are re-exported here for the rest of the package.
from .images import (  # noqa: F401
    IMAGE_EXTENSIONS,
    NOT_REGULAR,
    UnreadableImage,
    _is_utf8,
    _to_rgb,
    files_under,
    is_image_file,
    is_regular_file,
    load_image,
    preprocess,
    resize_shorter_side,
    to_chw,
)
from .metrics import check_remission_grade
from .presets import resize_size_for
from .progress import progress


@dataclass
class ImageSet:
    """The images found under a data folder, in class order."""

    root: Path
    class_names: list
    paths: list  # Path of each usable image
    labels: list  # class index of each image
    skipped: list = field(default_factory=list)  # (path, reason) of each file not used
    images: list = None  # decoded uint8 CHW tensors, or None when streaming from disk
    digests: list = None  # SHA-256 of each usable file, taken when it is decoded

    def fingerprint(self):
        """One SHA-256 of every usable image's path and content (after read_images): a resumed run checks its
        data against it."""
        lines = sorted(f"{self.relpath(i)}\0{digest}\n" for i, digest in enumerate(self.digests))
        return hashlib.sha256("".join(lines).encode()).hexdigest()

    def relpath(self, i):
        return self.paths[i].relative_to(self.root).as_posix()

    def class_counts(self):
        return np.bincount(self.labels, minlength=len(self.class_names)).tolist()


# ----------------------------------------------------------------------------- reading images


def read_resized(path, resize_size):
    """Load an image and resize its shorter side to resize_size: a uint8 tensor of shape (3, H, W)."""
    return torch.from_numpy(to_chw(resize_shorter_side(load_image(path), resize_size)))  # PIL resize, antialiased


# ----------------------------------------------------------------------------- scanning a folder


def _class_folders(root, class_order):
    root = check_image_folder(root)
    folders = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        raise UserError(
            f"the data folder '{root}' has no class sub-folders; put the images in '{root}/<grade>/<image>' with "
            "one sub-folder per grade."
        )
    if class_order:
        missing = [name for name in class_order if name not in folders]
        if missing:
            raise UserError(
                f"--class-order names {', '.join(missing)}, which is not a sub-folder of '{root}' (found: "
                f"{', '.join(folders)})."
            )
        if len(set(class_order)) != len(class_order):
            raise UserError("--class-order lists a class twice; list each class once, in grade order.")
        unused = [name for name in folders if name not in class_order]
        if unused:
            raise UserError(
                f"--class-order leaves out the sub-folder(s) {', '.join(unused)} of '{root}'; list every class, in "
                "grade order."
            )
        folders = list(class_order)
    return root, folders


def scan_folder(root, class_order=None):
    """List the candidate images of an ImageFolder tree: root/<class>/[sub-folders/]<image>.

    Files whose names do not end in an image extension are skipped with a reason. A class folder
    with no image files is reported and left out if it sorts before or after all the others (an
    empty grade in between is an error); at least two classes must remain.
    """
    root, folders = _class_folders(root, class_order)
    class_names, paths, labels, skipped, empty = [], [], [], [], []
    for name in folders:
        images = []
        for path in files_under(root / name):
            if not _is_utf8(path):  # e.g. Latin-1 bytes from an old export: CSV and JSON outputs need UTF-8
                skipped.append(
                    (
                        Path(os.fsencode(path).decode("utf-8", "replace")),
                        "the file name is not valid UTF-8; rename the file",
                    )
                )
            elif not is_regular_file(path):  # a pipe named x.jpg would block the first open() for ever
                skipped.append((path, NOT_REGULAR))
            elif is_image_file(path):
                images.append(path)
            else:
                skipped.append((path, "not an image file (by its extension)"))
        if not images:
            empty.append(name)
            continue
        labels += [len(class_names)] * len(images)
        class_names.append(name)
        paths += images
    if empty and class_order:
        raise UserError(
            f"the class folder(s) {', '.join(empty)} in '{root}' hold no images; add images or leave the class out "
            "of --class-order."
        )
    if len(class_names) < 2:
        detail = f" (empty: {', '.join(empty)})" if empty else ""
        raise UserError(
            f"'{root}' has images for only {len(class_names)} "
            f"{'class' if len(class_names) == 1 else 'classes'}{detail}; a classifier needs at least two grades "
            "with images."
        )
    inner = [name for name in empty if class_names[0] < name < class_names[-1]]  # folders are in sorted order here
    if inner:
        below, above = max(n for n in class_names if n < inner[0]), min(n for n in class_names if n > inner[0])
        raise UserError(
            f"the class folder '{inner[0]}' in '{root}' holds no images, and leaving out a grade between '{below}' "
            f"and '{above}' would make QWK and MAE count those two as neighbours; add its images, or remove the "
            "folder to grade on a scale without it."
        )
    return ImageSet(root, class_names, paths, labels, skipped), empty


def estimate_cache_bytes(paths, resize_size):
    """Bytes needed to hold every image resized to resize_size on its shorter side, from the headers alone."""
    total = 0
    for path in paths:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                with Image.open(path) as image:
                    w, h = image.size
        except Exception:  # unreadable files are reported by the decode pass
            continue
        short, long = min(w, h), max(w, h)
        total += 3 * resize_size * math.ceil(long * resize_size / max(short, 1))
    return total


def available_memory_bytes():
    """Memory the process could still use, from /proc/meminfo where present."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 8 * 1024**3


def read_images(image_set, resize_size, keep, stop=None):
    """Decode every image once. Keep the resized uint8 tensors when keep is True.

    Files that fail to decode move from image_set.paths to image_set.skipped with the reason.
    stop() is polled between images so that Ctrl-C stops a long scan promptly.
    """
    paths, labels, images, digests = [], [], [], []
    for path, label in zip(progress(image_set.paths, "reading images", "images"), image_set.labels):
        if stop is not None and stop():
            break
        try:
            image = read_resized(path, resize_size)
        except UnreadableImage as error:
            image_set.skipped.append((path, str(error)))
            continue
        try:
            digest = sha256_of(path)  # from the page cache, just read
        except OSError as error:  # gone or locked between the decode and this read
            image_set.skipped.append((path, f"cannot be read ({error.strerror or error})"))
            continue
        paths.append(path)
        labels.append(label)
        digests.append(digest)
        if keep:
            images.append(image)
    image_set.paths, image_set.labels, image_set.digests = paths, labels, digests
    image_set.images = images if keep else None
    return image_set


# ----------------------------------------------------------------------------- datasets and loaders


class ImageDataset(torch.utils.data.Dataset):
    """Items of an ImageSet, from the in-memory cache or, when streaming, from disk."""

    def __init__(self, image_set, indices, transform, resize_size):
        self.image_set = image_set
        self.indices = [int(i) for i in indices]
        self.transform = transform
        self.resize_size = resize_size

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, key):
        item, seed = key if isinstance(key, tuple) else (key, None)
        i = self.indices[item]
        if self.image_set.images is not None:
            image = self.image_set.images[i]
        else:
            image = read_resized(self.image_set.paths[i], self.resize_size)
        if seed is None:
            return self.transform(image), self.image_set.labels[i]
        with torch.random.fork_rng(devices=[]):  # the transforms draw from the global CPU generator
            torch.default_generator.manual_seed(seed)
            return self.transform(image), self.image_set.labels[i]


class FeatureViews(torch.utils.data.Dataset):
    """Precomputed backbone features of several views (V x N x D); each item is one view, drawn at random."""

    def __init__(self, views, labels):
        self.views = views
        self.labels = labels

    def __len__(self):
        return self.views.shape[1]

    def __getitem__(self, key):
        i, seed = key
        view = int(torch.randint(len(self.views), (), generator=torch.Generator().manual_seed(seed)))
        return self.views[view, i], self.labels[i]


class SeededSampler(torch.utils.data.Sampler):
    """(index, seed) pairs: every training item draws its augmentation from a seed of its own,
    taken from `generator` in the main process, so that a run's random crops are the same with
    any --workers and --cache, and --resume replays them.

    With several processes (rank of world_size), every process draws the same permutation and seeds
    and takes every world_size-th pair from its rank, so that the processes' batches together are
    the batch one process would take; the permutation is padded from its start to a multiple of
    world_size, so every process takes as many steps."""

    def __init__(self, sampler, generator, rank=0, world_size=1):
        self.sampler = sampler
        self.generator = generator
        self.rank, self.world_size = rank, world_size

    def __len__(self):
        return math.ceil(len(self.sampler) / self.world_size)

    def __iter__(self):
        indices = list(self.sampler)
        seeds = torch.randint(2**62, (len(indices),), generator=self.generator).tolist()
        pairs = list(zip(indices, seeds))
        pairs += pairs[: len(self) * self.world_size - len(pairs)]
        return iter(pairs[self.rank :: self.world_size])


def default_workers(cached, device):
    """Loader processes that suit the device: none for cached images on a CPU, whose cores the
    model needs (1 worker made training 0.5x as fast on 2 cores: BENCHMARKS.md), else up to 4."""
    if cached and device.type == "cpu":
        return 0
    return min(4, max(1, (os.cpu_count() or 2) - 1))


def make_loader(dataset, batch_size, workers, runtime, shuffle=False, generator=None, sampler=None):
    """A training loader (shuffle or a sampler) hands the dataset (index, seed) pairs: SeededSampler,
    which gives each of several processes its share of every epoch."""
    if sampler is None and shuffle:
        sampler = torch.utils.data.RandomSampler(dataset, generator=generator)
    if sampler is not None:
        sampler = SeededSampler(sampler, generator, runtime.rank, runtime.world_size)
    return SignalSafeLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=workers,
        pin_memory=runtime.device.type == "cuda",
        # persistent workers skip the loader's per-epoch draw from `generator`: the order would depend on --workers
        persistent_workers=False,
        generator=generator,
        worker_init_fn=_leave_signals_to_the_main_process if workers > 0 else None,
    )


STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM}


class SignalSafeLoader(torch.utils.data.DataLoader):
    """A DataLoader whose worker processes start with Ctrl-C and SIGTERM blocked, until their worker_init_fn
    ignores them: a signal to the process group while an epoch's workers start would otherwise kill a worker
    before it ignores them, and the run would end in a traceback, not stop after its batch. The main process
    holds its own signal for those few milliseconds (a blocked signal waits; it is not lost)."""

    def __iter__(self):
        if self.num_workers == 0 or not hasattr(signal, "pthread_sigmask"):  # Windows starts workers afresh
            return super().__iter__()
        before = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        try:
            return super().__iter__()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, before)


def _leave_signals_to_the_main_process(worker_id):
    """Ctrl-C and SIGTERM reach every process of the group. A worker that died of them would crash
    the run; ignoring them lets the main process stop after the batch and then shut the workers down.
    They were blocked since the worker started (SignalSafeLoader): one that came meanwhile is dropped here."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)


# ----------------------------------------------------------------------------- a run's images


def scan_data(args):
    """The run's images by grade, with the grade names checked (--class-order, --remission-upto): quick, so qq.py
    refuses a wrong layout before its settings banner and any download."""
    image_set, empty = scan_folder(args.data, args.class_order)
    for name in empty:
        print(f"warning: class folder '{name}' holds no images and is ignored.")
    check_remission_grade(args.remission_upto, image_set.class_names)
    return image_set


def read_data(args, stop=None, image_set=None):
    """Decode every image of the data folder (image_set: as scan_data found it) once, into memory when it fits,
    and report what was skipped."""
    image_set = image_set or scan_data(args)
    if args.groups and not args.resume:  # a resumed run takes its groups from its split.csv
        read_groups(args.groups, image_set, before_decoding=True)
    resize = resize_size_for(args.img_size)
    need = estimate_cache_bytes(image_set.paths, resize)
    processes = processes_on_this_machine()  # under torchrun each process keeps its own cache
    keep = args.cache == "ram" or (args.cache == "auto" and need * processes < available_memory_bytes() / 2)
    print(f"reading {len(image_set.paths)} images from {args.data} ...")
    read_images(image_set, resize, keep=keep, stop=stop)
    if stop is not None and stop():
        raise RunInterrupted("stopped while reading the images; nothing was trained, so run qq.py again")
    if keep:
        each = f" in each of {processes} processes" if processes > 1 else ""
        print(f"decoded images cached in memory: {need / 2**20:.0f} MB{each}")
    else:
        print(f"streaming images from disk (cache {args.cache}; decoded they would need {need / 2**30:.1f} GB)")
    if image_set.skipped:
        count = len(image_set.skipped)
        print(f"warning: skipped {count} file(s) that cannot be used (listed in skipped.csv of the run):")
        for path, reason in image_set.skipped:
            print(f"  {path}: {reason}")
    check_class_sizes(image_set)
    grades = ", ".join(f"{n} ({c})" for n, c in zip(image_set.class_names, image_set.class_counts()))
    print(f"classes (grade order): {grades}")
    return image_set


def check_class_sizes(image_set, minimum=2):
    for name, count in zip(image_set.class_names, image_set.class_counts()):
        if count == 0:
            raise UserError(
                f"class '{name}' has no readable images left after skipping bad files; add images to "
                f"'{image_set.root / name}'."
            )
        if count < minimum:
            raise UserError(
                f"class '{name}' has only {count} usable image(s); it needs at least {minimum} so that training "
                "and validation each get one. Add images or remove the folder."
            )
