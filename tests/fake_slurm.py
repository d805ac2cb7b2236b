"""A stand-in for Slurm's sbatch, sacct, squeue, scancel and srun, for tests without a cluster.

``install(folder)`` writes the five commands into ``folder/bin`` (put it first on PATH). Every
call is appended to ``folder/calls.jsonl``; job N's state is ``folder/N.state``, its script
``folder/N.sh``. sbatch runs the script in the background (srun runs its command with the
output and error files it names), then writes COMPLETED or FAILED by its exit status. Set
``FAKE_SLURM_LOSE=<job name>:<n>,...`` to lose the first n submissions of a job name (state
NODE_FAIL, nothing runs: a job that ends without a result), ``FAKE_SLURM_HOLD=1`` to leave
every job PENDING. Job ids start at ``FAKE_SLURM_FIRST_ID`` (submitit caches states by id).
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

TOOLS = ("sbatch", "sacct", "squeue", "scancel", "srun")


def install(folder: Path, first_id: int) -> dict[str, str]:
    """The fake commands in ``folder/bin``; returns the environment variables to set."""
    (folder / "bin").mkdir(parents=True, exist_ok=True)
    for tool in TOOLS:
        path = folder / "bin" / tool
        path.write_text(f"#!{sys.executable}\nimport sys\nsys.path.insert(0, {str(Path(__file__).parent)!r})\n"
                        f"import fake_slurm\nfake_slurm.main({tool!r}, sys.argv[1:])\n")
        path.chmod(0o755)
    return {"PATH": f"{folder / 'bin'}{os.pathsep}{os.environ['PATH']}",
            "FAKE_SLURM_DIR": str(folder), "FAKE_SLURM_FIRST_ID": str(first_id)}


def calls(folder: Path, tool: str | None = None) -> list[list[str]]:
    """The recorded calls (of ``tool``), each [tool, *args]."""
    path = folder / "calls.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    return [r for r in rows if tool is None or r[0] == tool]


def _new_id(state: Path) -> int:
    counter = state / "next_id"
    jid = int(counter.read_text()) if counter.exists() else int(os.environ["FAKE_SLURM_FIRST_ID"])
    counter.write_text(str(jid + 1))
    return jid


def _lose(state: Path, name: str) -> bool:
    """Whether this submission of job ``name`` is one to lose (FAKE_SLURM_LOSE)."""
    for entry in filter(None, os.environ.get("FAKE_SLURM_LOSE", "").split(",")):
        job, _, n = entry.rpartition(":")
        if job == name:
            seen = state / f"lost-{name}"
            k = int(seen.read_text()) if seen.exists() else 0
            if k < int(n):
                seen.write_text(str(k + 1))
                return True
    return False


def main(tool: str, args: list[str]) -> None:
    state = Path(os.environ["FAKE_SLURM_DIR"])
    if tool == "sbatch" and args[:1] == ["_job"]:  # the background half of a submission
        return run_job(args[1])
    with open(state / "calls.jsonl", "a") as f:
        f.write(json.dumps([tool, *args]) + "\n")
    if tool == "sbatch":
        script = Path(args[-1])
        text = script.read_text()
        jid = _new_id(state)
        (state / f"{jid}.sh").write_text(text)
        name = re.search(r"^#SBATCH --job-name=(\S+)$", text, re.M).group(1)
        if _lose(state, name):
            (state / f"{jid}.state").write_text("NODE_FAIL")
        elif os.environ.get("FAKE_SLURM_HOLD"):
            (state / f"{jid}.state").write_text("PENDING")
        else:
            (state / f"{jid}.state").write_text("RUNNING")
            proc = subprocess.Popen([sys.executable, str(state / "bin" / "sbatch"), "_job", str(jid)],
                                    start_new_session=True,
                                    stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                    stderr=subprocess.DEVNULL)
            (state / f"{jid}.pid").write_text(str(proc.pid))
        print(f"Submitted batch job {jid}")
    elif tool == "sacct":
        ids = [args[i + 1] for i, a in enumerate(args) if a == "-j"]
        print("JobID|State|NodeList")
        for jid in ids:
            path = state / f"{jid}.state"
            if path.exists():
                print(f"{jid}|{path.read_text()}|localhost")
    elif tool == "squeue":
        pass
    elif tool == "scancel":
        jid = args[0]
        (state / f"{jid}.state").write_text("CANCELLED")
        pid = state / f"{jid}.pid"
        if pid.exists():
            try:
                os.killpg(int(pid.read_text()), signal.SIGTERM)
            except ProcessLookupError:
                pass
    elif tool == "srun":
        files = {}
        while args and args[0].startswith("--"):
            opt = args.pop(0)
            if opt in ("--output", "--error"):
                files[opt] = args.pop(0).replace("%j", os.environ["SLURM_JOB_ID"]).replace("%t", "0")
        out = open(files.get("--output", os.devnull), "ab")
        err = open(files["--error"], "ab") if "--error" in files else out
        sys.exit(subprocess.run(args, stdout=out, stderr=err).returncode)


def run_job(jid: str) -> None:
    """The background part of sbatch: the script with the job's Slurm variables, then its state."""
    state = Path(os.environ["FAKE_SLURM_DIR"])
    env = {**os.environ, "SLURM_JOB_ID": jid, "SLURM_NTASKS": "1", "SLURM_JOB_NUM_NODES": "1",
           "SLURM_NODEID": "0", "SLURM_PROCID": "0", "SLURM_LOCALID": "0",
           "SLURM_JOB_NODELIST": "localhost"}
    code = subprocess.run(["bash", str(state / f"{jid}.sh")], env=env).returncode
    if (state / f"{jid}.state").read_text() == "RUNNING":
        (state / f"{jid}.state").write_text("COMPLETED" if code == 0 else "FAILED")
