"""Faults and bad input as a user meets them, with real processes, real signals and real damaged files:
SIGTERM/SIGINT (one process and torchrun with two gloo ranks), a rank SIGKILLed or frozen under torchrun
--max-restarts, corrupt checkpoints, a shared run folder, a changed train.steps on resume, user-input errors
before any run folder exists, real-data noise defaults."""
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from harmony.trainer import checkpoint as ckpt
from harmony import distributed as hd
from harmony.cli import parse_args
from harmony.trainer.metrics import read_jsonl
from harmony.trainer.loop import main
from helpers import REPO, grid_dir

FAST = ["--train.batch_size=8", "--train.warmup_steps=1", "--train.device=cpu", "--data.size=64",
        "--data.eval_size=16", "--data.frames=4", "--data.image_size=16", "--model.video_patch=[2,8,8]",
        "--eval.size=16", "--eval.batch_size=8", "--log.every=1", "--log.progress=false", "--log.plots=false",
        "--eval.final=false"]
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))


def _launch(run: Path, steps: int, *extra: str, torchrun: bool = False) -> subprocess.Popen:
    prog = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"] if torchrun \
        else [sys.executable]
    par = ["--train.parallel=ddp", "--harmony.mode=ghost"] if torchrun else []
    cmd = [*prog, str(REPO / "train.py"), f"--log.run_dir={run}", f"--train.steps={steps}", *par, *FAST, *extra]
    return subprocess.Popen(cmd, cwd=run.parent, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def _finish(proc: subprocess.Popen, timeout: float = 240) -> tuple:
    out, err = proc.communicate(timeout=timeout)
    print((out or "")[-2000:], (err or "")[-3000:])
    return proc.returncode, out, err


def _wait_rows(run: Path, n: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    """Until metrics.jsonl has n rows (the run is inside its training loop)."""
    end = time.time() + timeout
    while time.time() < end:
        path = run / "metrics.jsonl"
        if path.is_file() and len(path.read_text().splitlines()) >= n:
            return
        assert proc.poll() is None, _finish(proc)
        time.sleep(0.05)
    raise AssertionError("the run did not reach its training loop")


def _losses(run: Path) -> list:
    return [(r["step"], r["loss"], r["lr"]) for r in read_jsonl(run / "metrics.jsonl")]


def _final_model(run: Path, steps: int) -> dict:
    return ckpt.load(run / "checkpoints" / f"step_{steps:08d}" / "state.pt")["model"]


# --------------------------------------------------------------------------------------------- signals

@pytest.mark.slow
@pytest.mark.parametrize("torchrun", [False, pytest.param(True, marks=pytest.mark.distributed)],
                         ids=["one_process", "torchrun_2_ranks"])
def test_sigterm_writes_a_checkpoint_and_resume_is_exact(tmp_path, torchrun):
    steps = 24
    full = tmp_path / "full"
    assert _finish(_launch(full, steps, "--train.ckpt_every=0", torchrun=torchrun))[0] == 0

    run = tmp_path / "preempted"
    proc = _launch(run, steps, "--train.ckpt_every=0", torchrun=torchrun)
    _wait_rows(run, 3, proc)
    proc.send_signal(signal.SIGTERM)  # torchrun's agent passes it on to both ranks
    rc, _, err = _finish(proc)
    assert rc != 0 and (torchrun or rc == 143), rc
    saved = ckpt.step_dirs(run / "checkpoints")
    assert len(saved) == 1, "one checkpoint, at the step the signal ended"
    k = ckpt.step_of(saved[0])
    assert 3 <= k < steps
    assert f"stopped at step {k} on SIGTERM: checkpoint written to {saved[0]}" in err
    assert "Traceback" not in err.split("stopped at step")[0]
    if torchrun:
        assert {"rank_00000.pt", "rank_00001.pt"} <= {p.name for p in saved[0].iterdir()}
    assert not (run / ".lock").exists()

    rc, out, _ = _finish(_launch(run, steps, "--train.ckpt_every=0", "--train.resume=auto", torchrun=torchrun))
    assert rc == 0 and f"resumed from {saved[0]} at step {k}" in out
    assert _losses(run) == _losses(full)
    a, b = _final_model(full, steps), _final_model(run, steps)
    assert all(torch.equal(a[n], b[n]) for n in a)


_AFTER_MAIN = """import os, sys
from harmony.trainer.loop import main
try:
    main(sys.argv[1:])
    code = 0
except SystemExit as exc:
    code = exc.code
tasks = [open(f"/proc/self/task/{t}/comm").read().strip() for t in os.listdir("/proc/self/task")]
print(f"rank {os.environ['RANK']} exit {code}: gloo threads left {sorted(t for t in tasks if 'gloo' in t)}", flush=True)
"""


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("stop", ["finished", "sigterm"])
def test_the_process_group_and_its_threads_are_gone_when_main_returns(tmp_path, stop):
    """When main() returns (a finished run, or a stop on SIGTERM), the process group is destroyed for real: no
    gloo thread is left to end during the interpreter's exit, where one aborted a rank now and then (SIGABRT,
    'terminate called without an active exception'; seen at the end of a 2-rank run). The objects holding the
    group (the DDP model, ...) used to keep it, and its threads, alive past destroy_process_group."""
    (tmp_path / "after_main.py").write_text(_AFTER_MAIN)
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "after_main.py",
           f"--log.run_dir={run}", "--train.steps=200" if stop == "sigterm" else "--train.steps=4",
           "--train.ckpt_every=0", "--train.parallel=ddp", "--harmony.mode=ghost", *FAST]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if stop == "sigterm":
        _wait_rows(run, 3, proc)
        proc.send_signal(signal.SIGTERM)
    _, out, err = _finish(proc)
    code = 143 if stop == "sigterm" else 0
    for rank in range(2):
        assert f"rank {rank} exit {code}: gloo threads left []" in out
    assert "terminate called" not in err


@pytest.mark.slow
def test_ctrl_c_writes_a_checkpoint_and_exits_130(tmp_path):
    run = tmp_path / "run"
    proc = _launch(run, 200, "--train.ckpt_every=0")
    _wait_rows(run, 2, proc)
    proc.send_signal(signal.SIGINT)
    rc, _, err = _finish(proc)
    assert rc == 130 and "KeyboardInterrupt" not in err and "on SIGINT: checkpoint written to" in err
    assert len(ckpt.step_dirs(run / "checkpoints")) == 1


@pytest.mark.slow
@pytest.mark.parametrize("sig,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)], ids=["SIGINT", "SIGTERM"])
def test_a_signal_to_the_whole_process_group_with_loader_workers(tmp_path, sig, code):
    """A terminal's Ctrl-C reaches every process of the foreground group, the DataLoader workers too: the
    run still finishes its step, writes its checkpoint and exits with 128 + the signal, and nothing prints a
    traceback or a KeyboardInterrupt (the workers ignore both signals and end with the loader)."""
    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, str(REPO / "train.py"), f"--log.run_dir={run}", "--train.steps=200",
                             "--train.ckpt_every=0", "--data.workers=2", *FAST], cwd=tmp_path, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    _wait_rows(run, 3, proc)
    os.killpg(proc.pid, sig)  # the trainer and both workers, as a terminal does
    rc, _, err = _finish(proc)
    name = signal.Signals(sig).name
    assert rc == code, rc
    assert "Traceback" not in err and "KeyboardInterrupt" not in err and "Error" not in err
    saved = ckpt.step_dirs(run / "checkpoints")
    assert len(saved) == 1 and f"on {name}: checkpoint written to {saved[0]}" in err
    ckpt.verify_checkpoint(saved[0])


@pytest.mark.slow
def test_a_second_signal_aborts_at_once(tmp_path):
    run = tmp_path / "run"
    proc = _launch(run, 200, "--train.ckpt_every=0")
    _wait_rows(run, 2, proc)
    proc.send_signal(signal.SIGTERM)
    proc.send_signal(signal.SIGINT)
    rc, _, err = _finish(proc)
    assert rc in (-signal.SIGINT, -signal.SIGTERM) and "aborting now, without a checkpoint" in err
    assert ckpt.step_dirs(run / "checkpoints") == []


# ------------------------------------------------------------------------------- elastic restarts (torchrun)

def _workers(agent: subprocess.Popen) -> dict:
    """{rank: pid} of the worker processes torchrun's agent runs now (read from /proc)."""
    found = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[1]) != agent.pid:  # the parent pid
                continue
            env = (stat.parent / "environ").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue  # gone meanwhile
        ranks = [kv[5:] for kv in env if kv.startswith(b"RANK=")]
        if ranks:
            found[int(ranks[0])] = int(stat.parent.name)
    return found


