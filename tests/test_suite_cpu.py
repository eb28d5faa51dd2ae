"""benchmarks/suite_cpu.py: the kernel's accounting records read back, each process given its kind and its test.

The command lines are ones the sampler recorded during a clean clone's `make test` (paths shortened)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from benchmarks.suite_cpu import (
    ACCT_V3,
    SLURM_JOBS,
    Exited,
    Seen,
    attribute,
    comp_t_value,
    parse_acct,
    process_kind,
    report,
)
from tests.cli_runs import PROJECT

PY = "/clone/.venv/bin/python"
SPAWNED_FORK_SERVER = (f"{PY} -B -c from multiprocessing.forkserver import main; main(13, 14, "
                       "['sd35dist.jobs.warm_fork_server_begin', 'torch'], **{})")
TITLED_FORK_SERVER = "sd35dist torchrun fork server /tmp/run"
AGENT = (f"{PY} -m sd35dist torchrun --start-method=forkserver --standalone --nproc-per-node=2 -m sd35dist train "
         "--recipe /tmp/r.yaml")
SLURM_AGENT = (f"{PY} /clone/.venv/bin/sd35dist torchrun --nnodes=2 --nproc-per-node=1 --rdzv-backend=c10d "
               "--start-method=forkserver -m sd35dist train --recipe /tmp/r.yaml")
SRUN = ("srun --kill-on-bad-exit=1 --nodes=2 --ntasks-per-node=1 --cpus-per-task=1 sd35dist torchrun --nnodes=2 "
        "--nproc-per-node=1 --rdzv-id=1 --rdzv-backend=c10d --start-method=forkserver -m sd35dist train")
RANK = f"{PY} -u -m sd35dist train --recipe /tmp/r.yaml"


def record(pid: int, ppid: int, cpu_s: float, comm: str = "python") -> bytes:
    """One acct_v3 record as the kernel writes it; utime as a comp_t with exponent 1 when it needs one."""
    ticks = round(cpu_s * 100)
    utime = ticks if ticks < 0x2000 else (1 << 13) | (ticks >> 3)
    return ACCT_V3.pack(0, 3, 0, 0, 0, 0, pid, ppid, 0, 0.0, utime, 7, 0, 0, 0, 0, 0, 0, comm.encode())


@pytest.mark.unit
def test_comp_t_is_a_mantissa_and_a_base_eight_exponent():
    assert comp_t_value(1234) == 1234
    assert comp_t_value((1 << 13) | 1000) == 8000
    assert comp_t_value((2 << 13) | 5) == 320


@pytest.mark.unit
def test_the_accounting_file_reads_back_pid_parent_name_and_user_plus_system_cpu():
    data = record(101, 100, 2.5, "pt_main_thread") + record(102, 101, 120.0) + b"\0" * 10  # a record being written
    first, second = parse_acct(data)
    assert first == Exited(101, 100, "pt_main_thread", 2.57), "2.5 s user + 7 ticks system"
    assert second.pid == 102 and second.ppid == 101 and second.cpu_s == pytest.approx(120.07, abs=0.08)


@pytest.mark.unit
@pytest.mark.parametrize(("cmdline", "parent", "kind"), [
    (SPAWNED_FORK_SERVER, AGENT, "fork server"),
    (TITLED_FORK_SERVER, AGENT, "fork server"),
    (SPAWNED_FORK_SERVER, SPAWNED_FORK_SERVER, "rank"),  # forked, its title not set yet
    (RANK, TITLED_FORK_SERVER, "rank"),
    (AGENT, f"{PY} -m sd35dist train --recipe /tmp/r.yaml", "agent"),
    (SLURM_AGENT, "slurmstepd: [4.0]", "agent"),
    (SRUN, "/bin/bash /var/spool/slurmd/job00004/slurm_script", "slurm"),
    ("slurmstepd: [4.batch]", "slurmd -D -f /tmp/c/slurm.conf -N n1", "slurm"),
    (f"{PY} -B -c from multiprocessing.resource_tracker import main;main(25)", AGENT, "resource tracker"),
    (f"{PY} -u -c import sys;exec(eval(sys.stdin.readline()))", f"{PY} -m pytest -q -n 2", "pytest worker"),
    (f"{PY} -m pip install -q --no-compile -r requirements-test.txt", "make test", "install"),
    (f"{PY} -m compileall -qq -j 0 .venv/lib/python3.11/site-packages", "/bin/bash -c", "install"),
    (f"{PY} -m sd35dist cache --recipe /tmp/cache.yaml", f"{PY} -u -c import sys", "cli"),
    (f"{PY} /clone/.venv/lib/python3.11/site-packages/cpuinfo/cpuinfo.py --json", RANK, "python"),
    ("cat /proc/cpuinfo", "bash", "other"),
])
def test_every_process_gets_the_kind_it_was(cmdline, parent, kind):
    assert process_kind(cmdline, parent) == kind


@pytest.mark.unit
def test_a_process_counts_for_its_own_test_else_its_nearest_known_ancestor_s_and_job_steps_for_slurm():
    starter = "tests/test_slurm.py::test_submitit_preflight_crosses_both_nodes (setup)"
    seen = {
        10: Seen(1, "tests/test_train.py::test_a (call)", f"{PY} -m sd35dist train --recipe r.yaml"),
        11: Seen(10, "tests/test_train.py::test_a (call)", AGENT),
        12: Seen(11, "tests/test_train.py::test_a (call)", TITLED_FORK_SERVER),
        20: Seen(1, starter, "slurmd -D -f /tmp/c/slurm.conf -N n1"),
        21: Seen(20, None, "slurmstepd: [1.0]"),
        22: Seen(21, starter, SLURM_AGENT),  # slurmd's environment, not the job's submitter
        14: Seen(12, "tests/test_train.py::test_a (call)", TITLED_FORK_SERVER),  # a rank not yet titled
    }
    exited = [Exited(13, 12, "python", 4.0),  # a rank the sampler never saw
              Exited(15, 14, "/clone/.venv/bi", 0.01),  # the rank's child (numactl not found), never seen
              Exited(23, 22, "python", 6.0),  # a fork server of a job step, never seen
              Exited(12, 11, "python", 5.0), Exited(30, 1, "make", 0.5)]
    result = {record.pid: (test, kind) for record, test, kind in attribute(exited, seen)}
    assert result[13] == ("tests/test_train.py::test_a", "rank")
    assert result[12] == ("tests/test_train.py::test_a", "fork server")
    assert result[23] == (SLURM_JOBS, "python")
    assert result[30] == (None, "other")
    assert result[15] == ("tests/test_train.py::test_a", "other"), "a rank's child is no rank"
    text = report(attribute(exited, seen))
    assert text.splitlines()[0] == "5 processes, 16 CPU-s"
    assert "| rank | 1 | 4 | 4.00 |" in text and f"| {SLURM_JOBS} | 6 |" in text
    assert text.index("| tests/test_train.py | 9 |") < text.index(f"| {SLURM_JOBS} | 6 |"), "most CPU first"


@pytest.mark.process
def test_report_prints_the_tables_of_an_earlier_measurement(tmp_path):
    """`--report DIR` reads what `--out DIR -- COMMAND` wrote (acct.bin, processes.json) and runs nothing."""
    (tmp_path / "acct.bin").write_bytes(record(12, 11, 5.0) + record(13, 12, 4.0))
    (tmp_path / "processes.json").write_text(json.dumps({
        "11:500": [1, "tests/test_train.py::test_a (call)", AGENT], "12:501": [11, None, TITLED_FORK_SERVER]}))
    proc = subprocess.run([sys.executable, "benchmarks/suite_cpu.py", "--report", str(tmp_path)], capture_output=True,
                          text=True, cwd=PROJECT, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[0] == "2 processes, 9 CPU-s"
    assert "| fork server | 1 | 5 | 5.07 |" in proc.stdout and "| rank | 1 | 4 | 4.07 |" in proc.stdout
    assert "| tests/test_train.py::test_a | 9.1 |" in proc.stdout
