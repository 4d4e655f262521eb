"""Unreadable images: the list of those met (`BadImageLog`) and the dataset behaviour that
replaces one by the next readable image (`ReplacesUnreadable`), shared by every kind of dataset
that reads image files (image folders, CSV file lists)."""
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
            from torchvision.datasets.folder import default_loader

            def still_unreadable(split, image):
                return _file_still_unreadable(image, default_loader)
        kept, seen = [], set()
        for line in cls(path).entries():
            split, image, _ = cls.parse(line)
            if (split, image) in seen:
                continue
            seen.add((split, image))
            if still_unreadable(split, image):
                kept.append(line if line.startswith(f"{split}\t") else f"{split}\t{line}")
        from util.atomic import atomic_write_text
        root, ext = os.path.splitext(path)
        os.replace(path, f"{root}.previous{ext}")
        if kept:
            atomic_write_text(path, "".join(k + "\n" for k in kept))
        return sorted(cls.parse(k)[:2] for k in kept)


def summary(log):
    """The end of a run's last line about its unreadable images ("" when there were none)."""
    found = log.found() if log is not None and log.path else []
    if not found:
        return ""
    n_val = sum(split == "val" for split, _ in found)
    return (f"; {len(found)} unreadable image{'s' if len(found) != 1 else ''} replaced "
            f"({n_val} in validation), listed in {log.path}")


def _load(loader, path, transform=None):
    """The image, decoded now: PIL opens lazily, so a damaged file fails here, not in a transform.
    With --jpeg_draft the transform decodes it itself (util/data/decode.py): the image stays
    undecoded here, and a decoding error is an UnreadableImage from the transform."""
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
