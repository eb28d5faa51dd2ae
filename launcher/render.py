"""JobPlan → shell text. Pure: the same plan always renders the same bytes (golden-tested).

The sbatch script stands on its own (`sbatch run.sbatch`); submitit receives the same
setup block and the same launch command (launcher/submission.py).
"""

from __future__ import annotations

import shlex

from launcher.plan import JobPlan
from sd35dist.runtime.job_env import RDZV_HOST_VAR, RDZV_PORT_VAR, RUN_DIR_VAR
from sd35dist.runtime.run_files import MISTAKE_FILE, PREEMPT_FILE


def shell_word(text: str) -> str:
    """Quote one word for bash. Words naming $VARIABLES are double-quoted so they expand
    where the line runs; everything else is single-quoted when it needs quoting at all."""
    if "$" not in text:
        return shlex.quote(text)
    flag, eq, value = text.partition("=")
    if eq and flag.startswith("-") and "$" not in flag:
        return f"{flag}={shell_word(value)}"
    escaped = text.replace("\\", "\\\\").replace('"', '\\"').replace("`", "\\`")
    return f'"{escaped}"'


def _value(value: str) -> str:
    return shell_word(value) if "$" in value else shlex.quote(value)


def launch_command(plan: JobPlan) -> str:
    """The torchrun command line, one option per line."""
    words = [shell_word(w) for w in plan.launch_argv]
    head, tail = " ".join(words[:2]), words[2:]
    # Keep "-m sd35dist <job>" and each "--flag value" pair together on one line.
    lines, i = [head], 0
    while i < len(tail):
        word = tail[i]
        if word in ("-m", "--recipe", "--run-dir") and i + 1 < len(tail):
            take = 3 if word == "-m" and i + 2 < len(tail) else 2
            lines.append(" ".join(tail[i : i + take]))
            i += take
        else:
            lines.append(word)
            i += 1
    return " \\\n    ".join(lines)


def setup_block(plan: JobPlan) -> list[str]:
    """Lines run once per job before launch: profile setup, environment, secret checks, rendezvous."""
    out: list[str] = [f"echo {shlex.quote('sd35dist: ' + plan.mesh)}"]
    if plan.setup_lines:
        out.append("# setup from the profile")
        out += list(plan.setup_lines)
    out.append("# environment (non-secret values from the profile)")
    out += [f"export {name}={_value(value)}" for name, value in plan.env]
    if plan.gpu_env:
        out.append("# GPU environment (the profile's gpu_env:, docs/gpu.md), each with why")
        for setting in plan.gpu_env:
            out += [f"# {setting.why}", f"export {setting.name}={_value(setting.value)}"]
    if plan.secret_names:
        out.append("# secrets: passed by name from the submitting environment; values are never written here")
        out += [
            f'[ -n "${{{name}:-}}" ] || echo "sd35dist: warning: {name} is not set in the job environment" >&2'
            for name in plan.secret_names
        ]
    out.append(
        "command -v sd35dist >/dev/null || "
        "{ echo \"sd35dist: the sd35dist command is not on PATH: activate the project's environment in the profile's setup.lines\" >&2; exit 2; }"
    )
    if plan.scheduler == "slurm":
        out += [
            "# rendezvous on the first node, by the address Slurm knows (node names need not resolve)",
            'RDZV_NODE=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | sed -n 1p)',
            "RDZV_ADDR=$(scontrol show node \"$RDZV_NODE\" | tr ' ' '\\n' | sed -n 's/^NodeAddr=//p' | sed -n 1p)",
            f'export {RDZV_HOST_VAR}="${{RDZV_ADDR:-$RDZV_NODE}}"',
            "# a port of its own per job, so jobs sharing the first node never meet in one c10d store",
            f"export {RDZV_PORT_VAR}=$(({plan.rdzv_port} + SLURM_JOB_ID % {plan.rdzv_port_span}))",
            f'echo "sd35dist: job $SLURM_JOB_ID restart ${{SLURM_RESTART_COUNT:-0}} nodes $SLURM_JOB_NODELIST'
            f' rendezvous ${RDZV_HOST_VAR}:${RDZV_PORT_VAR}"',
        ]
    return out


def _header(plan: JobPlan, how: str) -> list[str]:
    return [
        "#!/bin/bash",
        f"# sd35dist job '{plan.job}' of recipe '{plan.recipe_name}' on profile '{plan.profile_name}'.",
        f"# Rendered by `sd35dist submit`; {how}",
        f"# Run directory: {plan.run_dir} (frozen recipe: {plan.frozen_recipe})",
    ]


