"""The run-folder writer: every file the application writes goes through one of its three ways.

- A *document* (config.yaml, a checkpoint, best.pt, a sweep table or plot, study rows) is replaced
  atomically: written to a temporary file beside it, flushed to disk, renamed over the old one.
  A crash at any moment leaves the old file or the new one, never half of one; the temporary file
  is removed when the write fails.
- A *log* (metrics.jsonl) is appended a whole line at a time. A line a crash cut short is removed
  before the next append (``repair_log``), and a failed append is cut back to where it began, so
  every complete record stays readable with ``json.loads`` per line.
- A *report* (finetune.md, the paper's report.md) is written once: a second report of the same
  run goes to ``name-1.md`` beside the first, which is never overwritten.

Any ``OSError`` of those writes (a full disk, a read-only mount, an I/O error, a folder moved away,
a symbolic link loop) becomes a ``RunFolderError``: a user error (exit status 2) that names the
path, the cause and its fix, what is still whole, and the command that continues the work.
"""

import errno
import os
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Optional, Union

from app.errors import AppError

TMP_MARK = ".tmp-"  # .<name>.tmp-<pid>: a document being written by process <pid>

# errno → (what happened, what fixes it)
CAUSES = {
    errno.ENOSPC: ("the disk is full", "free space on that disk"),
    errno.EDQUOT: ("the disk quota is used up", "free space within your quota"),
    errno.EROFS: ("the file system is read-only", "make it writable or choose another log.out_dir"),
    errno.EACCES: ("permission denied", "make the folder writable or choose another log.out_dir"),
    errno.EPERM: ("operation not permitted", "make the folder writable or choose another log.out_dir"),
    errno.EIO: ("the disk reported an I/O error", "check the disk (dmesg) before writing to it again"),
    errno.ENOENT: (
        "the folder is gone (moved or deleted while the command ran)",
        "put the folder back where it was",
    ),
    errno.ENOTDIR: ("a part of the path is a file, not a folder", "move that file out of the way"),
    errno.EEXIST: ("a part of the path is a file, not a folder", "move that file out of the way"),
    errno.ELOOP: (
        "a symbolic link in the path points back at itself",
        "remove or repair the symbolic link loop",
    ),
}


class RunFolderError(AppError):
    """A file could not be written; the message says why, what is whole and how to go on."""

    def __init__(self, path: Path, error: OSError, whole: str = "", resume: str = ""):
        self.path, self.errno = Path(path), error.errno
        cause, fix = CAUSES.get(error.errno, (error.strerror or str(error), "fix the cause"))
        name = errno.errorcode.get(error.errno, "") if error.errno else ""
        text = f"could not write {path}: {cause}{f' ({name})' if name else ''}. {fix[0].upper()}{fix[1:]}"
        if whole:
            text += f". Still whole: {whole}"
        if resume:
            text += f". Then continue with: {resume}"
        super().__init__(text)


def os_error_in(error: Optional[BaseException]) -> Optional[OSError]:
    """The OSError behind ``error``: itself, or the one it was raised while handling (a write that
    fails inside torch.save surfaces as the zip writer's RuntimeError from its clean-up)."""
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, OSError):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


