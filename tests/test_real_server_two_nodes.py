"""sglang 0.5.5 as two nodes on this machine, as shipped and patched.

``--nnodes 2 --node-rank 0/1 --dist-init-addr 127.0.0.1:<port>``, TP=2 with one rank per
node, over loopback; each node runs in its own mount namespace with a tmpfs of its own at
``/dev/shm`` (``real_server.py``, "Nodes"), so that neither sees the other's shared memory,
as on two machines. The processor pool is left at its default size and
``SGLANG_MM_SHM_DIR`` unset, as a user runs it.

Shared memory can't reach the rank on the other node, so the patched server must decide,
from sglang's own ``ServerArgs``, to send every tensor inline: no processor pool, no region,
no file of ours in either node's ``/dev/shm``. And it must answer as sglang as shipped,
run the same way, answers: token ids and logprobs, bitwise. One as-shipped pair of nodes
answers first and stops; then one patched pair. Only one pair runs at a time.
"""

from __future__ import annotations

import os

import pytest

from real_server import (
    RealServer,
    kill_nodes,
    private_shm_unavailable_reason,
    segment_files,
    start_nodes,
    stop_nodes,
)
from server_cases import case_one_image, case_two_images

pytestmark = [pytest.mark.real_server, pytest.mark.timeout(900)]

CASES = {"one_1120x700_image": case_one_image, "two_images_one_prompt": case_two_images}

#: What the patched TokenizerManager logs when it decides (``config.shm_unusable_reason``):
#: once at start-up (no pool), once at the first request it builds (inline).
NO_POOL_LOG = "sglang_mmpre: no processor pool: scheduler ranks may run on other nodes"
INLINE_LOG = "sglang_mmpre: multimodal tensors travel inline: scheduler ranks may run on other nodes"


@pytest.fixture(scope="module")
def private_shm() -> None:
    reason = private_shm_unavailable_reason()
    if reason is not None:
        pytest.skip(f"each node needs its own /dev/shm: {reason}")


def _stop_and_check(nodes: list[RealServer]) -> None:
    """Stop the pair (node 0 drains; node 1 stops when its peer is gone), then check that
    no process of either is left, in its process group or its mount namespace (where its
    own /dev/shm lived)."""
    try:
        stop_nodes(nodes)
    finally:
        kill_nodes(nodes)  # whatever is left, if a check failed (a no-op otherwise)
    for node in nodes:
        assert node.processes() == {}, node.processes()
        assert node.mount_namespace_members() == []


@pytest.fixture(scope="module")
def reference(private_shm, served_model, tmp_path_factory) -> dict:
    """What two as-shipped nodes answer; they are then stopped."""
    nodes = start_nodes("as_shipped", served_model, tmp_path_factory.mktemp("as_shipped_nodes"))
    print(f"\nas shipped: two nodes ready after {max(n.ready_after_s for n in nodes):.0f} s")
    try:
        return {name: fn(nodes[0].url) for name, fn in CASES.items()}
    finally:
        _stop_and_check(nodes)


@pytest.fixture(scope="module")
def patched(private_shm, served_model, tmp_path_factory, reference) -> list[RealServer]:
    nodes = start_nodes("optimized", served_model, tmp_path_factory.mktemp("patched_nodes"))
    print(f"\npatched: two nodes ready after {max(n.ready_after_s for n in nodes):.0f} s")
    try:
        yield nodes
    finally:
        _stop_and_check(nodes)


@pytest.mark.parametrize("case", list(CASES))
def test_two_node_patched_outputs_equal_as_shipped_bitwise(case, patched, reference):
    assert CASES[case](patched[0].url) == reference[case]


def test_two_nodes_send_every_tensor_inline_with_no_pool_region_or_file_on_either_node(patched):
    head, other = patched
    case_one_image(head.url)  # at least one image request built by now, whatever ran before
    roles = {node.config.node.rank: sorted(node.processes().values()) for node in patched}
    # One TP rank on each node; the tokenizer and the detokenizer on node 0 only.
    assert roles == {0: ["detokenizer", "scheduler_TP0", "tokenizer"],
                     1: ["launcher", "scheduler_TP1"]}, roles
    # Each node sees a /dev/shm of its own, not this machine's (else the checks below
    # would look at the wrong place).
    devices = {os.stat(node.shm_dir).st_dev for node in patched} | {os.stat("/dev/shm").st_dev}
    assert len(devices) == 3, "the nodes do not have a /dev/shm of their own each"
    for node in patched:
        ours = [n for n in os.listdir(node.shm_dir) if n.startswith("sglmmpre_")]
        assert ours == [], f"files of ours in node {node.config.node.rank}'s /dev/shm: {ours}"
        assert segment_files(node.shm_dir, with_locks=True, with_regions=True) == []
    log = head.log_path.read_text(errors="replace")
    assert NO_POOL_LOG in log and INLINE_LOG in log, head.log_tail()
