"""Unreadable images: the list of those met (`BadImageLog`) and the dataset behaviour that
replaces one by the next readable image (`ReplacesUnreadable`), shared by every kind of dataset
that reads image files (image folders, CSV file lists, shards). A sample file that reads but
cannot be used (NaN or infinity in float data, another band count than --in_chans: a
util/data/bands.BadSample) counts as unreadable too."""
import os
import sys

from util.errors import UserError


class BadImageLog:
    """Records unreadable images in `<path>`, one line per image and split for the whole run,
    appended by any worker process or rank: `<split>\t<image path>\t<error>`, split `train` or
    `val` (a replaced validation image biases the accuracy, so it is counted too). An image
    already listed (met again in a later epoch, by another worker, or before a relaunch) is
    neither listed nor warned about again. Lines written before the split column read as train."""

    SPLITS = ("train", "val")

    def __init__(self, path=None, split="train"):
        self.path, self.split = path, split
        self.seen = set()  # (split, image) this process knows to be listed (or warned, without a path)

    def add(self, image_path, err):
        key = (self.split, str(image_path))
        if key in self.seen:
            return
        self.seen.add(key)
        error = " ".join(f"{type(err).__name__}: {err}".split())  # one line, no tabs
        if self.path and not self._append_once(key, error):
            return  # listed, and so warned about, by another process of this run already
        what = "another validation sample" if self.split == "val" else "another sample"
        sys.stderr.write(f"warning: unreadable image {image_path} ({error}); using {what} in its place\n")

    def _append_once(self, key, error):
        """Append the image's line unless the list holds it; the list is locked meanwhile, so
        two workers meeting the same image write one line. Returns whether it was appended."""
        import fcntl
        with open(self.path, "a+") as f:
            fcntl.flock(f, fcntl.LOCK_EX)  # released when the file closes
            f.seek(0)
            if any(self.parse(line.rstrip("\n"))[:2] == key for line in f if line.strip()):
                return False
            f.write(f"{key[0]}\t{key[1]}\t{error}\n")
            return True

    def entries(self):
        if not self.path or not os.path.exists(self.path):
            return []
        with open(self.path) as f:
            return [line.rstrip("\n") for line in f if line.strip()]

    @classmethod
    def parse(cls, line):
        """(split, image path, error) of one line."""
        parts = line.split("\t")
        if len(parts) >= 3 and parts[0] in cls.SPLITS:
            return parts[0], parts[1], "\t".join(parts[2:])
        return "train", parts[0], "\t".join(parts[1:])

    def found(self):
        """The distinct (split, image path) pairs listed, sorted: each epoch meets a bad file again."""
        return sorted({self.parse(e)[:2] for e in self.entries()})

    @classmethod
    def recheck(cls, path, still_unreadable=None):
        """At launch, before any image is read: keep on the list only the images that are still
        unreadable (one line each); fixed or removed ones leave it, so a run stopped by
        --max_bad_images resumes once they are fixed. `still_unreadable(split, image)` says so
        for one entry (default: an image file that exists and does not decode; a dataset's own
        `still_unreadable` knows its names, e.g. `shard.tar:key`). The list as it was is kept
        beside it as `<name>.previous.txt`. Returns the (split, image path) pairs still listed."""
        if not os.path.exists(path):
            return []
        if still_unreadable is None:
            from util.data.bands import BandLoader

            def still_unreadable(split, image):
                return _file_still_unreadable(image, BandLoader())
        kept, seen = [], set()
        for line in cls(path).entries():
            split, image, _ = cls.parse(line)
            if (split, image) in seen:
                continue
            seen.add((split, image))
            if still_unreadable(split, image):
                kept.append(line if line.startswith(f"{split}\t") else f"{split}\t{line}")
        from models.atomic import atomic_write_text
        root, ext = os.path.splitext(path)
        os.replace(path, f"{root}.previous{ext}")
        if kept:
            atomic_write_text(path, "".join(k + "\n" for k in kept))
        return sorted(cls.parse(k)[:2] for k in kept)


