"""rlprims.launch.slurm: rendezvous from Slurm variables, sbatch contents, bad input, and local 2-task jobs
(end to end, a failing rank, requeue after a preemption signal resuming from a checkpoint)."""

from __future__ import annotations

import json
import os
import stat
import time
from pathlib import Path

import pytest

submitit = pytest.importorskip("submitit")

from rlprims.launch.slurm import main, parse_time_min, rendezvous_env, submit, wait  # noqa: E402

SCRIPT = str(Path(__file__).with_name("spmd_script.py"))
RENDEZVOUS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def _slurm_task_env(monkeypatch, *, nodelist, ntasks, nnodes, procid, localid, job_id="777"):
    for k in [*RENDEZVOUS, *(k for k in os.environ if k.startswith(("SLURM_", "SUBMITIT_")))]:
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("SUBMITIT_EXECUTOR", "slurm")
    for k, v in dict(SLURM_JOB_ID=job_id, SLURM_JOB_NODELIST=nodelist, SLURM_NTASKS=ntasks,
                     SLURM_JOB_NUM_NODES=nnodes, SLURM_PROCID=procid, SLURM_LOCALID=localid,
                     SLURM_NODEID=str(int(procid) // (int(ntasks) // int(nnodes)))).items():
        monkeypatch.setenv(k, str(v))


def test_rendezvous_multi_node(monkeypatch):
    # 4 nodes x 8 GPUs; task 21 is GPU 5 of the third node (gpu03)
    _slurm_task_env(monkeypatch, nodelist="gpu[01-03,07]", ntasks=32, nnodes=4, procid=21, localid=5)
    env = rendezvous_env()
    port = env.pop("MASTER_PORT")
    assert env == {"MASTER_ADDR": "gpu01", "RANK": "21", "WORLD_SIZE": "32", "LOCAL_RANK": "5",
                   "LOCAL_WORLD_SIZE": "8"}
    assert 20000 <= int(port) <= 60000
    # every task of the job derives the same port (from the job id); another job gets its own
    _slurm_task_env(monkeypatch, nodelist="gpu[01-03,07]", ntasks=32, nnodes=4, procid=0, localid=0)
    assert rendezvous_env()["MASTER_PORT"] == port and rendezvous_env()["RANK"] == "0"
    _slurm_task_env(monkeypatch, nodelist="gpu[01-03,07]", ntasks=32, nnodes=4, procid=0, localid=0,
                    job_id="778")
    assert rendezvous_env()["MASTER_PORT"] != port


def test_rendezvous_node_groups_and_explicit_port(monkeypatch):
    _slurm_task_env(monkeypatch, nodelist="a100-n[009-010],h100-x1", ntasks=3, nnodes=3, procid=2,
                    localid=0)
    monkeypatch.setenv("MASTER_PORT", "29511")
    env = rendezvous_env()
    assert env["MASTER_ADDR"] == "a100-n009" and env["MASTER_PORT"] == "29511"
    ranks = (env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"], env["LOCAL_WORLD_SIZE"])
    assert ranks == ("2", "3", "0", "1")


def test_rendezvous_uneven_tasks(monkeypatch):
    _slurm_task_env(monkeypatch, nodelist="n[1-2]", ntasks=3, nnodes=2, procid=0, localid=0)
    with pytest.raises(ValueError, match="3 tasks on 2 nodes"):
        rendezvous_env()


@pytest.mark.parametrize("text, minutes", [("90", 90), ("1:30", 2), ("2:00:00", 120), ("1-0", 1440),
                                           ("1-2:30", 1590), ("1-2:30:15", 1591)])
def test_parse_time(text, minutes):
    assert parse_time_min(text) == minutes


@pytest.mark.parametrize("text", ["x", "1:2:3:4", "-5", "0", "1--2"])
def test_parse_time_bad(text):
    with pytest.raises(ValueError, match="time"):
        parse_time_min(text)


@pytest.fixture
def fake_slurm(tmp_path, monkeypatch):
    """sbatch / srun stubs on PATH: sbatch keeps the script it was given and answers with job id 4242."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text(
        f'#!/bin/sh\ncp "$1" {tmp_path}/submitted.sh\necho "Submitted batch job 4242"\n'
    )
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 1\n")
    for f in bin_dir.iterdir():
        f.chmod(f.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    return tmp_path


def test_sbatch_script(fake_slurm, capsys):
    folder = fake_slurm / "jobs" / "%j"
    rc = main(["--nodes", "4", "--gpus-per-node", "8", "--partition", "gpu", "--account", "rl",
               "--time", "1:30:00", "--job-name", "grpo-test", "--cpus_per_task", "12", "--setup",
               "module load cuda", "--folder", str(folder), SCRIPT, "--", "--mode", "world"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "submitted job 4242 to Slurm: 4 node(s) x 8 task(s)" in out
    assert f"{fake_slurm}/jobs/4242/4242_0_log.out" in out and "4242_0_log.err" in out
    sbatch = (fake_slurm / "submitted.sh").read_text()
    for line in ["#SBATCH --nodes=4", "#SBATCH --ntasks-per-node=8", "#SBATCH --gpus-per-node=8",
                 "#SBATCH --partition=gpu", "#SBATCH --account=rl", "#SBATCH --time=90",
                 "#SBATCH --job-name=grpo-test", "#SBATCH --cpus-per-task=12", "#SBATCH --signal=USR2@90",
                 "module load cuda", "--kill-on-bad-exit=1", "-m submitit.core._submit"]:
        assert line in sbatch, line
    # the pickled task is the recipe with its arguments, run from this directory
    pickled = fake_slurm / "jobs" / "4242" / "4242_submitted.pkl"
    task = submitit.helpers.DelayedSubmission.load(pickled).function
    assert (task.recipe, task.args, task.workdir) == (SCRIPT, ["--mode", "world"], os.getcwd())
    assert task.checkpoint().function.args == task.args  # requeue = the same command


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--nodes", "1", "--gpus-per-node", "1", "missing.py"], "recipe 'missing.py' does not exist"),
        (["--nodes", "0", "--gpus-per-node", "1", SCRIPT], "nodes must be a positive int, got 0"),
        (["--nodes", "1", "--gpus-per-node", "-2", SCRIPT], "gpus_per_node must be a positive int"),
        (["--nodes", "1", "--gpus-per-node", "1", "--bogus", "3", SCRIPT],
         "unrecognized arguments: --bogus"),
        (["--nodes", "1", "--gpus-per-node", "1", SCRIPT, "--steps", "2"], "go after '--'"),
        (["--nodes", "1", "--gpus-per-node", "1", "--time", "soon", SCRIPT], "time 'soon'"),
        (["--gpus-per-node", "1", SCRIPT], "--nodes"),
    ],
)
def test_bad_input_before_submission(fake_slurm, capsys, argv, message):
    with pytest.raises(SystemExit) as e:
        main([*argv, "--folder", str(fake_slurm / "jobs")] if "--" not in argv else argv)
    assert e.value.code == 2
    assert message in capsys.readouterr().err
    assert not (fake_slurm / "submitted.sh").exists() and not (fake_slurm / "jobs").exists()


def test_no_slurm_here(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(ValueError, match="sbatch / srun not found"):
        submit(SCRIPT, nodes=1, gpus_per_node=1, folder=tmp_path / "jobs")
    assert not (tmp_path / "jobs").exists()


def test_local_two_tasks_end_to_end(tmp_path, capsys):
    rc = main(["--local", "--nodes", "1", "--gpus-per-node", "2",
               "--folder", str(tmp_path / "jobs" / "%j"), SCRIPT,
               "--", "--mode", "world", "--out-dir", str(tmp_path)])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "finished" in out and "_0_log.out" in out
    ranks = [json.loads((tmp_path / f"rank_{r}.json").read_text()) for r in range(2)]
    for r, info in enumerate(ranks):
        seen = (info["rank"], info["world_size"], info["local_rank"], info["local_world_size"])
        assert seen == (r, 2, r, 2)
        assert info["all_reduce"] == 3.0 and info["backend"] == "gloo" and info["cwd"] == os.getcwd()
    assert ranks[0]["env"]["MASTER_PORT"] == ranks[1]["env"]["MASTER_PORT"]
    assert ranks[0]["seeded"] == ranks[1]["seeded"]


def test_local_failing_rank_fails_the_job(tmp_path):
    start = time.monotonic()
    job = submit(SCRIPT, ["--mode", "fail", "--out-dir", str(tmp_path)], nodes=1, gpus_per_node=2,
                 folder=tmp_path / "jobs" / "%j", local=True)
    with pytest.raises(RuntimeError) as e:
        wait(job)
    message = str(e.value)
    assert f"job {job.job_id}: rank 1 failed" in message and "ValueError: boom from rank 1" in message
    assert "_1_log.err" in message
    assert time.monotonic() - start < 100  # not rank 0's 120 s collective timeout


def test_local_requeue_resumes_from_checkpoint(tmp_path):
    args = ["--mode", "resume", "--steps", "6", "--preempt-at", "3", "--out-dir", str(tmp_path)]
    job = submit(SCRIPT, args, nodes=1, gpus_per_node=2, folder=tmp_path / "jobs" / "%j", local=True)
    wait(job)
    expected = ["start 0", "step 0", "step 1", "step 2", "start 3", "step 3", "step 4", "step 5"]
    for r in range(2):  # first attempt stopped at step 3; the requeued one resumed after checkpoint 2
        assert (tmp_path / f"log_{r}.txt").read_text().split("\n")[:-1] == expected
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == [f"step-{k}" for k in range(6)]
    rank0_log = job.task(0).paths.stderr.read_text() + job.task(0).paths.stdout.read_text()
    assert "this job is preempted" in rank0_log and "Requeued job" in rank0_log
