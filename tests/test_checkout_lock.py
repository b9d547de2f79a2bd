"""One run at a time per checkout (pilamim.checkout_lock), with real processes and real locks.

A holder process takes the checkout and waits; the second run comes through each entrance
(stage command, ``pilamim run``, the flow, ``dvc repro``) and must be refused at once, naming
the holder. What belongs to the holder's run (nested calls, its child processes, the ranks of
one torchrun job) passes, each holding a lock of its own, so a child outlives a killed holder
busy; a SIGKILLed run blocks nothing once all its processes are gone.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pilamim.checkout_lock import (
    EXIT_BUSY,
    TOKEN_ENV,
    CheckoutBusyError,
    hold_checkout,
    lock_path,
    read_holder,
)
from pilamim.config import Params
from pilamim.params_files import dump_params

VENV_BIN = Path(sys.executable).parent
REFUSAL_S = 10.0  # "at once": interpreter start-up plus imports, never a wait for the holder

_HOLDER = """
import sys
from pilamim.checkout_lock import hold_checkout
with hold_checkout():
    print("held", flush=True)
    sys.stdin.read()  # hold until the test closes stdin (or kills us)
"""


def _env(**extra: str) -> dict[str, str]:
    """This environment without any run identity: no inherited token, not a torchrun rank."""
    env = {k: v for k, v in os.environ.items()
           if k not in (TOKEN_ENV, "RANK", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID")}
    return {**env, "PATH": f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}", **extra}


@pytest.fixture
def checkout(tmp_path: Path) -> Path:
    """A tiny checkout: default params files in ``params/``, nothing made yet."""
    dump_params(Params(), tmp_path / "params")
    return tmp_path


@pytest.fixture
def holder(checkout: Path):
    """A separate process holding ``checkout`` until the test ends."""
    proc = subprocess.Popen([sys.executable, "-c", _HOLDER], cwd=checkout, env=_env(),
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    yield proc
    proc.kill()
    proc.wait(10)


def _pilamim(cwd: Path, *args: str, **env: str) -> tuple[subprocess.CompletedProcess, float]:
    """The installed ``pilamim`` command, as a user (or ``dvc repro``) runs it; its seconds."""
    start = time.monotonic()
    done = subprocess.run([str(VENV_BIN / "pilamim"), *args], cwd=cwd, env=_env(**env),
                          capture_output=True, text=True, timeout=60)
    return done, time.monotonic() - start


def _assert_refused(done: subprocess.CompletedProcess, seconds: float, holder_pid: int) -> None:
    assert done.returncode == EXIT_BUSY, done.stderr[-3000:]
    assert f"pid {holder_pid} on host" in done.stderr and "started 20" in done.stderr
    assert "command:" in done.stderr and "the lock frees itself" in done.stderr
    assert "Traceback" not in done.stderr
    assert seconds < REFUSAL_S


def test_a_stage_command_is_refused_at_once_naming_the_holder(checkout, holder):
    done, seconds = _pilamim(checkout, "fetch", "--no-track")
    _assert_refused(done, seconds, holder.pid)
    assert "this checkout" in done.stderr and str(checkout.resolve()) in done.stderr
    assert not (checkout / "data").exists()  # refused before fetching anything


def test_pilamim_run_is_refused_before_prefect_starts(checkout, holder):
    done, seconds = _pilamim(checkout, "run")
    _assert_refused(done, seconds, holder.pid)


def test_read_only_commands_need_no_lock(checkout, holder):
    """Listing models or reading help while a run trains is fine: they write nothing here
    (``promote`` moves an MLflow alias, not a file of the checkout: no lock either)."""
    models, _ = _pilamim(checkout, "models", MLFLOW_TRACKING_URI=f"sqlite:///{checkout}/m.db")
    assert models.returncode != EXIT_BUSY and "busy" not in models.stderr
    helped, _ = _pilamim(checkout, "fetch", "--help")
    assert helped.returncode == 0 and "busy" not in helped.stderr


def test_the_flow_itself_holds_the_checkout(checkout, holder, monkeypatch):
    """Deployments call the flow without the CLI: the flow takes the lock itself, before it
    rewrites params/ (its body: called without Prefect's engine, the refusal comes first)."""
    from pilamim_flows.pipeline import pilamim_pipeline

    monkeypatch.chdir(checkout)
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    before = (checkout / "params" / "data.yaml").read_text()
    with pytest.raises(CheckoutBusyError, match=f"pid {holder.pid} "):
        pilamim_pipeline.fn(params=Params(data={"max_images_per_class": 3}))
    assert (checkout / "params" / "data.yaml").read_text() == before


def test_dvc_repro_is_refused_at_its_first_stage_command(holder, checkout):
    """``dvc repro`` runs ``pilamim fetch``, which does not carry the holder's token."""
    from tests.flows.support import make_dvc_repo

    make_dvc_repo(checkout, Params())
    done = subprocess.run([str(VENV_BIN / "dvc"), "repro", "fetch"], cwd=checkout,
                          env=_env(DVC_NO_ANALYTICS="1"), capture_output=True, text=True,
                          timeout=120)
    assert done.returncode != 0
    assert f"pid {holder.pid} on host" in done.stderr
    assert "failed to run: pilamim fetch, exited with 75" in done.stderr
    assert not (checkout / "data" / "raw").exists()


def test_a_sigkilled_holder_leaves_its_file_but_blocks_nothing(checkout, holder):
    holder.send_signal(signal.SIGKILL)
    holder.wait(10)
    assert read_holder(lock_path(checkout))["pid"] == holder.pid  # the file stays...
    with hold_checkout(checkout):  # ...and the lock went with the process
        assert read_holder(lock_path(checkout))["pid"] == os.getpid()
    assert read_holder(lock_path(checkout)) == {}  # a clean release leaves no stale holder


def test_a_released_checkout_is_free_for_the_next_run(checkout, holder):
    holder.stdin.close()
    assert holder.wait(10) == 0
    done = subprocess.run([sys.executable, "-c", _HOLDER], cwd=checkout, env=_env(),
                          input="", capture_output=True, text=True, timeout=30)
    assert done.returncode == 0 and done.stdout.strip() == "held", done.stderr


def test_nested_holds_in_one_process_pass_and_restore_the_environment(checkout, monkeypatch):
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    with hold_checkout(checkout):
        token = os.environ[TOKEN_ENV]
        with hold_checkout(checkout), hold_checkout(checkout / "params" / ".."):
            assert read_holder(lock_path(checkout))["token"] == token
        assert os.environ[TOKEN_ENV] == token  # still held by the outer block
        refused = subprocess.run([sys.executable, "-c", _HOLDER], cwd=checkout, env=_env(),
                                 input="", capture_output=True, text=True, timeout=30)
        assert refused.returncode != 0 and f"pid {os.getpid()} " in refused.stderr
    assert TOKEN_ENV not in os.environ


def test_a_child_process_of_the_holder_is_the_same_run(checkout, monkeypatch):
    """A stage command the flow's DVC starts inherits the token and passes; a stranger's
    identical command is refused. ``prepare`` then stops at its own input check."""
    monkeypatch.chdir(checkout)
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    with hold_checkout():
        token = os.environ[TOKEN_ENV]
        child, _ = _pilamim(checkout, "prepare", "--no-track", **{TOKEN_ENV: token})
        assert child.returncode == 1 and "run `pilamim fetch` first" in child.stderr
        stranger, seconds = _pilamim(checkout, "prepare", "--no-track")
        _assert_refused(stranger, seconds, os.getpid())
        forged, _ = _pilamim(checkout, "prepare", "--no-track", **{TOKEN_ENV: "not-the-token"})
        assert forged.returncode == EXIT_BUSY


def test_one_checkout_however_it_is_spelled_and_others_are_independent(checkout, holder,
                                                                      tmp_path_factory):
    link = tmp_path_factory.mktemp("elsewhere") / "link"
    link.symlink_to(checkout)
    with pytest.raises(CheckoutBusyError, match=f"pid {holder.pid} "):
        with hold_checkout(link):
            pass
    other = tmp_path_factory.mktemp("other-checkout")
    with hold_checkout(other):
        assert lock_path(other).exists()


_RANK = """
import os, sys, time
from pathlib import Path
from pilamim.checkout_lock import hold_checkout
with hold_checkout():
    Path(f"rank{os.environ['RANK']}.in").touch()
    deadline = time.monotonic() + 30
    while len(list(Path().glob("rank*.in"))) < 2:  # both ranks inside at the same time
        assert time.monotonic() < deadline, "the other rank never got in"
        time.sleep(0.05)
"""


def test_the_ranks_of_one_torchrun_job_share_the_checkout(checkout, holder):
    """Both ranks of a job get in together; a job started while another run holds the
    checkout is refused (then the holder ends and the same job runs)."""
    (checkout / "rank.py").write_text(_RANK)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           "rank.py"]
    refused = subprocess.run(cmd, cwd=checkout, env=_env(), capture_output=True, text=True,
                             timeout=120)
    assert refused.returncode != 0 and f"pid {holder.pid} " in refused.stderr
    holder.stdin.close()
    holder.wait(10)
    done = subprocess.run(cmd, cwd=checkout, env=_env(), capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert sorted(p.name for p in checkout.glob("rank*.in")) == ["rank0.in", "rank1.in"]


_PARENT_WITH_CHILD = """
import subprocess, sys
from pilamim.checkout_lock import hold_checkout
with hold_checkout():
    # as DVC starts a stage command: no descriptor handed down (close_fds), the token inherited
    child = subprocess.Popen([sys.executable, "-c", sys.argv[1]], stdout=subprocess.PIPE,
                             text=True, close_fds=True)
    assert child.stdout.readline().strip() == "joined"
    print(child.pid, flush=True)
    sys.stdin.read()
"""
_STAGE = """
import time
from pilamim.checkout_lock import hold_checkout
with hold_checkout():
    print("joined", flush=True)
    time.sleep(120)
"""


def test_a_stage_process_keeps_the_checkout_busy_after_its_flow_dies(checkout):
    """A flow killed on its own leaves its stage command writing: the command holds a lock of
    its own (nothing inherited), so the checkout stays busy until it ends too."""
    parent = subprocess.Popen([sys.executable, "-c", _PARENT_WITH_CHILD, _STAGE], cwd=checkout,
                              env=_env(), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True)
    child_pid = int(parent.stdout.readline())
    parent.send_signal(signal.SIGKILL)
    parent.wait(10)
    try:
        with pytest.raises(CheckoutBusyError, match=f"pid {parent.pid} on host .* has lost"):
            with hold_checkout(checkout):
                pass
        stranger, seconds = _pilamim(checkout, "fetch", "--no-track")
        assert stranger.returncode == EXIT_BUSY and seconds < REFUSAL_S, stranger.stderr
        assert "still hold" in stranger.stderr and "fuser" in stranger.stderr
    finally:
        os.kill(child_pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            os.kill(child_pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.05)
    with hold_checkout(checkout):
        assert read_holder(lock_path(checkout))["pid"] == os.getpid()


_CONTENDER = """
import os, sys, time
from pathlib import Path
from pilamim.checkout_lock import CheckoutBusyError, hold_checkout
inside, claims, end = Path("inside"), 0, time.monotonic() + float(sys.argv[1])
while time.monotonic() < end:
    try:
        with hold_checkout():
            claims += 1
            marker = inside / str(os.getpid())
            marker.touch()
            others = [p.name for p in inside.iterdir() if p != marker]
            assert not others, f"{os.getpid()} holds the checkout with {others}"
            marker.unlink()
    except CheckoutBusyError:
        pass
print(claims)
"""


def test_of_runs_started_together_one_holds_the_checkout_at_a_time(checkout):
    """Claiming takes the lock exclusively, then shares it with the run's own processes: under
    contention no two runs are ever inside at once, also in the moment the claimant shares."""
    (checkout / "inside").mkdir()
    procs = [subprocess.Popen([sys.executable, "-c", _CONTENDER, "4"], cwd=checkout, env=_env(),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(3)]
    results = [proc.communicate(timeout=60) for proc in procs]
    for proc, (_, err) in zip(procs, results, strict=True):
        assert proc.returncode == 0, err[-3000:]
    assert sum(int(out) for out, _ in results) > 3  # they did take turns
