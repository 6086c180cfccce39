"""Simulated nodes on this machine, launched the way users launch a multi-node job.

Each node is a set of Linux namespaces (`unshare`): its own hostname (UTS), System V IPC, mounts
(a private tmpfs on /dev/shm, so no shared memory reaches another node) and PIDs (so that
killing the node ends every process in it). On each node torchrun starts the ranks and meets
the other nodes through a c10d rendezvous hosted by node 0 at 127.0.0.1; gloo talks over
loopback. Node n's address is 127.0.0.(n+1) (all of 127/8 is loopback): torchrun tells nodes
apart by address and PID, and with a PID namespace each agent is PID 1, as agents on real
machines may share a PID but never an address.

`run_on_nodes(calls)` runs `calls` (each (tensor_parallel_size or None, "module:function",
args): a function of a test module, inside initialize_model_parallel when a size is given)
in order on every rank and returns a `NodesRun`: each node's exit code and output, and each
rank's host and per-call result. A rank stops at its first failing call; once one node fails
the others get a short grace, then every node is killed, as on a timeout.
`unavailable()` says why simulated nodes cannot run here (None if they can).

Run as a script (what torchrun starts on each rank): `nodes.py RESULTS_DIR CALLS_JSON`.
"""

from __future__ import annotations

import datetime
import functools
import importlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

TORCHRUN = Path(sys.executable).with_name("torchrun")
# A collective stuck on a peer that failed gives up after this (the launcher's timeout comes first).
WORKER_COLLECTIVE_TIMEOUT_S = 120
FAILURE_GRACE_S = 5
# unshare's namespaces, and what each node does inside them before torchrun.
NAMESPACES = ["--uts", "--ipc", "--mount", "--pid", "--fork", "--mount-proc", "--kill-child"]
NODE_SETUP = 'mount -t tmpfs -o size=1g nxd-shm /dev/shm && hostname "$0" && exec "$@"'


@functools.cache
def unavailable() -> str | None:
    """Why simulated nodes cannot run on this machine, or None when they can."""
    if sys.platform != "linux":
        return f"simulated nodes need Linux namespaces (this is {sys.platform})"
    if shutil.which("unshare") is None:
        return "simulated nodes need util-linux's unshare, which is not installed"
    probe = subprocess.run(
        ["unshare", *NAMESPACES, "sh", "-c", NODE_SETUP, "nxd-probe", "true"], capture_output=True, text=True, timeout=30
    )
    if probe.returncode != 0:
        return (
            "simulated nodes need to create namespaces and mount a tmpfs (root, or a container with "
            f"CAP_SYS_ADMIN); unshare failed: {probe.stderr.strip() or probe.returncode}"
        )
    return None


@dataclass
class NodeProcess:
    node: int
    returncode: int | None  # None: killed (timeout, or another node failed)
    output: str


@dataclass
class NodesRun:
    nodes: list[NodeProcess]
    ranks: list[dict | None]  # per global rank: {"host", "outcomes": [{"value"} or {"error"}, ...]}; None if it wrote none

    def values(self, call: int) -> list:
        """Every rank's result of call number `call`; AssertionError with the failures and node output otherwise."""
        values, problems = [], []
        for rank, report in enumerate(self.ranks):
            outcomes = report["outcomes"] if report else []
            if call < len(outcomes) and "value" in outcomes[call]:
                values.append(outcomes[call]["value"])
            elif call < len(outcomes):
                problems.append(f"--- rank {rank} ---\n{outcomes[call]['error']}")
            else:
                problems.append(f"--- rank {rank}: no result (an earlier call failed, or the rank died) ---")
        if problems:
            output = "\n".join(f"=== node {n.node} (exit {n.returncode}) ===\n{n.output[-3000:]}" for n in self.nodes)
            raise AssertionError(f"call {call} failed:\n" + "\n".join(problems) + "\n" + output)
        return values


def run_on_nodes(calls: list, nodes: int = 2, procs_per_node: int = 2, timeout_s: float = 120, env: dict | None = None) -> NodesRun:
    """Run `calls` on `nodes` simulated nodes of `procs_per_node` ranks each (see the module docstring)."""
    reason = unavailable()
    if reason is not None:
        raise RuntimeError(reason)
    port = _free_port()
    environment = {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1", **(env or {})}
    with tempfile.TemporaryDirectory(prefix="nxd-nodes-") as scratch:
        results = Path(scratch) / "results"
        results.mkdir()
        launched = []
        for node in range(nodes):
            command = [
                "unshare", *NAMESPACES, "--", "sh", "-c", NODE_SETUP, f"nxd-node{node}",
                str(TORCHRUN), f"--nnodes={nodes}", f"--nproc_per_node={procs_per_node}", f"--node_rank={node}",
                "--rdzv_backend=c10d", f"--rdzv_endpoint=127.0.0.1:{port}", f"--rdzv_id=nxd-{port}",
                f"--rdzv_conf=is_host={int(node == 0)}", f"--local_addr=127.0.0.{node + 1}", "--max_restarts=0",
                __file__, str(results), json.dumps(calls),
            ]  # fmt: skip
            log = open(Path(scratch) / f"node{node}.log", "w+")
            process = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, env=environment, start_new_session=True
            )
            launched.append((process, log))
        returncodes = _wait(launched, timeout_s)
        node_runs = []
        for node, ((_, log), code) in enumerate(zip(launched, returncodes)):
            log.seek(0)
            node_runs.append(NodeProcess(node, code, log.read()))
            log.close()
        ranks = []
        for rank in range(nodes * procs_per_node):
            path = results / f"rank{rank}.json"
            ranks.append(json.loads(path.read_text()) if path.exists() else None)
    return NodesRun(node_runs, ranks)


def _wait(launched: list, timeout_s: float) -> list[int | None]:
    """Each node's exit code; nodes still running at the deadline (or FAILURE_GRACE_S after one failed) are
    killed, with everything in their namespaces, and get None."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        codes = [process.poll() for process, _ in launched]
        if None not in codes:
            return codes
        if any(code not in (None, 0) for code in codes):
            deadline = min(deadline, time.monotonic() + FAILURE_GRACE_S)
        time.sleep(0.1)
    codes = []
    for process, _ in launched:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)  # unshare --kill-child then kills the node's PID namespace
            process.wait()
            codes.append(None)
        else:
            codes.append(process.returncode)
    return codes


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _worker(results_dir: str, calls: list) -> int:
    """What each rank runs: join the job's process group, run the calls, write this rank's report."""
    import torch
    import torch.distributed as dist

    from distributed import with_model_parallel

    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=WORKER_COLLECTIVE_TIMEOUT_S))
    rank = dist.get_rank()
    report = {"host": socket.gethostname(), "outcomes": []}
    path = Path(results_dir) / f"rank{rank}.json"
    failed = False
    for tensor_parallel_size, target, args in calls:
        module, name = target.split(":")
        try:
            fn = getattr(importlib.import_module(module), name)
            if tensor_parallel_size is None:
                value = fn(*args)
            else:
                value = with_model_parallel(tensor_parallel_size, fn, *args)
            report["outcomes"].append({"value": value})
        except BaseException:  # noqa: BLE001 - reported to the launcher with its traceback
            report["outcomes"].append({"error": traceback.format_exc()})
            failed = True
        path.write_text(json.dumps(report))
        if failed:
            return 1  # the peers may be stuck in a collective with this rank: the launcher ends them
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(_worker(sys.argv[1], json.loads(sys.argv[2])))
