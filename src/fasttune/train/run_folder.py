"""The run folder (`train.output_dir`): one run at a time, nothing of an older run mixed in, nothing written outside.

- `RunLock`: an exclusive `fcntl.flock` on `<output_dir>/.fasttune.lock` for the run's life, and a record in it
  (pid, host, start time) so that a refused second run can say who holds the folder. The kernel drops a flock when
  its process dies, so a record left by a process that no longer holds the lock is stale: taken over with a warning.
- `prepare`: under the lock, refuses a folder that holds a previous run unless the run resumes it or overwrites it
  (which deletes the previous run's outputs first), refuses symbolic links where fasttune writes, and removes
  temporary folders left by killed runs (only those whose writer process is dead).
- `replace_dir` / `write_text`: folders and files are written under a temporary name and renamed into place, so
  a crash never leaves a half-written adapter or config, and a rename replaces a symlink instead of following it.
"""
from __future__ import annotations

import errno
import json
import os
import re
import shutil
import socket
import sys
import time
from pathlib import Path

LOCK_NAME = ".fasttune.lock"
# what a run writes into its folder (and --overwrite deletes); the first three mark the folder as used
RUN_OUTPUTS = ("metrics.jsonl", "checkpoints", "adapter", "config.yaml", "loss.png", "tensorboard")
# temporary names: `.<name>.tmp-<pid>` while written, `.<name>.old-<pid>` while an old copy is moved aside
_TEMP = re.compile(r"\.(?P<name>.+)\.(?P<kind>tmp|old)-(?P<pid>\d+)")


class RunFolderError(RuntimeError):
    """The run folder cannot be used as asked (in use, holds another run, unsafe): the message says what to do."""


class RunFolderBusy(RunFolderError):
    pass


# ---- the lock ------------------------------------------------------------------------------------------------