def render_sbatch(plan: JobPlan) -> str:
    """The batch script for a Slurm profile."""
    if plan.scheduler != "slurm":
        raise ValueError(f"profile {plan.profile_name} is not a Slurm profile")
    lines = _header(plan, "submit it with `sbatch <this file>`.")
    lines += [f"#SBATCH --{key}" if value is None else f"#SBATCH --{key}={value}" for key, value in plan.directives]
    lines += ["", "set -euo pipefail", ""]
    lines += lifecycle_traps(plan) + [""]
    lines += setup_block(plan)
    cpus = dict(plan.directives).get("cpus-per-task", "1")
    lines += [
        "",
        "# one torchrun agent per node; per-node values (SLURM_NODEID…) reach it through srun's environment",
        f'srun --kill-on-bad-exit=1 --nodes="$SLURM_NNODES" --ntasks-per-node=1 --cpus-per-task={cpus} \\',
        "    " + launch_command(plan) + " &",
    ]
    lines += [""] + wait_and_requeue()
    return "\n".join(lines) + "\n"


def lifecycle_traps(plan: JobPlan) -> list[str]:
    """The batch shell's part in preemption: Slurm's time-limit warning (USR1, sent to this
    shell alone) becomes the PREEMPT file the ranks agree on at a step boundary. SIGTERM
    (scancel, requeue, preemption) reaches every process of the step from Slurm itself;
    this shell only keeps waiting so that the ranks can finish their save.

    First in the script, before the profile's setup and the rendezvous queries: Slurm may send the
    warning up to a minute early (sbatch(1), --signal), at the job's start when the time limit is
    short, and an untrapped USR1 ends bash. So the run directory is written out, not taken from the
    environment block that comes later."""
    run_dir = str(plan.run_dir)
    flag = '"$PREEMPT_REQUEST"'
    return [
        "# lifecycle: docs/lifecycle.md (first: Slurm may send the time-limit warning up to a minute early)",
        f"PREEMPT_REQUEST={shlex.quote(f'{run_dir}/{PREEMPT_FILE}')}",
        f"rm -f {flag} {shlex.quote(f'{run_dir}/{MISTAKE_FILE}')}  # a requeued job starts without the previous run's files",
        "TIME_LIMIT_WARNED=0",
        f"trap 'TIME_LIMIT_WARNED=1; echo \"sd35dist: time-limit warning: asking the ranks to save\" >&2; touch {flag}' USR1",
        "trap 'echo \"sd35dist: SIGTERM from Slurm: the ranks save if it fits, then stop\" >&2' TERM",
    ]


def wait_and_requeue() -> list[str]:
    """Wait for the step through trapped signals, then requeue after a time-limit save; a rank's
    mistake ends the job with status 2 whichever node met it first."""
    return [
        "STEP_PID=$!",
        "# a trapped signal ends `wait` early while the step still runs: wait until it has exited",
        'while kill -0 "$STEP_PID" 2>/dev/null; do wait "$STEP_PID" || true; done',
        'STEP_STATUS=0; wait "$STEP_PID" || STEP_STATUS=$?',
        'if ((TIME_LIMIT_WARNED)) && ((STEP_STATUS == 0)); then',
        '    echo "sd35dist: the ranks saved before the time limit; requeueing job $SLURM_JOB_ID" >&2',
        '    scontrol requeue "$SLURM_JOB_ID"',
        "fi",
        f'if [ -e "${RUN_DIR_VAR}/{MISTAKE_FILE}" ]; then STEP_STATUS=2; fi  # not srun\'s signal for the other nodes',
        'exit "$STEP_STATUS"',
    ]


def render_local(plan: JobPlan) -> str:
    """The script a local profile runs on this machine (what submitit's local executor starts)."""
    if plan.scheduler != "local":
        raise ValueError(f"profile {plan.profile_name} is not a local profile")
    lines = _header(plan, "run it with `bash <this file>`.")
    lines += ["", "set -euo pipefail", ""]
    lines += setup_block(plan)
    lines += ["", "exec " + launch_command(plan), ""]
    return "\n".join(lines)


def render_script(plan: JobPlan) -> str:
    return render_sbatch(plan) if plan.scheduler == "slurm" else render_local(plan)
