"""Kill a real `griffin export` process while it writes, and fill its disk: nothing is left
under the target name, no temporary survives the next run, and a replaced export survives
until its successor is complete.

The export runs in a subprocess writing many small shards (--max-shard-size 8KB), so the
write takes long enough to catch: the test polls the temporary directory, freezes the process
with SIGSTOP at the chosen point (proving it is mid-write), then delivers the signal.
"""

from __future__ import annotations

import contextlib
import os
import resource
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from griffin_export.formats.verify import verify_export

from tiny import save_tiny

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="POSIX signals and rlimits")

CLI = [sys.executable, "-c", "from griffin_cli.main import run; run()"]


@pytest.fixture(scope="module")
def src(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # 16 layers make ~50 shards of 8KB: kill points (at most 10) leave a wide margin even when
    # the test process is descheduled on a loaded machine.
    return save_tiny("llama", tmp_path_factory.mktemp("interrupt") / "src", num_hidden_layers=16)


def command(src: Path, out: Path, *extra: str) -> list[str]:
    args = ["export", "--model", str(src), "--prompt-text", "Rain falls on the hills."]
    return [*CLI, *args, "--out", str(out), "--max-shard-size", "8KB", *extra]


def temporaries(out: Path) -> list[Path]:
    return [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.griffin-")]


def files_in_temporary(out: Path) -> list[str]:
    names: list[str] = []
    for tmp in temporaries(out):
        with contextlib.suppress(FileNotFoundError):
            names += os.listdir(tmp)
    return names


def stop_when(
    proc: subprocess.Popen[bytes], ready: Callable[[], bool], timeout: float = 300
) -> None:
    """SIGSTOP ``proc`` as soon as ``ready()`` holds (polled every ~0.2 ms)."""
    deadline = time.monotonic() + timeout
    while not ready():
        if proc.poll() is not None:
            pytest.fail(f"export finished before the kill point (rc {proc.returncode})")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail("kill point not reached in time")
        time.sleep(0.0002)
    if proc.poll() is None:  # a ready() that accepts completion may have reaped it already
        os.kill(proc.pid, signal.SIGSTOP)


def deliver(proc: subprocess.Popen[bytes], signum: int) -> int:
    if proc.poll() is not None:  # finished before the kill point (only kill point 4 allows it)
        return proc.returncode
    os.kill(proc.pid, signum)
    if signum != signal.SIGKILL:
        os.kill(proc.pid, signal.SIGCONT)
    return proc.wait(timeout=120)


def _default_signals() -> None:
    """Give the child default SIGINT/SIGTERM handling: a disposition of SIG_IGN (set by
    anything in the test process, or by a CI runner) would be inherited, and Python keeps an
    ignored SIGINT ignored, so the interrupt under test would never arrive."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def shards_written(out: Path, n: int) -> Callable[[], bool]:
    return lambda: sum(name.startswith("model-") for name in files_in_temporary(out)) >= n


@pytest.mark.parametrize(
    ("signum", "kill_point"),
    [
        (signal.SIGINT, 1),  # Ctrl-C after the first shard
        (signal.SIGTERM, 6),  # `kill` halfway through the shards
    ],
    ids=["SIGINT", "SIGTERM"],
)
def test_interrupt_cleans_up_at_once(
    src: Path, tmp_path: Path, signum: int, kill_point: int
) -> None:
    out = tmp_path / "out"
    proc = subprocess.Popen(
        command(src, out),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        preexec_fn=_default_signals,
    )
    stop_when(proc, shards_written(out, kill_point))
    assert not out.exists() and temporaries(out)  # frozen mid-write
    rc = deliver(proc, signum)
    assert rc != 0
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # nothing, not even a temporary
    assert b"Traceback" not in (proc.stderr.read() if proc.stderr else b"")


def test_sigkill_leaves_nothing_under_the_name_and_the_next_run_sweeps(
    src: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    # Kill point 1: while loading (before anything is written).
    proc = subprocess.Popen(
        command(src, out), stdout=subprocess.DEVNULL, preexec_fn=_default_signals
    )
    time.sleep(0.5)
    deliver(proc, signal.SIGKILL)
    assert list(tmp_path.iterdir()) == []
    # Kill point 2: in the middle of the shards.
    proc = subprocess.Popen(
        command(src, out), stdout=subprocess.DEVNULL, preexec_fn=_default_signals
    )
    stop_when(proc, shards_written(out, 4))
    deliver(proc, signal.SIGKILL)
    assert not out.exists()
    assert len(temporaries(out)) == 1  # SIGKILL runs no cleanup: the next run does it

    done = subprocess.run(command(src, out), capture_output=True, timeout=300)
    assert done.returncode == 0, done.stderr.decode()
    assert temporaries(out) == []
    assert verify_export(out).ok


def test_sigkill_during_force_replacement_keeps_a_complete_export(
    src: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    first = subprocess.run(command(src, out, "--ratio", "0.25"), capture_output=True, timeout=300)
    assert first.returncode == 0, first.stderr.decode()
    before = (out / "griffin.json").read_text()

    # Kill point 3: the last shard written; the old export must still be there, untouched.
    proc = subprocess.Popen(
        command(src, out, "--ratio", "0.5", "--force"), stdout=subprocess.DEVNULL
    )
    stop_when(proc, shards_written(out, 10))
    assert (out / "griffin.json").read_text() == before
    deliver(proc, signal.SIGKILL)
    assert (out / "griffin.json").read_text() == before
    assert verify_export(out).ok

    # Kill point 4: the manifest is in the temporary, the swap is imminent (or just done):
    # whichever export is under the name is complete.
    proc = subprocess.Popen(
        command(src, out, "--ratio", "0.5", "--force"), stdout=subprocess.DEVNULL
    )
    stop_when(proc, lambda: "griffin.json" in files_in_temporary(out) or proc.poll() is not None)
    deliver(proc, signal.SIGKILL)
    assert verify_export(out).ok

    done = subprocess.run(command(src, out, "--force"), capture_output=True, timeout=300)
    assert done.returncode == 0, done.stderr.decode()
    assert temporaries(out) == [] and verify_export(out).ok


def _small_file_limit() -> None:
    """Child-side setup: files may not grow past 20 kB, and exceeding it fails the write
    (EFBIG) instead of killing the process - how a full disk looks to the writer."""
    resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000))
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)


def test_write_error_is_reported_and_leaves_nothing(src: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    cmd = [arg for arg in command(src, out) if arg not in ("--max-shard-size", "8KB")]
    done = subprocess.run(cmd, capture_output=True, timeout=300, preexec_fn=_small_file_limit)
    stderr = done.stderr.decode()
    assert done.returncode == 1, stderr
    assert "Traceback" not in stderr
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1
    assert f"writing the export to '{out}' failed" in errors[0]
    assert "free disk space or choose another --out" in errors[0]
    assert list(tmp_path.iterdir()) == []