def pid_alive(pid: int) -> bool:
    """Whether a process with this id exists on this host (a process of another user counts)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _describe(record: dict) -> str:
    if not record:
        return "a process that has not written its record yet"
    return f"pid {record.get('pid')} on host {record.get('host')}, started {record.get('started')}"


class RunLock:
    """Exclusive lock on a run folder; `acquire()` raises RunFolderBusy naming the holder. Also a context manager."""

    def __init__(self, output_dir: str | os.PathLike):
        self.output_dir = Path(output_dir)
        self.path = self.output_dir / LOCK_NAME
        self.fd: int | None = None

    def _read(self, fd: int) -> dict:
        try:
            raw = os.pread(fd, 4096, 0)
            return json.loads(raw) if raw.strip() else {}
        except (OSError, ValueError):
            return {"pid": "?", "host": "?", "started": "? (unreadable lock record)"}

    def _busy(self, holder: dict) -> RunFolderBusy:
        return RunFolderBusy(f"{self.output_dir} is in use by another fasttune run ({_describe(holder)}); wait for "
                             "it to finish, or set another train.output_dir")

    def acquire(self) -> "RunLock":
        import fcntl

        self.output_dir.mkdir(parents=True, exist_ok=True)
        try:  # O_NOFOLLOW: a symlink planted as the lock file is refused, never written through
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise RunFolderError(f"{self.path} is a symbolic link; fasttune does not write through links in "
                                     "a run folder: remove it") from None
            raise RunFolderError(f"cannot create the lock file {self.path}: {e.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                os.close(fd)
                raise RunFolderError(f"cannot lock {self.path}: {e.strerror}") from None
            holder = self._read(fd)
            os.close(fd)
            raise self._busy(holder) from None
        previous = self._read(fd)
        if previous:  # a released lock is emptied: a record here was left by a run that died holding it
            alive = isinstance(previous.get("pid"), int) and previous.get("host") == socket.gethostname() \
                and pid_alive(previous["pid"])
            print(f"fasttune: warning: taking over the stale lock of {self.output_dir} left by "
                  f"{_describe(previous)}" + (" (a process with that id runs but does not hold the lock)"
                                              if alive else ", which is no longer running"), file=sys.stderr)
        record = {"pid": os.getpid(), "host": socket.gethostname(),
                  "started": time.strftime("%Y-%m-%d %H:%M:%S %z"), "argv": " ".join(sys.argv)[:200]}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(record).encode(), 0)
        self.fd = fd
        return self

    def check_free(self) -> None:
        """Raise RunFolderBusy if another process holds the lock now (takes nothing: a check before a long load)."""
        import fcntl

        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_NOFOLLOW)
        except OSError:
            return  # no lock file (or a link, which acquire() refuses): nobody holds it
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            raise self._busy(self._read(fd)) from None
        finally:
            os.close(fd)  # closing drops a shared lock taken here

    def release(self) -> None:
        """Empty the record (so the next run does not take it for a stale lock), then unlock. The file stays:
        unlinking it would let a waiting process lock a file that a third one no longer sees."""
        import fcntl

        if self.fd is None:
            return
        try:
            os.ftruncate(self.fd, 0)
            fcntl.flock(self.fd, fcntl.LOCK_UN)
        finally:
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


# ---- what a run may find in its folder -------------------------------------------------------------------------

def used_outputs(output_dir: str | os.PathLike) -> list[str]:
    """The outputs of a previous run found in `output_dir` (empty: a fresh folder)."""
    d = Path(output_dir)
    return [name for name in RUN_OUTPUTS if os.path.lexists(d / name)]


def check_no_links(output_dir: str | os.PathLike) -> None:
    """Refuse symbolic links where a run writes (its outputs and the checkpoint / TensorBoard folders' entries):
    writing through one would put metrics, configs or weights wherever the link points. `output_dir` itself may be a
    link (a run folder on another disk)."""
    d = Path(output_dir)
    candidates = [d / n for n in RUN_OUTPUTS]
    for sub in ("checkpoints", "tensorboard", "adapter"):
        if (d / sub).is_dir() and not (d / sub).is_symlink():
            candidates += sorted((d / sub).iterdir())
    for p in candidates:
        if p.is_symlink():
            raise RunFolderError(f"{p} is a symbolic link (to {os.readlink(p)}); fasttune does not write through "
                                 "links in a run folder: remove the link, or set another train.output_dir")


def remove_stale_temp_dirs(folder: str | os.PathLike) -> list[Path]:
    """Remove `.<name>.tmp-<pid>` folders and files (and `.<name>.old-<pid>` copies moved aside) left in `folder` by a writer
    that was killed: only those whose pid is dead. An aside copy whose `<name>` is missing is the only complete
    copy (a crash between the two renames of `replace_dir`): it is renamed back instead. Returns what was removed."""
    folder = Path(folder)
    removed = []
    if not folder.is_dir():
        return removed
    for p in sorted(folder.iterdir()):
        m = _TEMP.fullmatch(p.name)
        if not m or pid_alive(int(m.group("pid"))):
            continue
        if p.is_symlink() or not p.is_dir():  # a temporary file (write_text) or a link: only the name goes
            if m.group("kind") == "tmp":
                p.unlink()
                removed.append(p)
            continue
        final = folder / m.group("name")
        if m.group("kind") == "old" and not os.path.lexists(final):
            os.replace(p, final)
            continue
        shutil.rmtree(p, ignore_errors=True)
        removed.append(p)
    return removed


def find_resume(output_dir: str | os.PathLike, resume) -> Path | None:
    """The checkpoint to resume from: `resume` True means the newest in output_dir, a path means that folder."""
    from . import checkpoint as ckpt

    if not resume:
        return None
    if resume is True:
        path = ckpt.latest_checkpoint(output_dir)
        if path is None:
            raise RunFolderError(f"--resume: there is no checkpoint in {ckpt.checkpoint_root(output_dir)} to resume "
                                 "from; run without --resume to start a new run (or pass --resume CHECKPOINT_DIR)")
        return path
    path = Path(resume)
    if not (path / "trainer_state.json").is_file():
        raise RunFolderError(f"--resume {path}: not a fasttune checkpoint folder (no trainer_state.json); pass a "
                             f"checkpoints/step-N folder, or --resume alone for the newest one in {output_dir}")
    return path


def check_start(output_dir: str | os.PathLike, *, resume: bool, overwrite: bool) -> None:
    """The read-only part of `prepare` (also run before the model is loaded, to fail fast)."""
    if resume and overwrite:
        raise RunFolderError("--resume and --overwrite contradict each other: resume continues the run in "
                             f"{output_dir}, overwrite deletes it; pass one")
    d = Path(output_dir)
    if d.exists() and not d.is_dir():
        raise RunFolderError(f"train.output_dir {d} is a file, not a folder; set another train.output_dir")
    if not d.is_dir():
        return
    RunLock(d).check_free()
    _check_contents(d, resume=resume, overwrite=overwrite)


def _check_contents(d: Path, *, resume: bool, overwrite: bool) -> None:
    check_no_links(d)
    used = used_outputs(d)
    if used and not resume and not overwrite:
        raise RunFolderError(f"{d} already holds a run ({', '.join(used)}); continue it with --resume, start "
                             "over with --overwrite (deletes those), or set another train.output_dir")


def prepare(output_dir: str | os.PathLike, *, resume: bool, overwrite: bool) -> RunLock:
    """Lock the run folder and make it ready (see the module docstring); the caller releases the returned lock."""
    if resume and overwrite:
        check_start(output_dir, resume=resume, overwrite=overwrite)  # raises
    lock = RunLock(output_dir).acquire()
    try:
        d = Path(output_dir)
        _check_contents(d, resume=resume, overwrite=overwrite)
        if overwrite:
            for name in RUN_OUTPUTS:
                p = d / name
                if p.is_dir():
                    shutil.rmtree(p)
                elif os.path.lexists(p):
                    p.unlink()
        remove_stale_temp_dirs(d)
        _remove_stale_checkpoint_temps(d)
    except BaseException:
        lock.release()
        raise
    return lock


def _remove_stale_checkpoint_temps(output_dir: Path) -> None:
    """Temporary checkpoint folders of killed runs: `.tmp-step-N-<pid>` (dead pid) and the sharded writers'
    `.tmp-step-N-sharded` (no pid: stale whenever this process holds the lock, as only a locked run writes them)."""
    from . import checkpoint as ckpt

    root = ckpt.checkpoint_root(output_dir)
    if not root.is_dir():
        return
    for p in root.iterdir():
        if not p.name.startswith(ckpt.TMP_PREFIX) or p.is_symlink() or not p.is_dir():
            continue
        owner = p.name.rsplit("-", 1)[-1]
        if owner == "sharded" or (owner.isdigit() and not pid_alive(int(owner))):
            shutil.rmtree(p, ignore_errors=True)


# ---- atomic writes ---------------------------------------------------------------------------------------------

def temp_dir_for(final: str | os.PathLike) -> Path:
    """A fresh temporary folder next to `final` (same filesystem, so the rename is atomic), named after the pid."""
    final = Path(final)
    tmp = final.parent / f".{final.name}.tmp-{os.getpid()}"
    if tmp.is_symlink() or tmp.is_file():
        tmp.unlink()
    elif tmp.exists():
        shutil.rmtree(tmp)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp.mkdir()
    return tmp


def replace_dir(tmp: str | os.PathLike, final: str | os.PathLike, aside: str | os.PathLike | None = None) -> None:
    """Rename the finished folder `tmp` to `final`. An existing `final` is first renamed aside and deleted only
    after the new one is in place, so there is no moment without a complete copy on disk; a crash between the two
    renames leaves the old copy under `aside` (`remove_stale_temp_dirs` renames it back). A symlink at `final` is
    replaced, never followed."""
    tmp, final = Path(tmp), Path(final)
    if os.path.lexists(final):
        aside = Path(aside) if aside is not None else final.parent / f".{final.name}.old-{os.getpid()}"
        if aside.is_dir() and not aside.is_symlink():
            shutil.rmtree(aside)
        elif os.path.lexists(aside):
            aside.unlink()
        os.replace(final, aside)  # a crash from here ...
        os.replace(tmp, final)  # ... to here leaves the complete old copy as `aside`
        if aside.is_dir() and not aside.is_symlink():
            shutil.rmtree(aside, ignore_errors=True)
        else:
            aside.unlink()
    else:
        os.replace(tmp, final)


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write a small file atomically (temporary file + rename): never half-written, and a symlink at `path` is
    replaced rather than written through."""
    path = Path(path)
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.lexists(tmp):
            tmp.unlink()
        raise


# ---- a full disk -----------------------------------------------------------------------------------------------

def is_disk_full(err: BaseException) -> bool:
    """ENOSPC / EDQUOT, or what torch.save says when its zip writer hits a full disk ('unexpected pos',
    'PytorchStreamWriter failed writing')."""
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(err)
    return isinstance(err, (RuntimeError, OSError)) and any(
        s in text for s in ("unexpected pos", "PytorchStreamWriter failed", "No space left on device",
                            "Disk quota exceeded"))
