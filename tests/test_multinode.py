"""Several nodes with torchrun's c10d rendezvous: 2 "nodes" x 1 process on 127.0.0.1 (gloo)
train what one process trains, and a node that cannot see the run folder is refused."""

from __future__ import annotations

import subprocess
import sys
import uuid

import pytest
from test_train import ENV, _cli, _final_tensors


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def node_launcher(nnodes: int, port: int, run_id: str) -> list[str]:
    """The command a node runs (the same on every node): torchrun with c10d rendezvous."""
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes", str(nnodes),
            "--nproc-per-node", "1", "--rdzv-backend", "c10d",
            "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", run_id, "-m", "lsgm_edu"]


def run_nodes(commands: list[list[str]], timeout: float = 300) -> list[subprocess.CompletedProcess]:
    """Start one process per "node" at once and wait for all of them."""
    procs = [subprocess.Popen(c, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) for c in commands]
    out = []
    for p, c in zip(procs, commands):
        try:
            stdout, _ = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
        out.append(subprocess.CompletedProcess(c, p.returncode, stdout))
    return out


@pytest.mark.slow
def test_two_nodes_train_what_one_process_trains(tmp_path):
    extra = "model.dropout=0.0"
    one, two = tmp_path / "one", tmp_path / "two"
    subprocess.run(_cli(one, 6, 6, extra), check=True, env=ENV, capture_output=True)
    launcher = node_launcher(2, _free_port(), uuid.uuid4().hex[:8])
    results = run_nodes([_cli(two, 6, 6, extra, launcher=launcher)] * 2)
    for r in results:
        assert r.returncode == 0, r.stdout[-3000:]
    a, b = _final_tensors(one), _final_tensors(two)
    worst = max((a[k] - b[k]).abs().max().item() for k in a if k.startswith("score/"))
    assert worst < 1e-6, f"2 nodes x 1 process differ from 1 process by {worst}"


@pytest.mark.slow
def test_node_that_does_not_share_the_run_folder_is_refused(tmp_path):
    """Resuming where only one node sees the checkpoints (no shared filesystem) is an error
    that says so, not a silent divergence or a hang. Each "node" here gets its own --out."""
    extra = "model.dropout=0.0"
    seen = tmp_path / "seen"
    subprocess.run(_cli(seen, 4, 4, extra), check=True, env=ENV, capture_output=True)
    launcher = node_launcher(2, _free_port(), uuid.uuid4().hex[:8])
    # torchrun's c10d assigns ranks in arrival order: whichever node gets rank 0, the two see
    # different checkpoints (step 4 against none)
    results = run_nodes([_cli(seen, 8, 4, extra, resume=True, launcher=launcher),
                         _cli(tmp_path / "empty", 8, 4, extra, resume=True, launcher=launcher)])
    text = "\n".join(r.stdout for r in results)
    assert any(r.returncode != 0 for r in results)
    assert "must be on a filesystem shared by every node" in text, text[-3000:]