def attach_bad_image_log(run_dir, train_set, val_set=None):
    """Unreadable images of a dataset that reads image files (train and val) are logged to
    <run_dir>/bad_images.txt. First rank 0 re-checks the list an earlier launch left
    (BadImageLog.recheck): images fixed since then no longer count, so relaunching after fixing
    them resumes."""
    if not hasattr(train_set, "bad_log"):
        return
    from util import distributed as du
    path = os.path.join(run_dir, "bad_images.txt")

    def still_unreadable(split, image):  # asked of the set the entry came from
        ds = val_set if split == "val" and hasattr(val_set, "still_unreadable") else train_set
        return ds.still_unreadable(image)
    if du.is_main_process():
        BadImageLog.recheck(path, still_unreadable)
    du.barrier()  # no rank reads or appends to the list before the re-check is done
    train_set.bad_log = BadImageLog(path, "train")
    if hasattr(val_set, "bad_log"):
        val_set.bad_log = BadImageLog(path, "val")


def bad_image_counts(train_set, val_set, limit):
    """{"bad_images": distinct unreadable images met (train and val), "bad_val_images": of which
    validation (with a validation set)}, the highest counts of any rank, so all ranks stop
    together; more than `limit` (--max_bad_images) stops the run with the list. Called at each
    log line and at the end of each epoch (after evaluation)."""
    log = getattr(train_set, "bad_log", None)
    if log is None:
        return {"bad_images": 0}
    from util import distributed as du
    found = log.found()  # (split, path) pairs: each epoch meets a bad file again
    n_val = sum(split == "val" for split, _ in found)
    count, n_val = (max(c) for c in zip(*du.all_gather_object((len(found), n_val))))
    if count > limit:
        paths = [p + (" (validation)" if split == "val" else "") for split, p in found]
        more = f" and {len(paths) - 5} more" if len(paths) > 5 else ""
        raise UserError(f"{count} unreadable images (more than --max_bad_images {limit}): "
                        f"{', '.join(paths[:5])}{more}; full list in {log.path}; fix or remove them")
    return {"bad_images": count, **({"bad_val_images": n_val} if hasattr(val_set, "bad_log") else {})}


def bad_image_summary(train_set):
    """The end of a run's last line about its unreadable images ("" when there were none)."""
    log = getattr(train_set, "bad_log", None)
    found = log.found() if log is not None and log.path else []
    if not found:
        return ""
    n_val = sum(split == "val" for split, _ in found)
    return (f"; {len(found)} unreadable image{'s' if len(found) != 1 else ''} replaced "
            f"({n_val} in validation), listed in {log.path}")


def _load(loader, path, transform=None):
    """The sample (util/data/bands.load_bands: an RGB image or a tensor of bands), decoded now:
    PIL opens lazily, so a damaged file fails here, not in a transform. With --jpeg_draft the
    transform decodes a Pillow image itself (util/data/decode.py): it stays undecoded here, and
    a decoding error is an UnreadableImage from the transform."""
    sample = loader(path)
    if getattr(transform, "decodes", False):  # util/data/decode.draft_first's mark
        return sample
    if getattr(loader, "lazy", False):
        return loader.finish(sample)
    sample.load() if hasattr(sample, "load") else None
    return sample


def _file_still_unreadable(path, loader):
    """A listed image file that is still there and still fails to decode (removed ones leave the list)."""
    return os.path.exists(path) and not _readable(path, loader)


def _readable(path, loader):
    try:
        _load(loader, path)
        return True
    except Exception:
        return False


class ReplacesUnreadable:
    """For a dataset with `samples` ((image path, target) pairs), `loader` and `transform`:
    an unreadable image is replaced by the next readable one and logged to `bad_log` (the run
    directory's list once util/run_context.attach_bad_image_log set it)."""

    bad_log = BadImageLog()

    def still_unreadable(self, name):
        """Whether an image an earlier launch listed is still there and still fails to decode."""
        return _file_still_unreadable(name, self.loader)

    def __getitem__(self, index):
        for attempt in range(len(self.samples)):
            i = (index + attempt) % len(self.samples)
            path, target = self.samples[i]
            try:
                sample = _load(self.loader, path, self.transform)
            except Exception as e:  # corrupt or unreadable file: a user's data, not our fault
                self.bad_log.add(path, e)
                continue
            if self.transform is not None:
                from util.data.decode import UnreadableImage
                try:
                    sample = self.transform(sample)
                except UnreadableImage as e:  # opened, failed to decode in the transform (--jpeg_draft)
                    self.bad_log.add(path, e)
                    continue
            return sample, target
        raise UserError("no readable image in the dataset; check the files under the data path")