def _launch_elastic(run: Path, steps: int, *extra: str) -> subprocess.Popen:
    """torchrun --max-restarts=1 with two gloo ranks, resuming from the run folder's checkpoints; its output (both
    streams) goes to ``<run>.log`` (``_log``)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "--max-restarts=1",
           str(REPO / "train.py"), f"--log.run_dir={run}", f"--train.steps={steps}", "--train.parallel=ddp",
           "--harmony.mode=ghost", "--train.resume=auto", *FAST, *extra]
    with open(_log(run), "w") as log:
        return subprocess.Popen(cmd, cwd=run.parent, env=ENV, stdout=log, stderr=subprocess.STDOUT, text=True)


def _log(run: Path) -> Path:
    return run.with_name(run.name + ".log")


def _finish_or_kill(agent: subprocess.Popen, run: Path, timeout: float) -> tuple:
    """(returncode, output, hung): a job still running after ``timeout`` s is a hang; its processes are killed."""
    try:
        agent.wait(timeout=timeout)
        hung = False
    except subprocess.TimeoutExpired:
        for pid in _workers(agent).values():  # torchrun starts each worker in a session of its own
            os.kill(pid, signal.SIGKILL)
        agent.kill()
        agent.wait()
        hung = True
    return agent.returncode, _log(run).read_text(), hung


def _wait_for(path: Path, text: str, proc: subprocess.Popen, timeout: float = 120) -> str:
    """Until the file ``path`` holds a line with ``text`` -> that line."""
    end = time.time() + timeout
    while time.time() < end:
        lines = [ln for ln in path.read_text().splitlines() if text in ln] if path.is_file() else []
        if lines:
            return lines[0]
        assert proc.poll() is None, path.read_text()[-3000:]
        time.sleep(0.02)
    raise AssertionError(f"no line with {text!r} in {path}")


ELASTIC_STEPS, ELASTIC_EVERY = 30, 5


@pytest.fixture(scope="module")
def elastic_reference(tmp_path_factory):
    """An uninterrupted two-rank run: the metrics and final weights every restarted run must end with."""
    run = tmp_path_factory.mktemp("elastic") / "reference"
    agent = _launch_elastic(run, ELASTIC_STEPS, f"--train.ckpt_every={ELASTIC_EVERY}")
    rc, out, hung = _finish_or_kill(agent, run, 240)
    assert rc == 0 and not hung, out[-3000:]
    return run


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("trial", range(3))
def test_a_rank_killed_under_torchrun_restarts_and_resumes_exactly(tmp_path, elastic_reference, trial):
    """SIGKILL to a random rank at a random step: torchrun restarts both ranks, they meet again (not in the dead
    peer's leftovers in the agent's store) and resume from the newest checkpoint; the run ends as if never cut.
    The choice is drawn from a seed printed on failure (set HARMONY_FAULT_SEED to replay it)."""
    seed = int(os.environ.get("HARMONY_FAULT_SEED", random.randrange(10**6))) + trial
    rng = random.Random(seed)
    victim, at = rng.randrange(2), rng.randint(2, ELASTIC_STEPS - 4)
    run = tmp_path / "run"
    agent = _launch_elastic(run, ELASTIC_STEPS, f"--train.ckpt_every={ELASTIC_EVERY}", "--train.dist_timeout_s=60")
    _wait_rows(run, at, agent)
    pid = _workers(agent)[victim]
    os.kill(pid, signal.SIGKILL)
    had_checkpoint = bool(ckpt.step_dirs(run / "checkpoints"))
    rc, out, hung = _finish_or_kill(agent, run, 240)
    what = f"seed {seed}: rank {victim} killed after {at} logged steps"
    print(what, out[-4000:])
    assert not hung, f"{what}: the restarted job hung"
    assert rc == 0, f"{what}: rc {rc}"
    assert "failed (exitcode: " in out  # torchrun saw the group fail (it logs the first failure it finds)
    assert "Connection refused" not in out and "connectFullMesh" not in out
    if had_checkpoint:  # (a save finishing on the survivor just after the kill can be resumed from, too)
        assert "resumed from " in out, what
    assert _losses(run) == _losses(elastic_reference), what
    a, b = _final_model(elastic_reference, ELASTIC_STEPS), _final_model(run, ELASTIC_STEPS)
    assert all(torch.equal(a[n], b[n]) for n in a), what


@pytest.mark.slow
@pytest.mark.distributed
def test_a_frozen_rank_times_out_and_the_job_restarts(tmp_path, elastic_reference):
    """SIGSTOP to one rank (a node that stops answering: its sockets stay open, so no peer sees an error): the
    other rank's collective gives up after train.dist_timeout_s, torchrun restarts the group, and the run ends
    as if never cut. (20 s: short, yet longer than two restarted ranks' start-up skew on a loaded machine, which
    the same timeout bounds in the rendezvous.)"""
    run = tmp_path / "run"
    agent = _launch_elastic(run, ELASTIC_STEPS, f"--train.ckpt_every={ELASTIC_EVERY}", "--train.dist_timeout_s=20")
    _wait_rows(run, ELASTIC_EVERY + 2, agent)
    frozen = _workers(agent)[1]
    os.kill(frozen, signal.SIGSTOP)
    start = time.time()
    rc, out, hung = _finish_or_kill(agent, run, 240)
    print(out[-4000:])
    assert not hung and rc == 0, f"rc {rc}, hung {hung}"
    assert "resumed from " in out and _losses(run) == _losses(elastic_reference)
    print(f"frozen rank to finished run: {time.time() - start:.0f} s")


def test_each_round_meets_in_a_fresh_namespace_of_the_shared_store():
    """Two rounds of two ranks on one long-lived store (as torchrun's agent keeps it): the second round agrees
    on a new namespace although the first round's keys, its ranks' hellos included, are still there, and
    whichever rank comes first."""
    from datetime import timedelta

    server = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    timeout = timedelta(seconds=20)

    def meet(late_rank: int) -> list:
        import threading

        got = [None, None]

        def worker(rank):
            if rank == late_rank:
                time.sleep(0.3)
            client = dist.TCPStore("127.0.0.1", server.port, is_master=False, timeout=timeout)
            got[rank] = hd._fresh_namespace(client, rank, 2, timeout)

        threads = [threading.Thread(target=worker, args=(r,)) for r in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        return got

    first = meet(late_rank=0)
    first[0].set("rank_1", "the address of a rank that is gone")
    assert first[1].get("rank_1") == b"the address of a rank that is gone"  # both ranks share the namespace
    second = meet(late_rank=1)  # rank 1's stale hello from the first round is in the store: rank 0 answers it too
    assert not second[0].check(["rank_1"]) and not second[1].check(["rank_1"])
    second[1].set("rank_1", "new")
    assert second[0].get("rank_1") == b"new" and first[0].get("rank_1") != b"new"


# ----------------------------------------------------------------------------------------- checkpoints

def _short_run(run: Path, steps: int, *extra: str) -> dict:
    return main([f"--log.run_dir={run}", f"--train.steps={steps}", *FAST, *extra])


@pytest.fixture(scope="module")
def four_checkpoints(tmp_path_factory):
    """A finished 4-step run with a checkpoint at every step (kept: steps 2, 3, 4)."""
    run = tmp_path_factory.mktemp("ckpt") / "run"
    _short_run(run, 4, "--train.ckpt_every=1", "--train.keep_last=3")
    return run


def _copy(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_corrupt_newest_checkpoint_is_set_aside_and_an_older_one_resumes(four_checkpoints, tmp_path, capsys):
    run = _copy(four_checkpoints, tmp_path / "run")
    state = run / "checkpoints" / "step_00000004" / "state.pt"
    state.write_bytes(state.read_bytes()[: state.stat().st_size // 2])  # truncated, as by a full disk
    meta3 = run / "checkpoints" / "step_00000003" / "meta.pt"
    meta3.write_bytes(b"\x00garbage" * 10)
    _short_run(run, 4, "--train.resume=auto", "--train.ckpt_every=1", "--train.keep_last=3")
    captured = capsys.readouterr()
    print(captured.out, captured.err)
    assert f"checkpoint {run / 'checkpoints' / 'step_00000004'} is unreadable" in captured.err
    assert "cut short" in captured.err and "weights_only=False" not in captured.err
    assert f"resumed from {run / 'checkpoints' / 'step_00000002'} at step 2" in captured.out
    names = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert names == ["step_00000002", "step_00000003", "step_00000003.corrupt", "step_00000004",
                     "step_00000004.corrupt"]  # steps 3 and 4 trained again and saved
    rows = read_jsonl(run / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3, 4]


def test_no_readable_checkpoint_stops_naming_them(four_checkpoints, tmp_path, capsys):
    run = _copy(four_checkpoints, tmp_path / "run")
    for d in ckpt.step_dirs(run / "checkpoints"):
        (d / "meta.pt").write_bytes(b"")
    with pytest.raises(SystemExit) as stop:
        _short_run(run, 6, "--train.resume=auto")
    err = capsys.readouterr().err
    print(err)
    assert stop.value.code == 2 and len(err.strip().splitlines()) == 1
    assert "train.resume=auto: no readable checkpoint" in err
    assert all(f"step_0000000{k}/meta.pt: empty file" in err for k in (2, 3, 4))
    assert [p.name for p in ckpt.step_dirs(run / "checkpoints")] == ["step_00000002", "step_00000003",
                                                                     "step_00000004"]  # nothing moved


def test_explicit_unreadable_resume_path_names_path_and_cause(four_checkpoints, tmp_path, capsys):
    run = _copy(four_checkpoints, tmp_path / "run")
    bad = run / "checkpoints" / "step_00000004"
    (bad / "rank_00000.pt").write_bytes(b"not a checkpoint at all")
    with pytest.raises(SystemExit) as stop:
        _short_run(tmp_path / "new", 6, f"--train.resume={bad}")
    err = capsys.readouterr().err
    print(err)
    assert stop.value.code == 2 and f"cannot resume from {bad}" in err and "rank_00000.pt: unreadable" in err
    assert "weights_only" not in err and not (tmp_path / "new").exists()


def test_more_steps_on_resume_follow_a_new_schedule(four_checkpoints, tmp_path, capsys):
    run = _copy(four_checkpoints, tmp_path / "run")
    _short_run(run, 8, "--train.resume=auto")
    out = capsys.readouterr().out
    assert "train.steps changed from 4 to 8 on resume: the lr schedule now decays over 8 steps" in out
    rows = read_jsonl(run / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, 9))
    lrs = [r["lr"] for r in rows[4:]]
    assert all(lr > 0 for lr in lrs[:-1]) and lrs == sorted(lrs, reverse=True)  # decaying, not stuck at 0


# ------------------------------------------------------------------------------ failed checkpoint writes

FILE_LIMIT = 1 << 20  # bytes: far more than metrics.jsonl grows to here, far less than one state.pt (~50 MB)


def _file_limit(soft: int):
    """preexec_fn: a file-size limit in the child, as a full disk or a quota would stop its writes; SIGXFSZ
    ignored, so a write past it fails with EFBIG instead of killing the process."""
    def apply():
        import resource

        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
    return apply


def _set_file_limit(pid: int, soft: int) -> None:
    """Lower or lift the file-size limit of a running process (its soft limit; the hard one stays)."""
    import resource

    hard = resource.prlimit(pid, resource.RLIMIT_FSIZE)[1]
    resource.prlimit(pid, resource.RLIMIT_FSIZE, (soft, hard))


def _folder_digest(folder: Path) -> dict:
    import hashlib

    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


@pytest.mark.slow
def test_a_failed_checkpoint_write_costs_no_training_and_the_next_one_retries(tmp_path):
    """A run writes its first checkpoint, then its disk "fills" (a file-size limit below one checkpoint): the
    next save fails in one line, its partial folder is removed, the older checkpoint stays as it was and reads
    back, training goes on; once there is room again, the next save succeeds and the run ends normally."""
    import resource

    run, steps, every = tmp_path / "run", 16, 4
    with open(tmp_path / "out", "w") as out, open(tmp_path / "err", "w") as err:
        proc = subprocess.Popen([sys.executable, str(REPO / "train.py"), f"--log.run_dir={run}",
                                 f"--train.steps={steps}", f"--train.ckpt_every={every}", "--train.keep_last=5",
                                 *FAST], cwd=tmp_path, env=ENV, stdout=out, stderr=err, text=True)
    first = run / "checkpoints" / f"step_{every:08d}"
    end = time.time() + 120
    while not first.is_dir() and time.time() < end and proc.poll() is None:
        time.sleep(0.02)
    _set_file_limit(proc.pid, FILE_LIMIT)
    before = _folder_digest(first)
    line = _wait_for(tmp_path / "err", "not written", proc)
    _set_file_limit(proc.pid, resource.RLIM_INFINITY)
    rc, _, _ = _finish(proc)
    err = (tmp_path / "err").read_text()
    print(err[-3000:])
    assert rc == 0 and "Traceback" not in err
    k = int(line.split("checkpoint of step ")[1].split()[0])
    assert every < k < steps and k % every == 0
    tmp = run / "checkpoints" / f".tmp-step_{k:08d}"
    assert line.startswith(f"checkpoint of step {k} not written: {tmp / 'state.pt'}: [Errno 27] File too large (")
    assert " free on that disk); training goes on, the checkpoint of step " in line
    assert line.endswith(f"the checkpoint of step {k + every} tries again")
    assert err.count("not written") == 1  # the limit was lifted before the next save
    saved = ckpt.step_dirs(run / "checkpoints")
    assert [ckpt.step_of(d) for d in saved] == [s for s in range(every, steps + 1, every) if s != k]
    assert _folder_digest(first) == before
    ckpt.verify_checkpoint(first)
    assert not [p for p in (run / "checkpoints").iterdir() if p.name.startswith(".")]  # no partial folder
    assert [r["step"] for r in read_jsonl(run / "metrics.jsonl")] == list(range(1, steps + 1))


@pytest.mark.slow
def test_a_failed_final_checkpoint_ends_the_run_with_its_message_after_the_summary(tmp_path):
    run, steps = tmp_path / "run", 4
    proc = subprocess.Popen([sys.executable, str(REPO / "train.py"), f"--log.run_dir={run}", f"--train.steps={steps}",
                             "--train.ckpt_every=2", *FAST], cwd=tmp_path, env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, preexec_fn=_file_limit(FILE_LIMIT))
    rc, out, err = _finish(proc)
    lines = err.strip().splitlines()
    tmp = run / "checkpoints" / ".tmp-step_00000002"
    assert rc == 1 and "Traceback" not in err
    assert [ln for ln in lines if "not written" in ln][0].startswith(
        f"checkpoint of step 2 not written: {tmp / 'state.pt'}: [Errno 27] File too large (")
    assert lines[-1].startswith(f"checkpoint of step {steps} not written: ")
    assert lines[-1].endswith("it was the final checkpoint, so the run ends with status 1 (metrics.jsonl and "
                              "summary.json are written; the newest checkpoint is none)")
    assert [r["step"] for r in read_jsonl(run / "metrics.jsonl")] == list(range(1, steps + 1))
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == steps and summary["checkpoint_error"] in lines[-1]
    assert list((run / "checkpoints").iterdir()) == []  # no checkpoint, no partial folder
    assert "summary: steps=4" in out


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_a_checkpoint_write_failing_on_one_rank_is_every_ranks_decision(tmp_path, elastic_reference, parallel):
    """Only rank 1's file-size limit is lowered, below what it writes of a checkpoint (its rank file; under
    FSDP its shard): the save fails on every rank (rank 0 says so in one line naming rank 1's file and removes
    the partial folder), no rank hangs or restarts, and once the limit is lifted the next save succeeds; the DDP
    run ends as an undisturbed one."""
    import resource

    run = tmp_path / "run"
    agent = _launch_elastic(run, ELASTIC_STEPS, f"--train.ckpt_every={ELASTIC_EVERY}", "--train.dist_timeout_s=60",
                            f"--train.parallel={parallel}")
    first = run / "checkpoints" / f"step_{ELASTIC_EVERY:08d}"
    end = time.time() + 120
    while not first.is_dir() and time.time() < end and agent.poll() is None:
        time.sleep(0.02)
    rank1 = _workers(agent)[1]
    _set_file_limit(rank1, 1000)  # a rank file is ~40 kB; rank 1 writes no other file
    line = _wait_for(_log(run), "not written", agent)
    _set_file_limit(rank1, resource.RLIM_INFINITY)
    rc, out, hung = _finish_or_kill(agent, run, 240)
    print(out[-4000:])
    assert rc == 0 and not hung
    k = int(line.split("checkpoint of step ")[1].split()[0])
    tmp = run / "checkpoints" / f".tmp-step_{k:08d}"
    failed = f"{tmp / 'rank_00001.pt'}: [Errno 27] File too large (" if parallel == "ddp" else \
        f"{tmp / 'dcp'}: [Errno 27] File too large on rank 1 ("
    assert f"checkpoint of step {k} not written: {failed}" in line
    assert out.count("not written") == 1 and "resumed from" not in out and "Traceback" not in out
    assert k not in [ckpt.step_of(d) for d in ckpt.step_dirs(run / "checkpoints")]
    assert not [p for p in (run / "checkpoints").iterdir() if p.name.startswith(".")]
    if parallel == "fsdp":  # sharded: not bit-equal to the DDP reference
        assert [r["step"] for r in read_jsonl(run / "metrics.jsonl")] == list(range(1, ELASTIC_STEPS + 1))
        return
    assert _losses(run) == _losses(elastic_reference)
    a, b = _final_model(elastic_reference, ELASTIC_STEPS), _final_model(run, ELASTIC_STEPS)
    assert all(torch.equal(a[n], b[n]) for n in a)


# ------------------------------------------------------------------------------------------ run folder

@pytest.mark.slow
def test_a_second_run_into_a_live_run_folder_stops(tmp_path, capsys):
    run = tmp_path / "run"
    first = _launch(run, 300)
    _wait_rows(run, 1, first)
    try:
        with pytest.raises(SystemExit) as stop:
            _short_run(run, 2)
        err = capsys.readouterr().err
    finally:
        first.send_signal(signal.SIGTERM)
    assert _finish(first)[0] == 143  # the first run went on undisturbed and stopped on the signal
    assert stop.value.code == 2 and len(err.strip().splitlines()) == 1
    assert "is in use by another run" in err and f"pid {first.pid} on {socket.gethostname()}" in err
    assert len(read_jsonl(run / "metrics.jsonl")) >= 1 and "--train.steps=300" not in err


def test_a_stale_lock_is_taken_over(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (run / ".lock").write_text(json.dumps({"pid": int(gone.stdout), "host": socket.gethostname(), "started": "x"}))
    with pytest.warns(RuntimeWarning, match=f"taking over the lock of a run that is gone \\(pid {int(gone.stdout)}"):
        _short_run(run, 1)
    assert (run / "config.yaml").is_file() and not (run / ".lock").exists()


# ------------------------------------------------------------------------------------ bad user input

@pytest.mark.parametrize("args,words", [
    (["--data.kind=manifest"], "data.kind=manifest needs data.manifest=PATH"),
    (["--data.kind=manifest", "--data.manifest=nowhere/manifest.jsonl"],
     "data.manifest='nowhere/manifest.jsonl': no such file"),
    (["--train.lr=nan"], "train.lr=nan is not a finite number"),
    (["--data.kind=shards", "--data.shards=none-{0..3}.tar"], "data.shards='none-{0..3}.tar' names no existing"),
])
def test_user_input_errors_come_before_the_run_folder(tmp_path, monkeypatch, capsys, args, words):
    monkeypatch.chdir(tmp_path)
    run = tmp_path / "run"
    with pytest.raises(SystemExit) as stop:
        main([f"--log.run_dir={run}", *args])
    err = capsys.readouterr().err
    print(err)
    assert stop.value.code == 2 and len(err.strip().splitlines()) == 1 and err.startswith("config error: ")
    assert words in err and not run.exists()


@pytest.mark.slow
def test_user_input_error_as_a_process_is_one_line(tmp_path):
    run = tmp_path / "run"
    proc = subprocess.run([sys.executable, str(REPO / "train.py"), f"--log.run_dir={run}", "--data.kind=manifest",
                           "--data.manifest=missing.jsonl"], cwd=tmp_path, env=ENV, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2 and proc.stdout == "" and not run.exists()
    assert proc.stderr.strip().splitlines() == [f"config error: data.manifest='missing.jsonl': no such file (relative "
                                                f"paths are taken from the current directory {str(tmp_path)!r})"]


def test_manifest_paths_relative_to_the_config_folder(tmp_path, monkeypatch):
    (tmp_path / "cfg" / "data").mkdir(parents=True)
    (tmp_path / "cfg" / "data" / "m.jsonl").write_text("")
    (tmp_path / "cfg" / "mine.yaml").write_text("data:\n  kind: manifest\n  manifest: data/m.jsonl\n")
    monkeypatch.chdir(tmp_path)
    cfg, _ = parse_args(["--config", "cfg/mine.yaml"])
    assert cfg.data.manifest == str(tmp_path / "cfg" / "data" / "m.jsonl")
    (tmp_path / "cfg" / "mine.yaml").write_text("data:\n  kind: manifest\n  manifest: data/other.jsonl\n")
    with pytest.raises(SystemExit):
        main(["--config", "cfg/mine.yaml", f"--log.run_dir={tmp_path / 'run'}"])
    # the error names both places tried, when the config is read (before any work)
    from harmony.config import ConfigError

    with pytest.raises(ConfigError, match="tried .*other.jsonl and .*cfg/data/other.jsonl"):
        parse_args(["--config", "cfg/mine.yaml"])


def test_grid_config_finds_its_manifest_from_any_directory(tmp_path, monkeypatch):
    if not (grid_dir() / "manifest.jsonl").is_file():
        pytest.skip(f"GRID clips not found at {grid_dir()}")
    monkeypatch.chdir(tmp_path)
    cfg, _ = parse_args(["--config", str(REPO / "configs" / "grid.yaml")])
    assert Path(cfg.data.manifest).resolve() == (grid_dir() / "manifest.jsonl").resolve()


# ------------------------------------------------------------------------------------- real-data noise

def test_real_data_gets_no_injected_noise_unless_asked(tmp_path):
    synthetic, _ = parse_args([])
    d = synthetic.data  # the benchmark keeps its noise
    assert (d.noise, d.noise_bias, d.noise_audio, d.hard, d.imbalance) == (0.2, 0.2, 0.2, 0.0, 1.0)
    for kind in (["--data.kind=manifest", "--data.manifest=m.jsonl"], ["--data.kind=shards", "--data.shards=s.tar"]):
        cfg, _ = parse_args(kind)
        d = cfg.data
        assert (d.noise, d.noise_bias, d.noise_audio, d.hard, d.imbalance) == (0.0, 0.0, 0.0, 0.0, 1.0), kind
    cfg, _ = parse_args(["--data.kind=manifest", "--data.manifest=m.jsonl", "--data.noise=0.2"])
    assert (cfg.data.noise, cfg.data.noise_audio) == (0.2, 0.0)
    own = tmp_path / "own.yaml"
    (tmp_path / "m.jsonl").write_text("")  # found beside the config (a missing one is an error when it is read)
    own.write_text("data:\n  kind: manifest\n  manifest: m.jsonl\n  noise_audio: 0.05\n")
    cfg, _ = parse_args(["--config", str(own)])
    assert (cfg.data.noise, cfg.data.noise_audio) == (0.0, 0.05)


# ------------------------------------------------------------------------------------------- bad data

def test_a_bad_data_warning_is_one_line(tmp_path):
    code = ("from harmony.data.batch import note_bad, zero_counts\n"
            "c = zero_counts()\n"
            "note_bad(c, 'truncated', 'clip.mp4 ends inside its own structure', 'clip.mp4')\n"
            "note_bad(c, 'truncated', 'again', 'other.mp4')\n")
    (tmp_path / "reader.py").write_text(code)  # a file: a warnings.warn would echo its source line
    proc = subprocess.run([sys.executable, "reader.py"], cwd=tmp_path, env=ENV, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0 and proc.stdout == ""
    assert proc.stderr == ("harmony.data: truncated: clip.mp4 ends inside its own structure (further 'truncated' "
                           "cases are counted, not warned)\n")


@pytest.mark.slow
def test_bad_data_report_counts_items_and_draws_and_names_them(tmp_path):
    """A manifest of real GRID clips with a non-JSON line, a missing clip and a cut-short mp4: every kind is
    counted where it happens (the bad line too), distinct items and draws both reported, the offending ones
    named, each warning printed once."""
    src = grid_dir()
    if not (src / "manifest.jsonl").is_file():
        pytest.skip(f"GRID clips not found at {src}")
    entries = [json.loads(line) for line in (src / "manifest.jsonl").read_text().splitlines()]
    entries = [e for e in entries if e["path"].startswith("clips/")][:10]
    for e in entries:
        e["path"], e["align"] = str(src / e["path"]), str(src / e["align"])
    clip = Path(entries[0]["path"]).read_bytes()
    (tmp_path / "cut.mp4").write_bytes(clip[: len(clip) // 2])
    train = entries[:6] + [dict(entries[6], id="cut", path=str(tmp_path / "cut.mp4")),
                           dict(entries[7], id="gone", path=str(tmp_path / "gone.mp4"))]
    lines = [json.dumps(e) for e in train]
    lines.insert(3, '{"path": "clips/broken.mp4", "text": ')  # line 4: not JSON
    (tmp_path / "train.jsonl").write_text("\n".join(lines) + "\n")
    (tmp_path / "eval.jsonl").write_text("\n".join(json.dumps(e) for e in entries[8:10]) + "\n")
    run = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, str(REPO / "train.py"), "--config", str(REPO / "configs" / "grid.yaml"),
         f"--data.manifest={tmp_path / 'train.jsonl'}", f"--data.eval_manifest={tmp_path / 'eval.jsonl'}",
         f"--log.run_dir={run}", "--train.steps=4", "--train.batch_size=4", "--train.device=cpu",
         "--data.eval_size=2", "--eval.final=false", "--log.every=2", "--log.progress=false", "--log.plots=false"],
        cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=300)
    print(proc.stdout[-2000:], proc.stderr[-3000:])
    assert proc.returncode == 0
    for kind in ("bad_line", "truncated", "missing_file"):
        assert proc.stderr.count(f"harmony.data: {kind}:") == 1, kind
    warned = [ln for ln in proc.stderr.splitlines() if "harmony.data:" in ln]
    assert all(ln.startswith("harmony.data: ") for ln in warned) and "note_bad(" not in proc.stderr  # one line each
    assert "injecting noise" not in proc.stdout
    rows = read_jsonl(run / "metrics.jsonl")
    assert rows[0]["bad"]["bad_line"] == 1 and sum(r["bad"]["bad_line"] for r in rows) == 1
    summary = json.loads((run / "summary.json").read_text())
    # 8 clips, 2 batches of 4 per epoch, 4 steps: two epochs, each bad clip drawn (and counted) twice
    assert summary["bad_draws"]["truncated"] == 2 and summary["bad_items"]["truncated"] == 1
    # the missing clip follows the cut one: drawn twice itself and twice as the cut one's first replacement
    assert summary["bad_draws"]["missing_file"] == 4 and summary["bad_items"]["missing_file"] == 1
    assert summary["bad_draws"]["decode_error"] == 0
    assert summary["bad_draws"]["bad_line"] == 1 and summary["bad_items"]["bad_line"] == 1
    assert summary["bad_examples"]["bad_line"] == [f"{tmp_path / 'train.jsonl'}:4"]
    assert len(summary["bad_examples"]["truncated"]) == 1 and len(summary["bad_examples"]["missing_file"]) == 1
    assert summary["bad"] == summary["bad_draws"]
    assert rows[-1]["bad_items_total"]["truncated"] == 1