def replace_atomically(path: Path, write: Callable) -> Path:
    """``write(f)`` into a temporary file beside ``path``, flushed to disk, renamed over ``path``.
    The temporary file is removed whatever the failure (a signal included), also from a folder
    moved away meanwhile: it is removed through a handle on the folder itself."""
    tmp = path.with_name(f".{path.name}{TMP_MARK}{os.getpid()}")
    folder = os.open(path.parent, os.O_RDONLY)
    try:
        try:
            with open(tmp, "wb") as f:
                write(f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            try:
                if os.unlink in os.supports_dir_fd:
                    os.unlink(tmp.name, dir_fd=folder)
                else:
                    tmp.unlink()
            except OSError:
                pass  # never created
            raise
        try:  # make the rename itself durable
            os.fsync(folder)
        except OSError:
            pass  # some file systems cannot fsync a folder; the rename is still atomic
    finally:
        os.close(folder)
    return path


def _as_bytes(content: Union[str, bytes]) -> bytes:
    return content.encode("utf-8") if isinstance(content, str) else content


class RunFolder:
    """The folder one command writes into (a run, the paper's folder, the study results).

    ``resume`` is the command that continues the work after a failed write; ``whole`` describes
    what is still whole (the newest checkpoint). Both may be set once they are known."""

    def __init__(self, path: Union[str, Path], resume: str = "", whole: Optional[Callable[[], str]] = None):
        self.path = Path(path)
        self.resume = resume
        self.whole = whole

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    def error(self, path: Path, cause: OSError) -> RunFolderError:
        whole = ""
        if self.whole is not None:
            try:
                whole = self.whole()
            except OSError:
                whole = ""  # the folder itself is unreadable: say nothing rather than guess
        return RunFolderError(path, cause, whole, self.resume)

    @contextmanager
    def guard(self, path: Path) -> Iterator[None]:
        """Any OSError inside (or behind another error) becomes a RunFolderError for ``path``."""
        try:
            yield
        except RunFolderError:
            raise
        except Exception as error:
            cause = os_error_in(error)
            if cause is None:
                raise
            raise self.error(path, cause) from None

    # ------------------------------------------------------------------------- the three ways
    def write_document(self, name: str, content: Union[str, bytes, Callable]) -> Path:
        """Replace ``name`` atomically with ``content`` (text, bytes, or ``content(f)`` writing
        into a binary file)."""
        return self._replace(self.path / name, content)

    def _replace(self, path: Path, content: Union[str, bytes, Callable]) -> Path:
        write = content if callable(content) else (lambda f: f.write(_as_bytes(content)))
        with self.guard(path):
            self._exists()
            path.parent.mkdir(parents=True, exist_ok=True)  # checkpoints/: under the folder only
            return replace_atomically(path, write)

    def _exists(self) -> None:
        """The folder itself is never made again by a write: one moved away mid-run is an error
        (writing on into a new empty folder at the old path would split the run in two)."""
        if not self.path.is_dir():
            raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), str(self.path))

    def write_report(self, name: str, content: Union[str, bytes, Callable]) -> Path:
        """A new report: ``name``, or ``stem-1.ext``, ``stem-2.ext`` … when it exists (a finished
        report is never overwritten). Returns the path written."""
        path = self.path / name
        n = 0
        while path.exists():
            n += 1
            path = self.path / f"{Path(name).stem}-{n}{Path(name).suffix}"
        if n:
            print(f"note: {self.path / name} exists and is kept; this report is {path.name}")
        return self._replace(path, content)

    def append_line(self, name: str, line: str) -> None:
        """Append one line; a failed append is cut back to the file's former end."""
        path = self.path / name
        data = _as_bytes(line.rstrip("\n") + "\n")
        with self.guard(path):
            self._exists()
            with open(path, "ab") as f:
                start = f.tell()
                try:
                    f.write(data)
                    f.flush()
                except OSError:
                    try:
                        f.truncate(start)
                    except OSError:
                        pass  # repair_log removes the torn line on the next resume
                    raise

    def repair_log(self, name: str) -> int:
        """Cut a last line a crash left without its newline (a torn record); every complete line
        stays. Returns the bytes removed."""
        path = self.path / name
        with self.guard(path):
            if not path.is_file():
                return 0
            with open(path, "rb+") as f:
                data = f.read()
                if not data or data.endswith(b"\n"):
                    return 0
                keep = data.rfind(b"\n") + 1
                f.truncate(keep)
                f.flush()
                os.fsync(f.fileno())
        removed = len(data) - keep
        print(
            f"note: removed a torn last line of {path} ({removed} bytes, cut by a crash mid-write); "
            "every complete record is kept"
        )
        return removed

    # ------------------------------------------------------------------------- checks
    def check_writable(self) -> None:
        """Fail now, not after the long work: create the folder and write and remove a probe."""
        probe = self.path / f".write-probe-{os.getpid()}"
        with self.guard(self.path):
            self.path.mkdir(parents=True, exist_ok=True)
        self._replace(probe, b"probe")
        with self.guard(probe):
            probe.unlink()


def check_output_root(root: Union[str, Path], what: str = "log.out_dir") -> None:
    """The folder new runs are made in can be made and written, before any work: a file in its
    place, a read-only mount or a full disk is named now, with its fix."""
    root = Path(root)
    if root.exists() and not root.is_dir():
        raise AppError(f"{what}={str(root)!r} is a file, not a folder: move it away or choose another {what}")
    RunFolder(root).check_writable()


def python_command() -> str:
    """This interpreter as a user types it in the project folder: ``.venv/bin/python`` for the
    project's environment (where the packages are; a bare ``python`` may lack them or not exist)."""
    executable = Path(sys.executable)
    try:
        return str(executable.relative_to(Path.cwd()))
    except ValueError:
        return str(executable)


def resume_command(run_dir: Union[str, Path], command: str = "train") -> str:
    """The one place that spells the command continuing the run in ``run_dir`` (``command``: the
    kind of run, train or finetune), runnable as printed; every message that tells how to go on
    uses it."""
    return f"{python_command()} -m app {command} --resume {run_dir}"


def resume_hint(run_dir: Union[str, Path], command: str = "train") -> str:
    """The two ways to resume, one per indented line, as a stopped run prints them: make's (its
    ``train RESUME=`` resumes a fine-tuning run as one too), then the interpreter's own."""
    return f"  make train RESUME={run_dir}\n  {resume_command(run_dir, command)}"


def remove_if_empty(folder: Union[str, Path]) -> None:
    """Remove ``folder`` when it holds nothing (a run folder whose first write failed)."""
    try:
        Path(folder).rmdir()
    except OSError:
        pass  # not empty, or gone already: left as it is
